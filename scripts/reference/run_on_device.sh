#!/usr/bin/env bash
# Regenerates tests/fixtures/reference on the device machine (HF transformers 5.17 + PyTorch there).
# Usage (device tool): bash scripts/reference/run_on_device.sh   -> $OUT/<name>.tgz + $OUT/hf_source.txt
set -euo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/kscope-ref-out}
work=/tmp/kscope-fixtures
rm -rf "$work"; mkdir -p "$work" "$out"
python3 -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'
python3 scripts/reference/make_fixtures.py --out "$work"
cp "$work/hf_source.txt" "$out/"
for d in "$work"/*/; do n=$(basename "$d"); tar -C "$work" -czf "$out/$n.tgz" "$n"; done
ls -la "$out"
