#!/usr/bin/env bash
# Builds and runs scripts/gpu/tma_probe.cu on the device (no other dependency); each guess in its own process.
cd "$(dirname "$0")/../.."
export PATH=/usr/local/cuda/bin:$PATH
nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a -I src scripts/gpu/tma_probe.cu -o /tmp/tma_probe 2>&1 | grep -v "C7519\|C7520" | head
for p in 1 2a 2b; do /tmp/tma_probe $p 2>&1 | tail -2; done
