#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.hpp"
#include "util/error.hpp"

namespace kscope {

namespace {
void softmax_inplace(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}
}  // namespace

// Expanded form (prefill): decompress every cached latent into per-head keys and values with kv_b_proj, then
// ordinary causal attention. Absorbed form (decode): fold kv_b_proj's key half into the query and its value
// half into the output, attending directly over the compressed latents: the same function, fewer bytes.
void CpuBackend::mla_attention(const ModelConfig& cfg, const AttentionWeights& w, const float* q,
                               const std::vector<AttnSeq>& seqs, float scale, float* out) {
  const int64_t nh = cfg.num_attention_heads, dn = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim;
  const int64_t dv = cfg.v_head_dim, C = cfg.kv_lora_rank, dq = dn + dr, dkv = dn + dv;
  for (const AttnSeq& s : seqs) {
    const int64_t T = s.past + s.n_new;
    auto* cache = dynamic_cast<CpuKv*>(s.kv);
    KSCOPE_CHECK(cache && s.layer < static_cast<int64_t>(cache->latent.size()), input, "cpu", "KV cache from another backend or model");
    KSCOPE_CHECK(static_cast<int64_t>(cache->latent[s.layer].size()) == T * C, internal, "cpu", "KV cache length mismatch");
    const float* latent = cache->latent[s.layer].data();
    const float* k_rope = cache->k_rope[s.layer].data();
    if (!s.absorbed) {
      std::vector<float> kv(T * nh * dkv);  // [T, heads, nope + v]
      linear(w.kv_b_proj, latent, T, kv.data());
      pool_.parallel_for(nh * s.n_new, 1, [&](int64_t b, int64_t e) {
        std::vector<float> sc(T);
        for (int64_t job = b; job < e; ++job) {
          const int64_t h = job / s.n_new, i = job % s.n_new;
          const float* qi = q + (s.row0 + i) * nh * dq + h * dq;
          const int64_t len = s.past + i + 1;  // causal
          for (int64_t j = 0; j < len; ++j)
            sc[j] = (dot_f32(qi, kv.data() + (j * nh + h) * dkv, dn) + dot_f32(qi + dn, k_rope + j * dr, dr)) * scale;
          softmax_inplace(sc.data(), len);
          float* o = out + (s.row0 + i) * nh * dv + h * dv;
          std::fill(o, o + dv, 0.0f);
          for (int64_t j = 0; j < len; ++j) {
            const float* v = kv.data() + (j * nh + h) * dkv + dn;
            for (int64_t d = 0; d < dv; ++d) o[d] += sc[j] * v[d];
          }
        }
      });
    } else {
      pool_.parallel_for(nh, 1, [&](int64_t b, int64_t e) {
        std::vector<float> row(C), qlat(s.n_new * C), olat(C), sc(T);
        for (int64_t h = b; h < e; ++h) {
          // q_lat[i] = W_UK[h]ᵀ q_nope[i]   (W_UK[h] = kv_b_proj rows h*dkv .. h*dkv+dn)
          std::fill(qlat.begin(), qlat.end(), 0.0f);
          for (int64_t d = 0; d < dn; ++d) {
            w.kv_b_proj.dequant_row(h * dkv + d, row.data());
            for (int64_t i = 0; i < s.n_new; ++i) {
              const float qd = q[(s.row0 + i) * nh * dq + h * dq + d];
              float* ql = qlat.data() + i * C;
              for (int64_t c = 0; c < C; ++c) ql[c] += qd * row[c];
            }
          }
          for (int64_t i = 0; i < s.n_new; ++i) {
            const float* qi = q + (s.row0 + i) * nh * dq + h * dq;
            const int64_t len = s.past + i + 1;
            for (int64_t j = 0; j < len; ++j)
              sc[j] = (dot_f32(qlat.data() + i * C, latent + j * C, C) + dot_f32(qi + dn, k_rope + j * dr, dr)) * scale;
            softmax_inplace(sc.data(), len);
            std::fill(olat.begin(), olat.end(), 0.0f);
            for (int64_t j = 0; j < len; ++j) {
              const float* lj = latent + j * C;
              for (int64_t c = 0; c < C; ++c) olat[c] += sc[j] * lj[c];
            }
            // out = W_UV[h] · o_lat   (W_UV[h] = kv_b_proj rows h*dkv+dn .. h*dkv+dn+dv)
            float* o = out + (s.row0 + i) * nh * dv + h * dv;
            for (int64_t d = 0; d < dv; ++d) {
              w.kv_b_proj.dequant_row(h * dkv + dn + d, row.data());
              o[d] = dot_f32(row.data(), olat.data(), C);
            }
          }
        }
      });
    }
  }
}

}  // namespace kscope
