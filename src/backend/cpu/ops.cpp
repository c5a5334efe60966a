#include <algorithm>
#include <cmath>
#include <cstdlib>
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

size_t CpuKv::bytes() const {
  size_t n = 0;
  for (auto& v : latent) n += v.size() * sizeof(float);
  for (auto& v : k_rope) n += v.size() * sizeof(float);
  return n;
}

void* CpuBackend::alloc(size_t bytes) {
  void* p = std::malloc(bytes == 0 ? 1 : bytes);
  if (!p) fail(ErrorKind::resource, "cpu", "out of host memory allocating {} bytes", bytes);
  return p;
}
void CpuBackend::release(void* p) { std::free(p); }
void CpuBackend::upload(void* dst, const void* host, size_t bytes) { std::memcpy(dst, host, bytes); }
void CpuBackend::download(void* host, const void* src, size_t bytes) { std::memcpy(host, src, bytes); }
void CpuBackend::fill(float* p, float value, int64_t n) { std::fill(p, p + n, value); }

std::unique_ptr<KvState> CpuBackend::new_kv(const ModelConfig& cfg) {
  auto kv = std::make_unique<CpuKv>();
  kv->latent.resize(cfg.num_hidden_layers);
  kv->k_rope.resize(cfg.num_hidden_layers);
  return kv;
}

void CpuBackend::kv_append(KvState& state, int64_t layer, const float* latent, const float* ckv, int64_t row0,
                           int64_t n, int64_t C, int64_t dr) {
  auto* kv = dynamic_cast<CpuKv*>(&state);
  KSCOPE_CHECK(kv && layer < static_cast<int64_t>(kv->latent.size()), input, "cpu", "KV cache from another backend or model");
  auto& L = kv->latent[layer];
  auto& R = kv->k_rope[layer];
  L.insert(L.end(), latent + row0 * C, latent + (row0 + n) * C);
  for (int64_t t = row0; t < row0 + n; ++t) R.insert(R.end(), ckv + t * (C + dr) + C, ckv + (t + 1) * (C + dr));
}

void CpuBackend::gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * width, src + rows[i] * width, width * sizeof(float));
}

void CpuBackend::logits_top(const float* logits, int64_t R, int64_t V, int64_t M, float* max, double* log_sum,
                            float* top_v, int32_t* top_i) {
  M = std::min(M, V);
  pool_.parallel_for(R, 1, [&](int64_t b, int64_t e) {
    std::vector<int32_t> ids(V);
    for (int64_t r = b; r < e; ++r) {
      const float* l = logits + r * V;
      const float mx = *std::max_element(l, l + V);
      double s = 0;
      for (int64_t i = 0; i < V; ++i) s += std::exp(static_cast<double>(l[i] - mx));
      max[r] = mx;
      log_sum[r] = std::log(s);
      for (int64_t i = 0; i < V; ++i) ids[i] = static_cast<int32_t>(i);
      std::partial_sort(ids.begin(), ids.begin() + M, ids.end(),
                        [&](int32_t a, int32_t c) { return l[a] > l[c] || (l[a] == l[c] && a < c); });
      for (int64_t j = 0; j < M; ++j) {
        top_i[r * M + j] = ids[j];
        top_v[r * M + j] = l[ids[j]];
      }
    }
  });
}

void apply_row_op(const RowOp& op, float* h, int64_t width) {
  if (op.kind == RowOp::add) {
    for (int64_t i = 0; i < width; ++i) h[i] += op.add_coef * op.v[i];
    return;
  }
  double proj = 0;
  for (int64_t i = 0; i < width; ++i) proj += static_cast<double>(h[i]) * op.v[i];
  proj /= op.vnorm;
  const double s = (op.target - proj) / op.vnorm;
  for (int64_t i = 0; i < width; ++i) h[i] = static_cast<float>(h[i] + s * op.v[i]);
}

void CpuBackend::apply_row_ops(float* data, int64_t width, const std::vector<RowOp>& ops) {
  for (const RowOp& op : ops) apply_row_op(op, data + op.row * width, width);
}

void* CpuBackend::stage_host(size_t bytes) {
  stage_[cur_].emplace_back(bytes);
  return stage_[cur_].back().data();
}

void CpuBackend::embed(const TensorInfo& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t V = table.shape[0], H = table.shape[1];
  Linear view;  // reuse the dense row decoder
  view.name = table.name;
  view.out = V;
  view.in = H;
  view.weight = &table;
  for (int64_t t = 0; t < n; ++t) {
    KSCOPE_CHECK(ids[t] >= 0 && ids[t] < V, input, "embed", "token id {} is outside the vocabulary [0, {})", ids[t], V);
    view.dequant_row(ids[t], out + t * H);
  }
}

void CpuBackend::rmsnorm(const float* x, const std::vector<float>& wv, int64_t n, int64_t d, float eps, float* out,
                         int64_t ld) {
  if (ld == 0) ld = d;
  const float* w = wv.data();
  pool_.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* xr = x + t * ld;
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
