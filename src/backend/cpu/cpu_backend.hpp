// The plain, threaded fp32 reference backend: backend memory is host memory.
#pragma once
#include "backend/backend.hpp"
#include "util/thread_pool.hpp"

namespace kscope {

// The CPU cache: fp32 latents and rope keys per layer.
class CpuKv final : public KvState {
 public:
  std::vector<std::vector<float>> latent;  // [layer][pos * kv_lora]
  std::vector<std::vector<float>> k_rope;  // [layer][pos * rope]
  size_t bytes() const override;
};

class CpuBackend final : public Backend {
 public:
  // staged: the same ops, but the model treats this backend's memory as a device's (host_memory() false): hooks
  // get their rows through row ops and staged asynchronous reads, as on a GPU. Lets the device path of hooks and
  // captures be tested on any machine ("cpu-staged").
  explicit CpuBackend(ThreadPool& pool = ThreadPool::global(), bool staged = false) : pool_(pool), staged_(staged) {}
  const char* name() const override { return staged_ ? "cpu-staged" : "cpu"; }
  bool host_memory() const override { return !staged_; }
  void* alloc(size_t bytes) override;
  void release(void* p) override;
  void upload(void* dst, const void* host, size_t bytes) override;
  void download(void* host, const void* src, size_t bytes) override;
  void fill(float* p, float value, int64_t n) override;
  std::unique_ptr<KvState> new_kv(const ModelConfig& cfg) override;
  void kv_append(KvState& kv, int64_t layer, const float* latent, const float* ckv, int64_t row0, int64_t n, int64_t C,
                 int64_t dr) override;
  void embed(const TensorInfo& table, const int32_t* ids, int64_t n, float* out) override;
  void rmsnorm(const float* x, const std::vector<float>& w, int64_t n, int64_t d, float eps, float* out,
               int64_t ld = 0) override;
  void linear(const Linear& w, const float* x, int64_t n, float* y) override;
  void rope(float* x, int64_t n, int64_t n_heads, int64_t row_stride, int64_t head_stride, int64_t offset, int64_t dim,
            const int64_t* pos, const std::vector<double>& inv_freq, double attn_factor, bool interleaved) override;
  void mla_attention(const ModelConfig& cfg, const AttentionWeights& w, const float* q, const std::vector<AttnSeq>& seqs,
                     float scale, float* out) override;
  void route(const ModelConfig& cfg, const float* logits, const std::vector<float>& bias, int64_t n, int32_t* idx,
             float* weight) override;
  void moe_experts(const MoeWeights& w, const float* x, int64_t n, int64_t k, const int32_t* idx, const float* weight,
                   float* out) override;
  void mlp(const MlpWeights& w, const float* x, int64_t n, float* out) override;
  void add(float* y, const float* x, int64_t n) override;
  void gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst) override;
  void logits_top(const float* logits, int64_t R, int64_t V, int64_t M, float* max, double* log_sum, float* top_v,
                  int32_t* top_i) override;
  void apply_row_ops(float* data, int64_t width, const std::vector<RowOp>& ops) override;
  void* stage_host(size_t bytes) override;
  void stage_reset() override { stage_[cur_].clear(); }
  void stage_swap() override {
    cur_ ^= 1;
    stage_[cur_].clear();
  }

  ThreadPool& pool() { return pool_; }

 private:
  ThreadPool& pool_;
  bool staged_ = false;
  std::vector<std::vector<uint8_t>> stage_[2];
  int cur_ = 0;
};

// The row-op arithmetic, shared by the CPU backend and the CUDA backend's reference tests.
void apply_row_op(const RowOp& op, float* h, int64_t width);

// fp32 dot product with 8 independent accumulators: a fixed summation order, so a row's result never
// depends on which other rows share the batch.
float dot_f32(const float* a, const float* b, int64_t n);

}  // namespace kscope
