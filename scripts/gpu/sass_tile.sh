#!/usr/bin/env bash
# SASS of the bf16 tile matmul (k_gemm_tile<bf16, 2, 8>) and the opcode mix of its k loop.   (carry .deps)
source scripts/gpu/env.sh
gpu_build bench_gpu >/dev/null || exit 1
obj=$(find build-gpu -name "kernels.cu.o" | head -1)
cuobjdump -sass "$obj" | awk '/Function :/ {on = index($0, "k_gemm_tileILi0ELi2ELi8ELb0ELb0E") > 0} on' | grep -E "^\s+/\*[0-9a-f]{4}\*/" | sed 's@/\* 0x[0-9a-f]* \*/@@; s/^\s*//' > $OUT/sass-bf16.txt
wc -l $OUT/sass-bf16.txt
# opcode mix of the full-tile k loop (the instructions between its barrier and its backward branch)
awk '/BAR.SYNC/ {n++} n==1' $OUT/sass-bf16.txt | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -12
