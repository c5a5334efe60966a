#!/usr/bin/env bash
# Trains the demo model on the device (device tool: carry .corpus, made here by prepare_corpus.sh).
#   bash scripts/demo-model/run_on_device.sh [train.py options]   -> $OUT/demo.tar.part-* (+ train.log)
set -euo pipefail
export PYTHONUNBUFFERED=1
out=/tmp/kscope-demo
rm -rf "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 scripts/demo-model/train.py --corpus .corpus --out "$out" "$@" 2>&1 | tee "${OUT:-/tmp}/train.log"
tar -C "$out" -cf /tmp/demo.tar .
split -b 15m -d /tmp/demo.tar "${OUT:-/tmp}/demo.tar.part-"
ls -la "${OUT:-/tmp}"
