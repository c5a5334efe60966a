#!/usr/bin/env bash
# SASS of one kernel of kernels.cu (first function whose mangled name contains $1, default k_mla_wgILi256) into
# $OUT/sass.txt, and its opcode mix.   run: bash scripts/gpu/sass_kernel.sh [NAME]   (carry .deps)
source scripts/gpu/env.sh
name=${1:-k_mla_wgILi256}
[ -n "${SKIP_BUILD:-}" ] || gpu_build bench_gpu >/dev/null || exit 1
obj=$(find build-gpu -name "kernels.cu.o" | head -1)
cuobjdump -sass "$obj" | awk -v n="$name" '/Function :/ {on = index($0, n) > 0} on' | grep -E "^\s+/\*[0-9a-f]{4}\*/" |
  sed 's@/\* 0x[0-9a-f]* \*/@@; s/^\s*//' > $OUT/sass.txt
echo "$(wc -l < $OUT/sass.txt) instructions"
awk '{op=$2; if (op ~ /^@/) op=$3; sub(/\..*/, "", op); print op}' $OUT/sass.txt | sort | uniq -c | sort -rn | head -25
