// The operations one DeepSeek-V3 / Kimi-K2 layer is written in. model/ calls only these; backend/cpu is the
// threaded fp32 reference, backend/cuda (later) the fast one. Buffers are backend-resident float arrays.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.hpp"
#include "model/weights.hpp"

namespace kscope {

// One sequence's view of the attention inputs for one layer.
struct AttnSeq {
  int64_t row0 = 0;    // first row of this sequence's new tokens in the batch
  int64_t n_new = 0;   // new tokens (their latents are already appended to the cache)
  int64_t past = 0;    // cached tokens before them; new token i sits at position past + i
  const float* latent = nullptr;  // [past + n_new, kv_lora]   normed compressed kv
  const float* k_rope = nullptr;  // [past + n_new, rope]      rotated shared rope key
  bool absorbed = false;          // decode form: attend in latent space (no per-token keys/values)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // out[n, H] = table[ids]
  virtual void embed(const TensorInfo& table, const int32_t* ids, int64_t n, float* out) = 0;
  // out[n, d] = x / rms(x) * w  (out may alias x)
  virtual void rmsnorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* out) = 0;
  // y[n, out] = x[n, in] · Wᵀ, W dequantized tile by tile in its stored format
  virtual void linear(const Linear& w, const float* x, int64_t n, float* y) = 0;
  // Rotates the rope part of rows in place. Row r, head h: x + r*row_stride + h*head_stride + offset, `dim` values,
  // position pos[r]. Output layout is de-interleaved ([rot(first of pairs)], [rot(second of pairs)]), as HF's.
  virtual void rope(float* x, int64_t n, int64_t n_heads, int64_t row_stride, int64_t head_stride, int64_t offset,
                    int64_t dim, const int64_t* pos, const std::vector<double>& inv_freq, double attn_factor,
                    bool interleaved) = 0;
  // q [rows, heads, qk_head_dim] (rope part rotated) -> out [rows, heads * v_head_dim]
  virtual void mla_attention(const ModelConfig& cfg, const AttentionWeights& w, const float* q,
                             const std::vector<AttnSeq>& seqs, float scale, float* out) = 0;
  // Router: scores, correction bias (selection only), group-limited top-k, normalization, scaling.
  // logits [n, E] (fp32) -> idx [n, k], weight [n, k]
  virtual void route(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int64_t n,
                     int32_t* idx, float* weight) = 0;
  // out[n, H] = Σ_k weight[t,k] · expert_{idx[t,k]}(x[t])   (experts combined in ascending expert id)
  virtual void moe_experts(const MoeWeights& w, const float* x, int64_t n, int64_t k, const int32_t* idx,
                           const float* weight, float* out) = 0;
  // out[n, H] = down(silu(gate(x)) * up(x))
  virtual void mlp(const MlpWeights& w, const float* x, int64_t n, float* out) = 0;
  // y += x
  virtual void add(float* y, const float* x, int64_t n) = 0;
};

}  // namespace kscope
