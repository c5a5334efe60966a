#!/usr/bin/env bash
# Prefill attention on warpgroup MMA (k_flash_wg): builds, runs the attention op tests (the warpgroup kernel against
# the CPU, the CUDA-core kernel and the mma.sync kernel bit for bit), times both kernels alone at K2's head shapes
# (bench_gpu flash) beside PyTorch's scaled_dot_product_attention on the same shapes (the peer: what HF's sdpa
# attention calls), and optionally a slice's prefill with each kernel.
#   run: bash scripts/gpu/flash.sh   (carry .deps; FLASH_SIZES passes through; FLASH=0 skips the kernel timings;
#        FULL=1 runs all CUDA op tests and the
#        HF parity tests; TESTS=0 skips the tests; PEER=0 skips PyTorch; RUN="bf16" also makes that 2-layer slice and
#        runs bench_gpu run on it once per environment setting in VARIANTS (default "KSCOPE_FLASH_WG=1
#        KSCOPE_FLASH_WG=0"); NCU=1: ncu sections and SASS of the warpgroup kernel)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
gpu_build bench_gpu $(gpu_test_targets) || exit 1
status=0
[ "${TESTS:-1}" != 0 ] && { gpu_op_tests '*attention*' 'prefill attention' || status=1; }
[ "${FLASH:-1}" != 0 ] && { build-gpu/bench/bench_gpu flash --json "$OUT/flash.json" | tee "$OUT/flash.txt" || status=1; }
if [ "${FLASH:-1}" != 0 ] && [ "${PEER:-1}" != 0 ]; then
  python3 - "${FLASH_SIZES:-4x1024,1x4096,1x8192,16x512}" <<'PY' | tee "$OUT/flash-peer.txt"
import sys, torch, torch.nn.functional as F
print("PyTorch", torch.__version__, "scaled_dot_product_attention, causal, bf16, 64 heads, qk 192, v 128")
print(f"{'batch':>6} {'tokens':>7} {'sdpa us':>10} {'TFLOP/s':>8}")
for item in sys.argv[1].split(","):
    B, T = map(int, item.split("x"))
    q = torch.randn(B, 64, T, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 64, T, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, 64, T, 128, device="cuda", dtype=torch.bfloat16)
    f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=192 ** -0.5)
    for _ in range(3): f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3)
    us = sorted(ts)[len(ts) // 2]
    flops = B * 64 * (192 + 128) * 2 * T * (T + 1) / 2
    print(f"{B:>6} {T:>7} {us:>10.1f} {flops / us / 1e6:>8.0f}")
PY
fi
if [ "${NCU:-0}" = 1 ]; then  # why the warpgroup kernel is where it is: ncu sections on one 1 x 4096 launch, SASS
  FLASH_SIZES=1x4096 timeout 300 ncu --clock-control none -k regex:k_flash_wg --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    build-gpu/bench/bench_gpu flash > "$OUT/flash-ncu.txt" 2>&1
  grep -E "issue_stalled" "$OUT/flash-ncu.txt" | sort -k3 -g -r | head -12
  grep -E "k_flash_wg|Duration|Throughput|Achieved Occupancy|Registers Per|Block Limit|Stall|Warp Cycles Per Issued|Issue Slots|Executed Ipc|Pipe|Bank|L2 Hit|Shared" \
    "$OUT/flash-ncu.txt" | head -70
  obj=$(find build-gpu -name "kernels.cu.o" | head -1)
  cuobjdump -sass "$obj" | awk '/Function :/ {on = index($0, "k_flash_wg") > 0} on' > "$OUT/flash-sass.txt"
  grep -oE "^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9_.]+" "$OUT/flash-sass.txt" | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25
  grep -nE "HGMMA|WARPGROUP|BAR|DEPBAR|LDGSTS|WARPSYNC" "$OUT/flash-sass.txt" | head -80
fi
for f in ${RUN:-}; do
  d=/tmp/k2-slice-$f-2
  [ -f $d/config.json ] || build-gpu/bench/bench_gpu make $d --format $f --layers 2 2>&1 | tail -1
  for v in ${VARIANTS:-KSCOPE_FLASH_WG=1 KSCOPE_FLASH_WG=0}; do
    echo "== bench_gpu run $f, $v"
    n=${v//=/-}
    env "$v" build-gpu/bench/bench_gpu run $d --json "$OUT/run-$f-$n.json" > "$OUT/run-$f-$n.txt" 2>&1
    grep -A14 "^MoE block" "$OUT/run-$f-$n.txt"; grep -A8 "step ms" "$OUT/run-$f-$n.txt"; grep -i "prefill" "$OUT/run-$f-$n.txt" | head -1
  done
done
rm -f "$OUT/cmake.log" "$OUT/build.log"
exit $status
