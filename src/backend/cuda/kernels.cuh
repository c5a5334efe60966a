// Kernels of the CUDA backend. Each has its CPU reference in backend/cpu (tests/test_cuda_backend.cpp compares
// them on random inputs).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kscope {
// Throws the backend's Error for a failed CUDA call (resource for out of memory; cuda_backend.cu).
[[noreturn]] void cuda_fail(cudaError_t e, const char* what);
}  // namespace kscope

namespace kscope::cuda {

using bf16 = __nv_bfloat16;

enum Fmt : int { kBf16 = 0, kFp8 = 1, kInt4 = 2 };

// A linear layer (or a stack of E experts' layers) on the device, in its stored format.
//   kBf16: w bf16 [N, K]
//   kFp8 : w e4m3 [N, K], s f32 [ceil(N/bo), ceil(K/bi)]
//   kInt4: w int32 [N, ceil(K/8)] (8 nibbles, element i at bits 4i, value q+8), scales [N, ceil(K/g)]: s16 bf16
//          (the checkpoint's own bf16 scales, as shipped; dequantized with bf16 multiplies) or s f32 (another dtype)
// Expert e's weight starts at w + e*w_stride bytes, its scales at s (or s16) + e*s_stride elements.
struct DLin {
  int fmt = kBf16;
  int N = 0, K = 0;
  const uint8_t* w = nullptr;
  const float* s = nullptr;
  const uint16_t* s16 = nullptr;  // INT4 scales as bf16 (then s is nullptr)
  bool scales_bf16() const { return s16 != nullptr; }
  int64_t w_stride = 0, s_stride = 0;
  int bo = 0, bi = 0, g = 0;
  int s_cols = 0;   // scale columns
  int64_t w_ld = 0; // bytes per weight row
};

// Row groups of a grouped matmul: group e owns rows [row_off[e], row_off[e+1]) and row tiles
// [tile_off[e], tile_off[e+1]). nullptr: one group of all M rows.
// Optionally (moe_permute writes them) the row tiles by size, for the streamed kernel's launches per tile size:
// class c (0: 1-8 rows, 1: 9-16, 2: 17-32) has cls_count[c] tiles, (group, first row) at cls_tiles[c * cls_cap + i].
struct Groups {
  const int* row_off = nullptr;
  const int* tile_off = nullptr;
  int G = 1;
  const int* cls_count = nullptr;
  const int2* cls_tiles = nullptr;
  int cls_cap = 0;
  int cls_piece = 32;  // the most rows of a listed tile (moe_permute's piece)
  bool late = false;   // (gemm_few sets it) a launch per tile size after the first: no wait at the start
};

constexpr int kBM = 32, kBN = 64, kBK = 64;  // tile kernels; kBM is also the row tile of the streamed one
// Y[m, N] (fp32) = X[m, K] (bf16) · W_g[N, K]ᵀ for every row m of group g.
// With W2/Y2: also Y2 = X · W2ᵀ (same shape and format as W) in the same launch (gate and up projections).
// Shapes that few_rows_ok() takes run the streamed-weight kernel (weights into mma fragments, dequantized in
// registers); others the tile kernels. Either way a row's result does not depend on the other rows. max_rows: the
// most rows any group has (a hint that trims the streamed kernel's tiles; no effect on the result).
void gemm(const bf16* X, int M, float* Y, const DLin& W, const Groups& groups, int max_row_tiles, cudaStream_t s,
          float* Y2 = nullptr, const DLin* W2 = nullptr, int max_rows = 1 << 30);
bool few_rows_ok(const DLin& W);
// The K-split launches' per-stream tile counters: free a stream's (before the stream is destroyed); how many
// streams hold some (tests: a destroyed backend leaves none behind).
void release_split_counters(cudaStream_t s);
size_t split_counter_streams();
// Tests: force the single-stage kernel (the pipelined one must give the same bits; also turns the streamed kernel
// off).
void set_simple_gemm(bool on);
// Tests and benchmarks: turn the streamed-weight kernel off (on by default), so the tile kernels run everything.
void set_few_rows(bool on);
// Tests and benchmarks: run the streamed FP8 and INT4 expert launches one per tile size (default), or as one
// launch (bf16 expert launches are always one).
void set_few_by_rows(bool on);
// The most rows of a listed expert tile: 32; 16 (the experts' tiles of 17-32 rows as pieces of 16, at 16-row
// launches' occupancy); 8 (every tile in the 8-row launch); anything else: by the call's tokens (8 up to 32 tokens,
// else 32; the default). few_piece(tokens) for moe_permute. The same bits either way.
void set_few_piece(int rows);
// The expert launches per tile size after the first of a matmul running beside the ones before it (with
// programmatic dependent launch; the default), or each after the one before it (the same bits).
void set_few_late(bool on);
// The expert launches of 9-16 rows (bit 1) and 17-32 rows (bit 2) per tile in blocks of 8 warps and 128 output
// features, which share one X stage, instead of 4 warps and 64 (the same bits); -1: the default by format (INT4 both,
// FP8 neither).
void set_few_wide(int classes);
int few_wide();
int few_piece(int64_t tokens);
// When the many-row tile kernel takes a streamed-kernel shape (the same bits either way, so only speed depends on
// it): a dense matmul of at least dense_rows rows, a grouped one whose groups average at least group_rows rows.
// 0 turns it off, 1 makes it take everything (tests), negative restores the default (48 and 8, INT4
// 16; grouped 24 with the warpgroup kernel off).
void set_tile_rows(int dense_rows, double group_rows);
// The many-row matmul on warpgroup MMA (k_gemm_wg, every format) or,
// off, on the mma.sync tile kernel (k_gemm_tile); the same bits either way. rows: the wgmma kernel's rows per block
// (64, 128 or 256; 0: by shape).
void set_wg_gemm(bool on, int rows = 0);
// Tests: fp32-input matmuls (routers) from 8 rows on the tiled kernel (8 features × 8 rows per block, the default)
// or, off, on the one-feature split kernel; the same bits either way.
void set_f32_tile(bool on);
// Kernels launched with programmatic dependent launch (the default) or, off, plainly; the same order of every memory
// access either way (each kernel waits for the one before it before touching memory).
void set_pdl(bool on);
// Tests: run absorbed decode attention with the CUDA-core kernel instead of the tensor-core one.
void set_simple_attention(bool on);
bool simple_attention();
// Tests and benchmarks: absorbed decode attention as it was before the warpgroup-MMA kernel — the mma.sync
// attention kernel (k_mla_decode) and the CUDA-core fp32 absorption matmuls (k_qlat16, k_uv16) — instead of
// k_mla_wg (the default where kv_lora is 128, 256 or 512 and rope 16, 32 or 64) and k_head_mm.
void set_mla_mma_sync(bool on);
// Y[m, N] (fp32) = X[m, K] (fp32) · W[N, K]ᵀ with fp32 inputs (router logits, as the reference computes them).
void gemm_f32(const float* X, int M, float* Y, const DLin& W, cudaStream_t s);

void f32_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t s);
void fill(float* p, float v, int64_t n, cudaStream_t s);
void add(float* y, const float* x, int64_t n, cudaStream_t s);
void embed(const bf16* table, int64_t V, int64_t H, const int32_t* ids, int64_t n, float* out, cudaStream_t s);
// out [n, d] fp32 and, when out16 is not nullptr, the same values rounded to bf16 [n, d] (the next matmul's input)
void rmsnorm(const float* x, int64_t ld, const float* w, int64_t n, int64_t d, float eps, float* out, bf16* out16,
             cudaStream_t s);
// h [n, d] += y (rows d apart), then rmsnorm of the new h into out / out16 (out must not alias h): one launch, the
// same bits as add() then rmsnorm()
void add_rmsnorm(float* h, const float* y, const float* w, int64_t n, int64_t d, float eps, float* out, bf16* out16,
                 cudaStream_t s);
void rope(float* x, int64_t n, int64_t n_heads, int64_t row_stride, int64_t head_stride, int64_t offset, int64_t dim,
          const int64_t* pos, const float* inv_freq, float attn_factor, bool interleaved, cudaStream_t s);
void gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst, cudaStream_t s);
// out bf16 [n, I] = silu(g) * u
void silu_mul(const float* g, const float* u, int64_t n, bf16* out, cudaStream_t s);

struct RouteArgs {
  int E, K, G, topk_group;
  int sigmoid;       // else softmax
  int method;        // 0 greedy, 1 group_limited_greedy, 2 noaux_tc
  int norm_topk;
  float scaling;
};
void route(const RouteArgs& a, const float* logits, const float* bias, int64_t n, int32_t* idx, float* weight,
           cudaStream_t s);
// Tests and benchmarks: the router's choices by one block per token (each thread an expert, the picks by rank; the
// default up to kRouteBlockCap experts in at most 64 groups) or by one warp per token; the same bits.
void set_route_block(bool on);

// The routed slots of one MoE call, token t's k slots in a row: the first kr are its routed experts (idx and
// weight [n, kr], as the router wrote them); where kr < k (k = kr + 1) the last is the shared expert stacked as
// expert `shared` with weight 1 — its output then comes last in the combine's ascending-id sum, added once as
// acc + shared, as the reference adds the shared expert to the routed sum. No array of the extended slots is made.
struct Slots {
  const int32_t* idx;
  const float* weight;
  int k, kr, shared;
};
// MoE token permutation: counts -> offsets -> slots sorted by expert (order within an expert irrelevant: every
// row is computed independently). Writes perm[pos] = slot, slot_pos[slot] = pos, row_off/tile_off [E+1], and the
// row tiles by size (Groups::cls_*): cls_count [3], cls_tiles [3][cls_cap] with cls_cap >= the number of row tiles.
// piece: the most rows of a listed tile (32: kBM; 16: an expert's rows in pieces of 16, no 32-row launch).
void moe_permute(const Slots& sl, int64_t n_slots, int E, int* counts, int* row_off, int* tile_off, int* cursor,
                 int* perm, int* slot_pos, int* cls_count, int2* cls_tiles, int cls_cap, int piece, cudaStream_t s);
// The bound on a grouped launch's row tiles (of kBM rows) for M rows in G groups
inline int64_t group_row_tiles(int64_t M, int64_t G) { return (M + kBM - 1) / kBM + (G < M ? G : M); }
// Xp[pos] = bf16(x[perm[pos] / k])
void moe_gather(const float* x, const int* perm, int64_t n_slots, int k, int64_t H, bf16* xp, cudaStream_t s);
// out[t] = Σ over t's slots in ascending expert id: weight · D[slot_pos[slot]]
void moe_combine(const float* D, const int* slot_pos, const Slots& sl, int64_t n, int64_t H, float* out, cudaStream_t s);

// KV append: latent rows (fp32 [*, C]) and rope keys (fp32 ckv [*, C+dr] at column C) -> bf16 cache at `past`.
void kv_append(const float* latent, const float* ckv, int64_t row0, int64_t n, int64_t C, int64_t dr, bf16* lat_dst,
               bf16* rope_dst, cudaStream_t s);

// One query row of attention: where its cache lies and how long it attends.
struct AttnRow {
  const bf16* latent;  // [len.., C]
  const bf16* k_rope;  // [len.., dr]
  const float* kvx;    // expanded form only: [T, heads, dn + dv]
  int len;             // keys attended (causal): past + i + 1
  int q_row;           // row in q / out
  int chunk = 0;       // absorbed tensor-core decode: this row's tokens per split (0: the launch's)
};
struct AttnDims {
  int nh, dn, dr, dv, C;
  float scale;
};
// Expanded form over per-token keys/values (kvx); absorbed form over the latent (W_UK [nh, dn, C],
// W_UVt [nh, C, dv] in bf16).
void attention_expanded(const AttnDims& d, const float* q, const AttnRow* rows, int n_rows, float* out, cudaStream_t s);
// The same on tensor cores (Q, K, V and P rounded to bf16, as the reference's bf16 attention does; fp32 accumulation
// and softmax) for K2/DeepSeek-V3 head shapes (nope + rope = 192, v = 128) when the CUDA-core kernel is not forced:
// tiles of up to kFlashTileRows consecutive rows of one sequence (the same kvx and k_rope).
constexpr int kFlashTileRows = 64;
struct AttnTile {
  int first, count;  // rows [first, first + count) of the row array
};
bool flash_expanded_ok(const AttnDims& d);
// Of those, K2's exact head shapes (nope 128, rope 64, v 128) run on warpgroup MMA (the default; the same bits) in
// tiles of up to flash_tile_rows(d) = 128 rows, over kvx converted to bf16 in place first (kvx_to_bf16: each row's
// 256 floats become its first 256 bf16); set_flash_wg(false): the mma.sync kernel over fp32 kvx, 64-row tiles.
bool flash_wg_ok(const AttnDims& d);
int flash_tile_rows(const AttnDims& d);
void set_flash_wg(bool on);
void kvx_to_bf16(float* kvx, int64_t n_rows, cudaStream_t s);
void attention_expanded_tiles(const AttnDims& d, const float* q, const AttnRow* rows, const AttnTile* tiles, int n_tiles,
                              float* out, cudaStream_t s);
// Whether the tensor-core decode kernel takes these dimensions (C a multiple of 32 up to 512, dr of 16 up to 128);
// others run the CUDA-core kernel. mla_splits: how many parts the cached tokens are split into (enough blocks to
// fill `sms` multiprocessors twice).
bool mla_fast_path(const AttnDims& d);
int mla_splits(const AttnDims& d, int n_rows, int max_len, int sms);
// Batch-invariant split of one row's cached tokens: its tokens per split from its own length alone (parts of about
// kMlaRowChunk tokens, at most kMlaMaxSplits of them), so its result is the same bits in any batch.
constexpr int kMlaRowChunk = 512;
int mla_row_chunk(int len);
// Tensor copies (TMA) for the decode attention kernel's cache tiles (rope 64, kv_lora 128/256/512): writes two
// tensor maps per row (its latent and rope cache, kMlaMapBytes each) into host memory at `out` (aligned to 128
// bytes), to be uploaded and passed as kv_maps. False where the path does not apply (dimensions, the driver's
// encoder unavailable, or set_mla_tma(false)); the kernel then loads with cp.async.
constexpr int kMlaMapBytes = 128;
bool mla_tma_maps(const AttnDims& d, const AttnRow* rows, int n_rows, void* out);
// Benchmarks and tests: tensor copies on (default) or off (the cp.async loads); how many launches used them.
void set_mla_tma(bool on);
int64_t mla_tma_launches();
// Benchmarks and tests: on the tensor-copy path, the kernel with specialized warpgroups (64-token tiles; warpgroup 0
// the scores and softmax, each warpgroup half of O) or k_mla_wg (32-token tiles, both warpgroups on every step):
// mode 0 never the former, 1 (default) for splits of 1024 tokens or more and for per-row splits, 2 always;
// how many launches used the former.
void set_mla_specialized(int mode);
int64_t mla_specialized_launches();
constexpr int kMlaPartPad = 4;  // the split results hold C + kMlaPartPad floats per (row, split, head)
// qlat, olat: scratch [n_rows, heads, C] fp32; part: [n_rows, splits, heads, C + kMlaPartPad] fp32 for the fast path (null:
// the CUDA-core kernel). kv_maps: device copy of mla_tma_maps' output, or null. row_chunks: the rows carry their own
// splits (AttnRow::chunk, the batch-invariant split).
void attention_absorbed(const AttnDims& d, const float* q, const bf16* w_uk, const bf16* w_uvt, const AttnRow* rows,
                        int n_rows, int max_len, int splits, float* qlat, float* olat, float* part, float* out, cudaStream_t s,
                        const void* kv_maps = nullptr, bool row_chunks = false);

// Per row: max, log Σ exp(l − max) in double, the M largest (descending, ties to the lower id).
// scratch: logits_top_scratch(R, V, M) bytes of device memory.
size_t logits_top_scratch(int64_t R, int64_t V, int M);
void logits_top(const float* lg, int64_t R, int64_t V, int M, float* max, double* log_sum, float* top_v, int32_t* top_i,
                void* scratch, cudaStream_t s);

// Whole-row sampling with the caller's uniform draw (model/logits.hpp's rule); scratch [n, V] doubles.
struct RowDrawD {
  double temperature, top_p, u;
};
void sample_rows(const float* lg, int64_t V, const int64_t* rows, const RowDrawD* draws, int n, double* scratch,
                 int32_t* tok, float* logit, cudaStream_t s);

// Row ops (RowOp of backend.hpp) grouped by row: row r_k = rows[k] takes ops [seg[k], seg[k+1]) in order.
struct DRowOp {
  int kind;  // 0 add, 1 project
  int vec;   // index into the vectors
  float add_coef;
  double target, vnorm;
};
void apply_row_ops(float* data, int64_t width, const int64_t* rows, const int* seg, int n_rows, const DRowOp* ops,
                   const float* vecs, cudaStream_t s);

}  // namespace kscope::cuda
