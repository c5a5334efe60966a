# Sourced by the scripts in scripts/gpu on the GPU machine: unpacks the carried Debian packages
# (.deps/prefix.tar.xz, made here by fetch-deps.sh) into a private prefix; gpu_build configures and builds the
# targets named in its arguments under build-gpu/.
P=/tmp/kscope-deps
if [ -f .deps/prefix.tar.xz ] && [ ! -d $P/usr ]; then
  mkdir -p $P
  tar -C $P -xJf .deps/prefix.tar.xz
fi
export CMAKE_PREFIX_PATH=$P/usr
export LD_LIBRARY_PATH=$P/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
# gpu_device: the GPU's name, memory and driver, printed and kept in $OUT/device.txt
gpu_device() { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"; }
gpu_build() {
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S . -B build-gpu "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DKSCOPE_CUDA=ON -DKSCOPE_SERVER=OFF -DKSCOPE_BENCH=ON \
    -DICU_ROOT=$P/usr -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; return 1; }
  cmake --build build-gpu -j "$(nproc)" --target "$@" >"$OUT/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; return 1; }
}
# gpu_copy_tree DIR [PATCH]: a copy of this tree (without builds and outputs) in DIR for a second build, with the
# patch file PATCH (-p1) applied if given; gpu_build_in DIR TARGETS...: gpu_build there.
gpu_copy_tree() {
  rm -rf "$1" && mkdir -p "$1"
  tar --exclude=./build-gpu --exclude=./out --exclude=./.deps -cf - . | tar -C "$1" -xf -
  ln -s "$PWD/.deps" "$1/.deps"
  [ -z "${2:-}" ] || (cd "$1" && patch -s -p1 < "$2") || { echo "$2 does not apply"; return 1; }
}
gpu_build_in() { (cd "$1" && OUT=$1/out && source scripts/gpu/env.sh && gpu_build "${@:2}"); }
# gpu_op_tests FILTER [PATTERN]: the CUDA op tests matching FILTER (every one with FULL=1, and then the HF parity
# tests too) into $OUT/ops.txt (and parity.txt); prints the summary lines, the lines matching PATTERN and any
# failure; returns 1 when anything failed.
gpu_op_tests() {
  local filter=$1 show="^\[  (FAILED|PASSED) " rc=0
  [ -n "${2:-}" ] && show="$show|$2"
  [ "${FULL:-0}" = 1 ] && filter='*'
  KSCOPE_REQUIRE_CUDA=1 build-gpu/tests/test_cuda_backend --gtest_filter="$filter" >"$OUT/ops.txt" 2>&1 || rc=1
  grep -E "$show" "$OUT/ops.txt"
  grep -B3 -A12 "Failure" "$OUT/ops.txt" | head -80
  if [ "${FULL:-0}" = 1 ]; then
    KSCOPE_TEST_DEVICE=cuda build-gpu/tests/test_parity >"$OUT/parity.txt" 2>&1 || rc=1
    grep -E "^\[  (PASSED|FAILED) " "$OUT/parity.txt"; grep -B2 -A8 "Failure" "$OUT/parity.txt" | head -40
  fi
  return $rc
}
# the test binaries gpu_op_tests runs, for gpu_build
gpu_test_targets() { echo test_cuda_backend; [ "${FULL:-0}" = 1 ] && echo test_parity; return 0; }
# ncu_stall_metrics: ncu's warp stall reasons as issue-stall cycles per issued instruction (one metric per reason,
# comma-separated), for the *_stalls.sh scripts
ncu_stall_metrics() {
  local m="" r
  for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected selected \
           dispatch_stall lg_throttle no_instruction drain branch_resolving imc_miss misc tex_throttle membar sleeping; do
    m="$m,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
  done
  echo "${m#,}"
}
