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
gpu_build() {
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S . -B build-gpu "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DKSCOPE_CUDA=ON -DKSCOPE_SERVER=OFF -DKSCOPE_BENCH=ON \
    -DICU_ROOT=$P/usr -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; return 1; }
  cmake --build build-gpu -j "$(nproc)" --target "$@" >"$OUT/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; return 1; }
}
