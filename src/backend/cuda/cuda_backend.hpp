// The CUDA backend: BF16 activations at every matmul input with fp32 accumulation, an fp32 residual stream,
// weights on the device exactly as stored (BF16, FP8 128x128 block-scaled, INT4 groups of 32) and dequantized in
// registers inside the matmul. Plain C++ interface: no CUDA types leak out of backend/cuda.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "backend/backend.hpp"

namespace kscope {

// What prepare() found and decided: weights on the device, KV cache budget, workspace.
struct CudaPlan {
  std::string device;
  uint64_t total_bytes = 0;       // device memory
  uint64_t weight_bytes = 0;      // device memory taken by the weights (as stored, plus the absorbed-MLA copies)
  uint64_t free_after_load = 0;   // free device memory once weights are in
  uint64_t workspace_bytes = 0;   // kept back for activations of one forward pass
  uint64_t kv_bytes_per_token = 0;
  uint64_t kv_budget_bytes = 0;   // the KV cache may grow to this, then requests fail with Error(resource)
  int64_t kv_capacity_tokens = 0;
  int64_t max_batch_tokens = 0;   // tokens one forward pass may carry within the workspace
  double load_seconds = 0;
  uint64_t load_bytes = 0;        // bytes read from the checkpoint
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  const char* name() const override { return "cuda"; }
  bool host_memory() const override { return false; }
  void prepare(const ModelConfig& cfg, const ModelWeights& w) override;

  // Single pieces, for tests and benchmarks that build weights by hand (prepare() calls these).
  void prepare_linear(const Linear& l);
  void prepare_moe(const MoeWeights& m);
  void prepare_attention(const ModelConfig& cfg, const AttentionWeights& a);
  void prepare_embed(const TensorInfo& t);

  void* alloc(size_t bytes) override;
  void release(void* p) override;
  void upload(void* dst, const void* host, size_t bytes) override;
  void download(void* host, const void* src, size_t bytes) override;
  void fill(float* p, float value, int64_t n) override;
  std::unique_ptr<KvState> new_kv(const ModelConfig& cfg) override;
  void kv_append(KvState& kv, int64_t layer, const float* latent, const float* ckv, int64_t row0, int64_t n, int64_t C,
                 int64_t dr) override;
  int64_t kv_free_tokens(const ModelConfig& cfg) const override;
  int64_t max_pass_tokens() const override;
  void kv_reserve(KvState& kv, int64_t tokens) override;
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
  bool moe_includes_shared(const MoeWeights& w) const override;
  void moe_experts(const MoeWeights& w, const float* x, int64_t n, int64_t k, const int32_t* idx, const float* weight,
                   float* out) override;
  void mlp(const MlpWeights& w, const float* x, int64_t n, float* out) override;
  bool bf16_inputs() const override { return true; }
  void rmsnorm_bf16(const float* x, const std::vector<float>& w, int64_t n, int64_t d, float eps, float* out,
                    uint16_t* out_bf16, int64_t ld = 0) override;
  void linear_bf16(const Linear& w, const float* x, const uint16_t* x_bf16, int64_t n, float* y) override;
  void mlp_bf16(const MlpWeights& w, const float* x, const uint16_t* x_bf16, int64_t n, float* out) override;
  void add(float* y, const float* x, int64_t n) override;
  void add_rmsnorm_bf16(float* h, const float* y, const std::vector<float>& w, int64_t n, int64_t d, float eps,
                        float* out, uint16_t* out_bf16) override;
  void gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst) override;
  void logits_top(const float* logits, int64_t R, int64_t V, int64_t M, float* max, double* log_sum, float* top_v,
                  int32_t* top_i) override;
  void apply_row_ops(float* data, int64_t width, const std::vector<RowOp>& ops) override;
  void sample_rows(const float* logits, int64_t V, const std::vector<int64_t>& rows, const std::vector<RowDraw>& draws,
                   int32_t* tok, float* logit) override;
  void* stage_host(size_t bytes) override;
  void download_async(void* host, const void* src, size_t bytes) override;
  void wait() override;
  void stage_reset() override;
  void stage_swap() override;
  int64_t mark() override;
  void wait_mark(int64_t m) override;

  void synchronize();
  const CudaPlan& plan() const;
  // Called during prepare() with (bytes done, bytes total) as weights stream to the device.
  std::function<void(uint64_t, uint64_t)> on_load_progress;
  // Bytes of device memory currently held by KV caches.
  uint64_t kv_bytes() const;
  // Tests: run every matmul with the single-stage kernel instead of the pipelined one.
  static void force_simple_gemm(bool on);
  // Tests: how many streams hold K-split counters (a backend frees its stream's when destroyed).
  static size_t split_counter_streams();
  // Tests and benchmarks: turn the streamed-weight matmul (and the many-row kernel that shares its arithmetic) off,
  // so the older tile kernels run everything.
  static void force_few_rows(bool on);
  // Tests and benchmarks: the streamed FP8/INT4 expert matmuls as one launch per tile size (8, 16, 32 rows; the
  // default) or as one launch sized for the most rows an expert can have, as bf16's always are (the same bits).
  static void set_few_by_rows(bool on);
  // Tests and benchmarks: the most rows of one streamed expert tile, 32, 16 (the experts' tiles of 17-32 rows run as
  // two 16-row pieces), 8 (every tile in the one-row-tile launch) or, any other value, by the call's tokens (8 up to
  // 32 tokens, else 32: the default); the same bits.
  static void set_few_piece(int rows);
  // Tests and benchmarks: the streamed FP8/INT4 expert launches per tile size after the first of a matmul start
  // without waiting for the ones before it (they share no output; the default) or, false, each after the one before
  // it; the same bits. bench_gpu reads KSCOPE_FEW_LATE=0|1.
  static void set_few_late(bool on);
  // Tests and benchmarks: the streamed FP8/INT4 expert launches of 9-16 rows (bit 1) and 17-32 rows (bit 2) per
  // tile in 8-warp blocks of 128 output features sharing one X stage, or (bit clear) 4-warp blocks of 64 (the same
  // bits); -1 the default by format (INT4 both, FP8 neither). bench_gpu reads KSCOPE_FEW_WIDE.
  static void set_few_wide(int classes);
  static int few_wide();
  // Tests and benchmarks: from how many rows the many-row matmul kernel takes over from the streamed one (the same
  // bits; cuda::set_tile_rows): dense matmuls of >= dense_rows rows, grouped ones averaging >= group_rows per group
  // (routed rows over all the layer's experts; a fraction is allowed). 0 never, 1 always for dense ones, negative the
  // default (48; groups bf16 0.35, FP8 8, INT4 16; 24 with the warpgroup kernel off). bench_gpu reads
  // KSCOPE_TILE_ROWS=dense,group.
  static void set_tile_rows(int dense_rows, double group_rows);
  // Tests and benchmarks: the many-row matmul on warpgroup MMA (every format; the default) or, off, on the mma.sync
  // tile kernel — the same bits. rows: its rows per block (64/128/256; 0 by shape). bench_gpu reads
  // KSCOPE_WG_GEMM=0 and KSCOPE_WG_ROWS.
  static void set_wg_gemm(bool on, int rows = 0);
  // Tests: fp32-input matmuls (routers) from 8 rows on the tiled kernel (the default) or on the one-feature split
  // kernel; the same bits.
  static void set_f32_tile(bool on);
  // Tests and benchmarks: the router's picks by one block per token, each thread an expert and the picks by rank
  // (the default up to 1024 experts in at most 64 groups), or, false, by one warp per token (K argmax rounds in a
  // row); the same bits. bench_gpu reads KSCOPE_ROUTE_BLOCK=0.
  static void set_route_block(bool on);
  // Decode attention split per row by its own length (cuda::mla_row_chunk), so a sequence's decode logits are the
  // same bits alone or batched at any context length. Off by default: it costs 5-50% more attention time at small
  // batches (bench/RESULTS.md, round 4), where the default split sizes the parts to fill the GPU, which depends on
  // the batch. KSCOPE_INVARIANT_ATTENTION=1 turns it on for bench_gpu and the parity tests.
  void set_batch_invariant_attention(bool on);
  // Captures copied out on a second stream from a device snapshot, so the compute stream never waits for PCIe (the
  // default; off: copied on the compute stream, which then waits for each copy. Tests compare the two bit for bit).
  void set_capture_copy_stream(bool on);
  // Tests: run absorbed (decode) attention with the CUDA-core kernel instead of the tensor-core one.
  static void force_simple_attention(bool on);
  // Tests and benchmarks: absorbed decode attention on the previous kernels (mma.sync attention, CUDA-core fp32
  // absorption matmuls) instead of the warpgroup-MMA attention and the tensor-core absorption matmuls.
  static void force_mla_mma_sync(bool on);
  // Tests and benchmarks: prefill (expanded-form) attention at K2's head shapes on warpgroup MMA in 128-row tiles
  // (the default) or, off, on the mma.sync kernel in 64-row tiles — the same bits. bench_gpu reads KSCOPE_FLASH_WG=0.
  static void set_flash_wg(bool on);
  // Benchmarks: kernels launched with programmatic dependent launch (the default: each kernel's launch overlaps the
  // end of the one before it; every kernel waits for its predecessor before touching memory) or plainly.
  // bench_gpu reads KSCOPE_PDL=0.
  static void set_pdl(bool on);
  // Benchmarks and tests: decode attention's cache tiles by tensor copies (TMA; the default where rope is 64 and
  // kv_lora 128/256/512) or, off, by per-thread cp.async (the same arithmetic, so the same bits).
  static void set_mla_tma(bool on);
  // Tests: decode attention launches that loaded their tiles by tensor copies so far.
  static int64_t mla_tma_launches();
  // Benchmarks and tests: on the tensor-copy path, decode attention's kernel with specialized warpgroups (warpgroup 0
  // computes the scores and the softmax of 64-token tiles, each warpgroup adds P·V into its half of O) or the
  // previous one (32-token tiles, both warpgroups on every step): mode 0 never the former, 1 (default) where each
  // split of the cache is 1024 tokens or more and for the batch-invariant split, 2 always; launches of the former.
  static void set_mla_specialized(int mode);
  static int64_t mla_specialized_launches();
  // Overrides the plan's KV budget (tests of admission control; a server that shares the device).
  void set_kv_budget(uint64_t bytes);

  struct Impl;

 private:
  void grow_kv(KvState& kv, int64_t layer, int64_t cap);
  const float* norm_weights(const std::vector<float>& w, Buf<float>& tmp);
  std::shared_ptr<Impl> impl_;
};

std::shared_ptr<Backend> make_cuda_backend(int device);

}  // namespace kscope
