#include <cmath>
#include <cstring>

#include "backend/cpu/cpu_backend.hpp"
#include "util/error.hpp"

namespace kscope {

float dot_f32(const float* a, const float* b, int64_t n) {
  // 32 independent lanes hide the FMA latency (4 vector accumulators); the reduction order is fixed.
  float acc[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 32; ++k) acc[k] += a[i + k] * b[i + k];
  for (; i < n; ++i) acc[i & 31] += a[i] * b[i];
  for (int w = 16; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  return acc[0];
}

void CpuBackend::embed(const TensorInfo& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t V = table.shape[0], H = table.shape[1];
  Linear view;  // reuse the dense row decoder
  view.name = table.name;
  view.out = V;
  view.in = H;
  view.weight = &table;
  for (int64_t t = 0; t < n; ++t) {
    if (ids[t] < 0 || ids[t] >= V) fail(ErrorKind::input, "embed", "token id {} is outside the vocabulary [0, {})", ids[t], V);
    view.dequant_row(ids[t], out + t * H);
  }
}

void CpuBackend::rmsnorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* out) {
  pool_.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x + t * d;
      float* o = out + t * d;
      const float ms = dot_f32(xr, xr, d) / static_cast<float>(d);
      const float r = 1.0f / std::sqrt(ms + eps);
      for (int64_t i = 0; i < d; ++i) o[i] = w[i] * (xr[i] * r);
    }
  });
}

void CpuBackend::rope(float* x, int64_t n, int64_t n_heads, int64_t row_stride, int64_t head_stride, int64_t offset,
                      int64_t dim, const int64_t* pos, const std::vector<double>& inv_freq, double attn_factor,
                      bool interleaved) {
  const int64_t half = dim / 2;
  pool_.parallel_for(n, 8, [&](int64_t b, int64_t e) {
    std::vector<float> cs(half), sn(half), tmp(dim);
    for (int64_t r = b; r < e; ++r) {
      for (int64_t i = 0; i < half; ++i) {
        // as HF: freqs in fp32, cos/sin in fp32, then scaled by the attention factor
        const float f = static_cast<float>(inv_freq[i]) * static_cast<float>(pos[r]);
        cs[i] = std::cos(f) * static_cast<float>(attn_factor);
        sn[i] = std::sin(f) * static_cast<float>(attn_factor);
      }
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + r * row_stride + h * head_stride + offset;
        for (int64_t i = 0; i < half; ++i) {
          const float a = interleaved ? v[2 * i] : v[i];
          const float c = interleaved ? v[2 * i + 1] : v[i + half];
          tmp[i] = a * cs[i] - c * sn[i];
          tmp[i + half] = c * cs[i] + a * sn[i];
        }
        std::memcpy(v, tmp.data(), dim * sizeof(float));
      }
    }
  });
}

void CpuBackend::add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace kscope
