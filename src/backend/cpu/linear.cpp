#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"

namespace kscope {

// Threads split the output rows; each dequantizes a tile of rows of W into fp32 once and applies it to every
// input row, so no dequantized copy of W exists beyond one tile per thread.
void CpuBackend::linear(const Linear& w, const float* x, int64_t n, float* y) {
  constexpr int64_t kTile = 8;
  const int64_t in = w.in, out = w.out;
  pool_.parallel_for((out + kTile - 1) / kTile, 1, [&](int64_t b, int64_t e) {
    std::vector<float> tile(kTile * in);
    for (int64_t tb = b; tb < e; ++tb) {
      const int64_t r0 = tb * kTile, r1 = std::min(out, r0 + kTile);
      for (int64_t r = r0; r < r1; ++r) w.dequant_row(r, tile.data() + (r - r0) * in);
      for (int64_t t = 0; t < n; ++t) {
        const float* xr = x + t * in;
        float* yr = y + t * out;
        for (int64_t r = r0; r < r1; ++r) yr[r] = dot_f32(xr, tile.data() + (r - r0) * in, in);
      }
    }
  });
}

void CpuBackend::mlp(const MlpWeights& w, const float* x, int64_t n, float* out) {
  const int64_t I = w.gate.out;
  std::vector<float> g(n * I), u(n * I);
  linear(w.gate, x, n, g.data());
  linear(w.up, x, n, u.data());
  for (int64_t i = 0; i < n * I; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];  // silu(g) * u
  linear(w.down, g.data(), n, out);
}

}  // namespace kscope
