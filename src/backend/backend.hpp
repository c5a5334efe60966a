// The operations one DeepSeek-V3 / Kimi-K2 layer is written in. model/ calls only these; backend/cpu is the
// threaded fp32 reference, backend/cuda the GPU one. Every float/int pointer an op takes is *backend memory*
// (host memory for the CPU backend, device memory for CUDA), allocated with alloc() or through Buf<T>.
// Weights are passed as the host-side descriptors of model/weights.hpp; a device backend finds its own copy
// of them (uploaded once by prepare()).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.hpp"
#include "model/logits.hpp"
#include "model/weights.hpp"

namespace kscope {

// One sequence's compressed MLA cache (per layer: normed latent [len, kv_lora] and rotated rope key [len, rope]),
// owned by the backend that made it.
class KvState {
 public:
  virtual ~KvState() = default;
  virtual size_t bytes() const = 0;
};

// One sequence's view of the attention inputs for one layer.
struct AttnSeq {
  int64_t row0 = 0;    // first row of this sequence's new tokens in the batch
  int64_t n_new = 0;   // new tokens (their latents are already appended to the cache)
  int64_t past = 0;    // cached tokens before them; new token i sits at position past + i
  KvState* kv = nullptr;
  int64_t layer = 0;
  bool absorbed = false;  // decode form: attend in latent space (no per-token keys/values)
};

// One write of an intervention to one row, described for the backend to apply (a device backend does it without
// copying the rows to the host). kind add: h += add_coef · v. kind project: h += ((target − h·v/‖v‖) / ‖v‖) · v,
// computed in double (ablate: target 0; clamp: target c) — the arithmetic of interp's apply_intervention.
struct RowOp {
  enum Kind { add, project };
  int64_t row = 0;             // row of the batch buffer
  Kind kind = add;
  const float* v = nullptr;    // host vector [width], alive until the op has been applied
  float add_coef = 0;
  double target = 0, vnorm = 1;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // true when backend memory is ordinary host memory (hooks then see it in place)
  virtual bool host_memory() const { return true; }
  // Called once per model with its weights, before any op; a device backend uploads them here.
  virtual void prepare(const ModelConfig& cfg, const ModelWeights& w) {}

  // ---- memory
  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void upload(void* dst, const void* host, size_t bytes) = 0;
  virtual void download(void* host, const void* src, size_t bytes) = 0;  // complete when it returns
  virtual void fill(float* p, float value, int64_t n) = 0;

  // ---- KV cache
  virtual std::unique_ptr<KvState> new_kv(const ModelConfig& cfg) = 0;
  // Appends rows [row0, row0 + n) to layer `layer`: latent rows from latent [*, C], rope keys from
  // ckv [*, C + dr] at column C.
  virtual void kv_append(KvState& kv, int64_t layer, const float* latent, const float* ckv, int64_t row0, int64_t n,
                         int64_t C, int64_t dr) = 0;

  // Most tokens one forward pass should carry, so its workspace stays within the memory plan (0: no limit).
  virtual int64_t max_pass_tokens() const { return 0; }
  // Tokens of KV cache that can still be reserved across all sequences (unbounded on the host).
  virtual int64_t kv_free_tokens(const ModelConfig& cfg) const { return INT64_MAX; }
  // Makes room for `tokens` tokens in every layer at once (admission control reserves a request's whole need, so
  // it cannot run out of cache mid-generation); throws Error(resource) when the budget does not hold them.
  virtual void kv_reserve(KvState& kv, int64_t tokens) {}

  // ---- ops
  // out[n, H] = table[ids]   (ids already checked against the vocabulary)
  virtual void embed(const TensorInfo& table, const int32_t* ids, int64_t n, float* out) = 0;
  // out[n, d] = x / rms(x) * w  (out may alias x; x rows are `ld` apart, out rows d apart)
  virtual void rmsnorm(const float* x, const std::vector<float>& w, int64_t n, int64_t d, float eps, float* out,
                       int64_t ld = 0) = 0;
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
  // out[n, H] = Σ_k weight[t,k] · expert_{idx[t,k]}(x[t])   (experts combined in ascending expert id), plus the
  // shared expert's output added after that sum when moe_includes_shared(w)
  virtual void moe_experts(const MoeWeights& w, const float* x, int64_t n, int64_t k, const int32_t* idx,
                           const float* weight, float* out) = 0;
  // Whether moe_experts also runs w.shared (as one more expert of the same launches); else the caller runs it
  // with mlp() and adds it.
  virtual bool moe_includes_shared(const MoeWeights& w) const { return false; }
  // out[n, H] = down(silu(gate(x)) * up(x))
  virtual void mlp(const MlpWeights& w, const float* x, int64_t n, float* out) = 0;
  // bf16 copies of matmul inputs, for backends whose matmuls read bf16 activations (the CUDA one: each linear/mlp
  // otherwise converts its fp32 input in a launch of its own). With bf16_inputs(), rmsnorm_bf16 also writes
  // bf16(out) into out_bf16 (when not nullptr), and linear_bf16 / mlp_bf16 take x_bf16 == bf16(x) — which the
  // caller guarantees: nothing may write x between — instead of converting x. The same bits either way. Defaults:
  // the plain ops (x_bf16 ignored).
  virtual bool bf16_inputs() const { return false; }
  virtual void rmsnorm_bf16(const float* x, const std::vector<float>& w, int64_t n, int64_t d, float eps, float* out,
                            uint16_t* out_bf16, int64_t ld = 0) {
    rmsnorm(x, w, n, d, eps, out, ld);
  }
  virtual void linear_bf16(const Linear& w, const float* x, const uint16_t* x_bf16, int64_t n, float* y) {
    linear(w, x, n, y);
  }
  virtual void mlp_bf16(const MlpWeights& w, const float* x, const uint16_t* x_bf16, int64_t n, float* out) {
    mlp(w, x, n, out);
  }
  // y += x
  virtual void add(float* y, const float* x, int64_t n) = 0;
  // The residual add and the norm after it: h[n, d] += y, then out = x / rms(x) * w of the new h (and bf16(out) as
  // rmsnorm_bf16 writes it; out_bf16 may be nullptr). The same bits as add() then rmsnorm_bf16(); a backend may do
  // both in one pass over the rows. out must not alias h.
  virtual void add_rmsnorm_bf16(float* h, const float* y, const std::vector<float>& w, int64_t n, int64_t d, float eps,
                                float* out, uint16_t* out_bf16) {
    add(h, y, n * d);
    rmsnorm_bf16(h, w, n, d, eps, out, out_bf16);
  }
  // dst[i, :] = src[rows[i], :]   (rows: backend memory, n entries)
  virtual void gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst) = 0;
  // Per row r of logits [R, V] (backend memory) into host arrays: the max, log Σ exp(l − max) (double), and the
  // M largest logits with their ids (descending, ties to the lower id) in top_v/top_i [R, M].
  virtual void logits_top(const float* logits, int64_t R, int64_t V, int64_t M, float* max, double* log_sum,
                          float* top_v, int32_t* top_i) = 0;
  // Draws a token from each listed row of logits [*, V] (backend memory) by RowDraw's rule with its u; tok and
  // logit (the chosen token's logit) are host arrays. The default reads each row on the host.
  virtual void sample_rows(const float* logits, int64_t V, const std::vector<int64_t>& rows,
                           const std::vector<RowDraw>& draws, int32_t* tok, float* logit);
  // Applies ops to rows of data [*, width] (backend memory), in order within each row.
  virtual void apply_row_ops(float* data, int64_t width, const std::vector<RowOp>& ops) = 0;

  // ---- asynchronous copies to the host (captures): stage_host gives host memory from the current staging set;
  // download_async fills it in stream order; wait() returns once everything issued so far is complete.
  virtual void* stage_host(size_t bytes) = 0;
  virtual void download_async(void* host, const void* src, size_t bytes) { download(host, src, bytes); }
  virtual void wait() {}
  // mark() notes the point reached in issue order (-1 where everything is synchronous); wait_mark() returns once
  // the work issued before that mark is complete, so early captures can be read while later layers still run.
  // wait_mark() may be called from another thread than the one issuing work. Marks belong to the current set.
  virtual int64_t mark() { return -1; }
  virtual void wait_mark(int64_t) {}
  // Staging memory and marks come in two sets, so one pass's captures can be read on another thread while the
  // next pass is issued: stage_reset() recycles the current set; stage_swap() leaves the current set's memory and
  // marks valid until the next stage_swap() and makes the other set, recycled, current.
  virtual void stage_reset() = 0;
  virtual void stage_swap() = 0;
};

// An array in backend memory, freed with the Buf.
template <class T>
class Buf {
 public:
  Buf() = default;
  Buf(Backend& be, int64_t n) : be_(&be), n_(n) { p_ = n > 0 ? static_cast<T*>(be.alloc(n * sizeof(T))) : nullptr; }
  Buf(Backend& be, const std::vector<T>& host) : Buf(be, static_cast<int64_t>(host.size())) {
    if (n_ > 0) be.upload(p_, host.data(), n_ * sizeof(T));
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : be_(o.be_), p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  Buf& operator=(Buf&& o) noexcept {
    if (this != &o) { reset(); be_ = o.be_; p_ = o.p_; n_ = o.n_; o.p_ = nullptr; o.n_ = 0; }
    return *this;
  }
  ~Buf() { reset(); }
  void reset() {
    if (p_) be_->release(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* data() const { return p_; }
  int64_t size() const { return n_; }
  std::vector<T> host() const {
    std::vector<T> v(n_);
    if (n_ > 0) be_->download(v.data(), p_, n_ * sizeof(T));
    return v;
  }

 private:
  Backend* be_ = nullptr;
  T* p_ = nullptr;
  int64_t n_ = 0;
};

// "cpu", "cpu-staged" (the CPU ops behind the device path of hooks: for testing), or "cuda" / "cuda:N"; throws
// Error(input) for an unknown name or Error(unsupported) when this build or machine has no CUDA device.
std::shared_ptr<Backend> make_backend(const std::string& name);

}  // namespace kscope
