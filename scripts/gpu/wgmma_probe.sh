#!/usr/bin/env bash
# Builds and runs scripts/gpu/wgmma_probe.cu on the device (no other dependency).
cd "$(dirname "$0")/../.."
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name --format=csv,noheader
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a scripts/gpu/wgmma_probe.cu -o /tmp/wgmma_probe 2>&1 | grep -v "C7519\|C7520" | head
echo "== 1. descriptors, A and B K-major from shared memory; error vs exact / sum|ab| (fp32: ~1e-7)"
for a in 0 1; do for b in 0 1; do /tmp/wgmma_probe 1 $a $b 2>&1 | tail -1; done; done
echo "== 2. B MN-major (transposed)"
for b in 0 1; do /tmp/wgmma_probe 2 $b 2>&1 | tail -2; done
/tmp/wgmma_probe
