#include <mma.h>

#include <cfloat>
#include <atomic>
#include <climits>
#include <mutex>
#include <unordered_map>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "backend/cuda/kernels.cuh"
#include "backend/cuda/tma.cuh"
#include "backend/cuda/wgmma.cuh"

#include <cudaTypedefs.h>

namespace kscope::cuda {

namespace {

__device__ __forceinline__ float bf(bf16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float fp8(uint8_t b) {
  __nv_fp8_e4m3 f;
  f.__x = b;
  return static_cast<float>(f);
}

// Sum over a warp; every lane ends with the identical value (the butterfly adds the same pairs on both sides).
__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Maximum over a warp (exact in any order); every lane ends with it.
__device__ __forceinline__ float warp_max(float v) {
  for (int m = 16; m >= 1; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

__device__ __forceinline__ uint32_t u32_of(__nv_bfloat162 v) { return *reinterpret_cast<uint32_t*>(&v); }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Opts a kernel in to `bytes` of dynamic shared memory (above the 48 KiB default) on the current device: an
// attribute of the kernel per device, set once per (kernel, device, bytes).
void allow_smem(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::set<std::tuple<const void*, int, int>> done;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> g(mu);
  if (done.insert({kernel, dev, bytes}).second)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Every kernel starts with pdl_entry(): it waits until the kernel before it in the stream has completed and its
// writes are visible (griddepcontrol.wait; a no-op when the launch has no programmatic dependency), then lets the
// next kernel's blocks be launched. launch_k launches with programmatic stream serialization (g_pdl, the default),
// so a kernel's launch and block scheduling overlap the end of the one before it instead of following it. Before the
// wait a kernel only reads weights (which no kernel writes: k_rmsnorm_row's norm weights, k_gemm_few's L2 prefetch),
// so the order of every access to memory that kernels write is what plain launches give.
__device__ __forceinline__ void pdl_entry() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}
bool g_pdl = true;
template <class... P, class... A>
void launch_k(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = g_pdl ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

// A matrix's scales, fp32 (s) or bf16 (s16: INT4 scales as the checkpoint ships them, half the bytes of fp32 —
// 1/8 of an INT4 weight's instead of 1/4, read by every matmul). [] reads either; ld<H> is the hot loops' load
// when the kernel knows the storage (H: bf16, the kernels' SB).
struct SPtr {
  const float* f = nullptr;
  const uint16_t* h = nullptr;
  __device__ __forceinline__ float operator[](int64_t i) const { return h ? __uint_as_float(uint32_t(h[i]) << 16) : f[i]; }
  __device__ __forceinline__ SPtr operator+(int64_t i) const { return {f ? f + i : nullptr, h ? h + i : nullptr}; }
  template <bool H>
  __device__ __forceinline__ float ld(int64_t i) const {
    if constexpr (H) return __uint_as_float(uint32_t(__ldg(h + i)) << 16);
    else return __ldg(f + i);
  }
};
// Expert (group) g's scales.
__device__ __forceinline__ SPtr scales_of(const DLin& W, int g) {
  return {W.s ? W.s + g * W.s_stride : nullptr, W.s16 ? W.s16 + g * W.s_stride : nullptr};
}

// One weight element, dequantized (reference path of gemm_f32).
__device__ __forceinline__ float weight_at(const DLin& W, int64_t n, int64_t k) {
  switch (W.fmt) {
    case kFp8:
      return fp8(W.w[n * W.w_ld + k]) * W.s[(n / W.bo) * W.s_cols + k / W.bi];
    case kInt4: {
      const uint32_t word = reinterpret_cast<const uint32_t*>(W.w + n * W.w_ld)[k / 8];
      return static_cast<float>(static_cast<int>((word >> (4 * (k % 8))) & 15u) - 8) * scales_of(W, 0)[n * W.s_cols + k / W.g];
    }
    default:
      return bf(reinterpret_cast<const bf16*>(W.w + n * W.w_ld)[k]);
  }
}

using namespace nvcuda;
constexpr int kLds = kBK + 8;  // padded smem row (bf16 elements)

// Loads the W tile [kBN rows, kBK cols] starting at (n0, k0) into ws, dequantized to bf16. Thread t handles
// row t/2, 32 consecutive columns. Rows past N and columns past K are zero.
template <int FMT>
__device__ __forceinline__ void load_w_tile(const DLin& W, const uint8_t* wb, SPtr sb, int n0, int k0,
                                            bf16 (*ws)[kLds]) {
  const int r = threadIdx.x >> 1, c0 = (threadIdx.x & 1) * 32;
  const int n = n0 + r, kseg = k0 + c0;
  bf16* dst = &ws[r][c0];
  if (n >= W.N || kseg >= W.K) {
    for (int i = 0; i < 32; ++i) dst[i] = __float2bfloat16(0.0f);
    return;
  }
  const bool full = kseg + 32 <= W.K;
  if constexpr (FMT == kBf16) {
    const bf16* src = reinterpret_cast<const bf16*>(wb + n * W.w_ld) + kseg;
    if (full && (W.K & 7) == 0) {
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      uint4* d4 = reinterpret_cast<uint4*>(dst);
      for (int i = 0; i < 4; ++i) d4[i] = s4[i];
    } else {
      for (int i = 0; i < 32; ++i) dst[i] = kseg + i < W.K ? src[i] : __float2bfloat16(0.0f);
    }
  } else if constexpr (FMT == kFp8) {
    const uint8_t* src = wb + n * W.w_ld + kseg;
    const SPtr srow = sb + (n / W.bo) * W.s_cols;
    if (full && (W.K & 15) == 0 && W.bi % 32 == 0) {
      const float sc = srow[kseg / W.bi];
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      for (int v = 0; v < 2; ++v) {
        const uint4 q = s4[v];
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        for (int j = 0; j < 16; ++j)
          dst[v * 16 + j] = __float2bfloat16(fp8((words[j >> 2] >> (8 * (j & 3))) & 255u) * sc);
      }
    } else {
      for (int i = 0; i < 32; ++i) {
        const int k = kseg + i;
        dst[i] = __float2bfloat16(k < W.K ? fp8(src[i]) * srow[k / W.bi] : 0.0f);
      }
    }
  } else {  // kInt4
    const uint32_t* words = reinterpret_cast<const uint32_t*>(wb + n * W.w_ld) + kseg / 8;
    const SPtr srow = sb + n * W.s_cols;
    uint32_t wv[4];
    if (full && W.w_ld % 16 == 0) {
      const uint4 q = *reinterpret_cast<const uint4*>(words);
      wv[0] = q.x; wv[1] = q.y; wv[2] = q.z; wv[3] = q.w;
    } else {
      const int nw = (W.K + 7) / 8;
      for (int j = 0; j < 4; ++j) wv[j] = kseg / 8 + j < nw ? words[j] : 0u;
    }
    if (full && W.g % 32 == 0) {
      const float sc = srow[kseg / W.g];
      for (int i = 0; i < 32; ++i)
        dst[i] = __float2bfloat16(static_cast<float>(static_cast<int>((wv[i >> 3] >> (4 * (i & 7))) & 15u) - 8) * sc);
    } else {
      for (int i = 0; i < 32; ++i) {
        const int k = kseg + i;
        dst[i] = __float2bfloat16(
            k < W.K ? static_cast<float>(static_cast<int>((wv[i >> 3] >> (4 * (i & 7))) & 15u) - 8) * srow[k / W.g] : 0.0f);
      }
    }
  }
}

// Row tile t of a (grouped) matmul: its group g and rows [r0, r1); false when the tile is past the last group's.
__device__ __forceinline__ bool row_tile(const Groups& gr, int M, int t, int& g, int& r0, int& r1) {
  g = 0;
  if (gr.row_off) {
    if (t >= gr.tile_off[gr.G]) return false;
    int lo = 0, hi = gr.G - 1;  // the last group whose first tile is <= t (empty groups are skipped over)
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (gr.tile_off[mid] <= t) lo = mid; else hi = mid - 1;
    }
    g = lo;
    r0 = gr.row_off[g] + (t - gr.tile_off[g]) * kBM;
    r1 = min(r0 + kBM, gr.row_off[g + 1]);
  } else {
    r0 = t * kBM;
    r1 = min(r0 + kBM, M);
  }
  return r0 < r1;
}

template <int FMT>
__global__ void __launch_bounds__(128) k_gemm(const bf16* __restrict__ X, int M, float* __restrict__ Y, DLin W,
                                              Groups gr) {
  pdl_entry();
  __shared__ __align__(128) bf16 xs[kBM][kLds];
  __shared__ __align__(128) bf16 ws[kBN][kLds];
  __shared__ __align__(128) float cs[kBM][kBN + 4];
  const int n0 = blockIdx.x * kBN;
  const int t = blockIdx.y;
  int g, r0, r1;
  if (!row_tile(gr, M, t, g, r0, r1)) return;
  const uint8_t* wb = W.w + g * W.w_stride;
  const SPtr sb = scales_of(W, g);
  const int warp = threadIdx.x >> 5;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  const int xr = threadIdx.x >> 2, xc = (threadIdx.x & 3) * 16;
  for (int k0 = 0; k0 < W.K; k0 += kBK) {
    {  // X tile: thread loads row xr, 16 columns at xc
      const int row = r0 + xr, k = k0 + xc;
      bf16* dst = &xs[xr][xc];
      if (row < r1 && (W.K & 7) == 0) {
        const bf16* src = X + static_cast<int64_t>(row) * W.K + k;
        for (int h = 0; h < 2; ++h)
          reinterpret_cast<uint4*>(dst)[h] = k + 8 * h < W.K ? reinterpret_cast<const uint4*>(src)[h] : make_uint4(0, 0, 0, 0);
      } else {
        for (int i = 0; i < 16; ++i)
          dst[i] = row < r1 && k + i < W.K ? X[static_cast<int64_t>(row) * W.K + k + i] : __float2bfloat16(0.0f);
      }
    }
    load_w_tile<FMT>(W, wb, sb, n0, k0, ws);
    __syncthreads();
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
      wmma::load_matrix_sync(b, &ws[warp * 16][kk], kLds);
      for (int mi = 0; mi < 2; ++mi) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::load_matrix_sync(a, &xs[mi * 16][kk], kLds);
        wmma::mma_sync(acc[mi], a, b, acc[mi]);
      }
    }
    __syncthreads();
  }
  for (int mi = 0; mi < 2; ++mi) wmma::store_matrix_sync(&cs[mi * 16][warp * 16], acc[mi], kBN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kBM * kBN; i += blockDim.x) {
    const int r = i / kBN, c = i % kBN;
    if (r0 + r < r1 && n0 + c < W.N) Y[static_cast<int64_t>(r0 + r) * W.N + n0 + c] = cs[r][c];
  }
}

// ---- the pipelined variant: the same tiles and the same chain of mma operations per output element (so the
// same bits), with the global loads of the next stages in flight (cp.async) while the current one is multiplied.
// For K % 64 == 0 (and FP8 blocks / INT4 groups that tile it), which every real layer satisfies.

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16_s(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

constexpr int kStages = 4;
// raw weight bytes per stage row: bf16 padded like the mma tile, fp8 64 bytes, int4 32 bytes
template <int FMT>
__host__ __device__ constexpr int raw_row_bytes() { return FMT == kBf16 ? kLds * 2 : FMT == kFp8 ? 64 : 32; }
template <int FMT>
constexpr size_t pipe_smem() {
  return kStages * (size_t(kBM) * kLds * 2 + size_t(kBN) * raw_row_bytes<FMT>()) +
         (FMT == kBf16 ? 0 : size_t(kBN) * kLds * 2) + size_t(kBM) * (kBN + 4) * 4;
}

template <int FMT>
__global__ void __launch_bounds__(128) k_gemm_pipe(const bf16* __restrict__ X, int M, float* __restrict__ Y, DLin W,
                                                   float* __restrict__ Y2, DLin W2, Groups gr) {
  pdl_entry();
  if (blockIdx.z == 1) {  // the second matmul of a pair over the same X (gate and up): one launch for both
    W = W2;
    Y = Y2;
  }
  extern __shared__ __align__(128) uint8_t smem[];
  auto* xst = reinterpret_cast<bf16*>(smem);                                        // [S][kBM][kLds]
  uint8_t* wst = smem + kStages * kBM * kLds * 2;                                    // [S][kBN][raw]
  auto* wcv = reinterpret_cast<bf16*>(wst + kStages * kBN * raw_row_bytes<FMT>());   // [kBN][kLds] (fp8/int4)
  auto* cs = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(wcv) + (FMT == kBf16 ? 0 : kBN * kLds * 2));
  constexpr int RB = raw_row_bytes<FMT>();
  const int n0 = blockIdx.x * kBN;
  const int t = blockIdx.y;
  int g, r0, r1;
  if (!row_tile(gr, M, t, g, r0, r1)) return;
  const uint8_t* wb = W.w + g * W.w_stride;
  const SPtr sb = scales_of(W, g);
  const int nk = W.K / kBK;
  auto issue = [&](int kt) {
    const int st = kt % kStages, k0 = kt * kBK;
    bf16* xs = xst + st * kBM * kLds;
    for (int c = threadIdx.x; c < kBM * 8; c += 128) {  // 32 rows x 8 chunks of 16 bytes
      const int row = c >> 3, col = (c & 7) * 8;
      const bool ok = r0 + row < r1;
      cp_async16(xs + row * kLds + col, X + static_cast<int64_t>(ok ? r0 + row : r0) * W.K + k0 + col, ok ? 16 : 0);
    }
    uint8_t* ws = wst + st * kBN * RB;
    constexpr int chunks = (FMT == kBf16 ? 128 : FMT == kFp8 ? 64 : 32) / 16;  // 16-byte chunks per weight row
    for (int c = threadIdx.x; c < kBN * chunks; c += 128) {
      const int row = c / chunks, ch = c % chunks;
      const int n = n0 + row;
      const bool ok = n < W.N;
      const int64_t kb = FMT == kBf16 ? int64_t(k0) * 2 : FMT == kFp8 ? k0 : k0 / 2;  // byte offset of k0
      cp_async16(ws + row * RB + ch * 16, wb + static_cast<int64_t>(ok ? n : n0) * W.w_ld + kb + ch * 16, ok ? 16 : 0);
    }
  };
  const int warp = threadIdx.x >> 5;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int kt = 0; kt < kStages - 1; ++kt) {
    if (kt < nk) issue(kt);
    cp_async_commit();
  }
  // The dequantization scale of this thread's weight row segment, read one tile ahead so its latency hides
  // behind the current tile's products (FP8: one per 128x128 block; INT4: one per group of 32).
  const int my_r = threadIdx.x >> 1, my_c0 = (threadIdx.x & 1) * 32, my_n = n0 + my_r;
  auto scale_of = [&](int kt) -> float {
    if constexpr (FMT == kBf16) return 0.0f;
    if (my_n >= W.N || kt >= nk) return 0.0f;
    const int k = kt * kBK + my_c0;
    return FMT == kFp8 ? sb[(my_n / W.bo) * W.s_cols + k / W.bi] : sb[my_n * W.s_cols + k / W.g];
  };
  float sc_next = scale_of(0);
  for (int kt = 0; kt < nk; ++kt) {
    const float sc = sc_next;
    sc_next = scale_of(kt + 1);
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; everyone is done with iteration kt-1
    const int st = kt % kStages;
    // refill the stage iteration kt-1 used (free since the barrier above) before working on this one
    if (kt + kStages - 1 < nk) issue(kt + kStages - 1);
    cp_async_commit();
    const bf16* xs = xst + st * kBM * kLds;
    const bf16* wt;
    if constexpr (FMT == kBf16) {
      wt = reinterpret_cast<const bf16*>(wst + st * kBN * RB);
    } else {
      // dequantize the raw tile to bf16 exactly as load_w_tile does (same values, so the same products): the
      // thread's 32 weights come in as 16/32 bytes and go out as four 16-byte stores
      const uint8_t* raw = wst + st * kBN * RB + my_r * RB;
      __align__(16) bf16 out[32];
      if (my_n >= W.N) {
        for (int i = 0; i < 32; ++i) out[i] = __float2bfloat16(0.0f);
      } else if constexpr (FMT == kFp8) {
        const uint4 a = reinterpret_cast<const uint4*>(raw + my_c0)[0], b = reinterpret_cast<const uint4*>(raw + my_c0)[1];
        const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        for (int j = 0; j < 32; ++j) out[j] = __float2bfloat16(fp8((w[j >> 2] >> (8 * (j & 3))) & 255u) * sc);
      } else {
        const uint4 a = reinterpret_cast<const uint4*>(raw + my_c0 / 2)[0];
        const uint32_t w[4] = {a.x, a.y, a.z, a.w};
        for (int j = 0; j < 32; ++j)
          out[j] = __float2bfloat16(static_cast<float>(static_cast<int>((w[j >> 3] >> (4 * (j & 7))) & 15u) - 8) * sc);
      }
      uint4* dst = reinterpret_cast<uint4*>(wcv + my_r * kLds + my_c0);
      for (int i = 0; i < 4; ++i) dst[i] = reinterpret_cast<const uint4*>(out)[i];
      __syncthreads();
      wt = wcv;
    }
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
      wmma::load_matrix_sync(b, wt + warp * 16 * kLds + kk, kLds);
      for (int mi = 0; mi < 2; ++mi) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::load_matrix_sync(a, xs + mi * 16 * kLds + kk, kLds);
        wmma::mma_sync(acc[mi], a, b, acc[mi]);
      }
    }
  }
  cp_async_wait<0>();
  for (int mi = 0; mi < 2; ++mi) wmma::store_matrix_sync(cs + mi * 16 * (kBN + 4) + warp * 16, acc[mi], kBN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kBM * kBN; i += blockDim.x) {
    const int r = i / kBN, c = i % kBN;
    if (r0 + r < r1 && n0 + c < W.N) Y[static_cast<int64_t>(r0 + r) * W.N + n0 + c] = cs[r * (kBN + 4) + c];
  }
}

bool g_simple_gemm = false;

// 8 bf16 weights (one 16-byte load) as floats
__device__ __forceinline__ void unpack_w8(const uint4& wv, float (&wf)[8]) {
  const uint32_t ws[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ws[i]));
    wf[2 * i] = f.x;
    wf[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load_w8(const bf16* w, float (&wf)[8]) { unpack_w8(__ldg(reinterpret_cast<const uint4*>(w)), wf); }
// x[0..8) · w[0..8), left to right (the fp32 matmuls' piece: its order is part of their bits)
__device__ __forceinline__ float dot8(const float4& a, const float4& b, const float (&wf)[8]) {
  return a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] + b.z * wf[6] + b.w * wf[7];
}
// acc[r] += x[r][0..8) · w[0..8) for up to 4 rows x (row stride ldx, 16-byte aligned) and 8 bf16 weights
__device__ __forceinline__ void dot8_rows(const float (&wf)[8], const float* x, int64_t ldx, int rows, float (&acc)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
    if (r < rows) {
      const float4* xp = reinterpret_cast<const float4*>(x + r * ldx);
      acc[r] += dot8(xp[0], xp[1], wf);
    }
}
__device__ __forceinline__ void dot8_rows(const bf16* w, const float* x, int64_t ldx, int rows, float (&acc)[4]) {
  float wf[8];
  load_w8(w, wf);
  dot8_rows(wf, x, ldx, rows, acc);
}

// One warp per output feature and up to 4 rows (the weights read once for them), fp32 inputs: exact dequantized
// weights times fp32 activations. BF16 weights with K % 8 == 0 (routers) come in 16 bytes per lane.
__global__ void k_gemm_f32(const float* __restrict__ X, int M, float* __restrict__ Y, DLin W) {
  pdl_entry();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * 4 + warp, m0 = blockIdx.y * 4;
  if (n >= W.N) return;
  const int mr = min(4, M - m0);
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (W.fmt == kBf16 && (W.K & 7) == 0) {
    const bf16* wr = reinterpret_cast<const bf16*>(W.w + n * W.w_ld);
    for (int k = lane * 8; k < W.K; k += 256) dot8_rows(wr + k, X + static_cast<int64_t>(m0) * W.K + k, W.K, mr, acc);
  } else {
    for (int k = lane; k < W.K; k += 32) {
      const float w = weight_at(W, n, k);
      for (int r = 0; r < mr; ++r) acc[r] += X[static_cast<int64_t>(m0 + r) * W.K + k] * w;
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && r < mr) Y[static_cast<int64_t>(m0 + r) * W.N + n] = v;
  }
}

__global__ void k_f32_to_bf16(const float* x, bf16* y, int64_t n) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}
__global__ void k_fill(float* p, float v, int64_t n) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) p[i] = v;
}
__global__ void k_add(float* y, const float* x, int64_t n) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) y[i] += x[i];
}
// grid (rows, column blocks of 4 * blockDim) for the row copies: each thread 4 columns
__global__ void k_embed(const bf16* table, int64_t H, const int32_t* ids, float* out) {
  pdl_entry();
  const int64_t t = blockIdx.x;
  const bf16* row = table + static_cast<int64_t>(ids[t]) * H;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * 4;
  if (c >= H) return;
  if ((H & 3) == 0) {
    const uint2 v = *reinterpret_cast<const uint2*>(row + c);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
    *reinterpret_cast<float4*>(out + t * H + c) = make_float4(a.x, a.y, b.x, b.y);
  } else {
    for (int64_t j = c; j < min(H, c + 4); ++j) out[t * H + j] = bf(row[j]);
  }
}
__global__ void k_gather_rows(const float* src, const int64_t* rows, int64_t width, float* dst) {
  pdl_entry();
  const int64_t i = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * 4;
  if (c >= width) return;
  const float* s = src + rows[i] * width;
  if ((width & 3) == 0) {
    *reinterpret_cast<float4*>(dst + i * width + c) = *reinterpret_cast<const float4*>(s + c);
  } else {
    for (int64_t j = c; j < min(width, c + 4); ++j) dst[i * width + j] = s[j];
  }
}
__global__ void k_silu_mul(const float* g, const float* u, int64_t n, bf16* out) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = g[i];
    out[i] = __float2bfloat16(a / (1.0f + expf(-a)) * u[i]);
  }
}

// Sum of v over the block (every thread gets it): warps first, then the warps' sums by warp 0. part: 32 floats of
// shared memory.
__device__ __forceinline__ float block_sum(float v, float* part) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
    w = warp_sum(w);
    if (threadIdx.x == 0) part[0] = w;
  }
  __syncthreads();
  return part[0];
}

__global__ void k_rope(float* x, int64_t row_stride, int64_t head_stride, int64_t offset, int dim, const int64_t* pos,
                       const float* inv_freq, float attn_factor, bool interleaved) {
  pdl_entry();
  const int64_t r = blockIdx.x, h = blockIdx.y;
  float* v = x + r * row_stride + h * head_stride + offset;
  const int half = dim / 2;
  float out0[2], out1[2];
  int n_mine = 0;
  for (int i = threadIdx.x; i < half; i += blockDim.x, ++n_mine) {
    const float f = inv_freq[i] * static_cast<float>(pos[r]);
    const float cs = cosf(f) * attn_factor, sn = sinf(f) * attn_factor;
    const float a = interleaved ? v[2 * i] : v[i];
    const float c = interleaved ? v[2 * i + 1] : v[i + half];
    out0[n_mine] = a * cs - c * sn;
    out1[n_mine] = c * cs + a * sn;
  }
  __syncthreads();  // every pair read before any is written
  n_mine = 0;
  for (int i = threadIdx.x; i < half; i += blockDim.x, ++n_mine) {
    v[i] = out0[n_mine];
    v[i + half] = out1[n_mine];
  }
}

// (value, index) ordering of the router's serial scan: larger first, then the lower index; index -1 is "none".
__device__ __forceinline__ bool route_better(float v, int i, float w, int j) {
  return i >= 0 && (j < 0 || v > w || (v == w && i < j));
}
// the best of the warp's (bv, bi) by route_better; every lane ends with it
__device__ __forceinline__ void warp_route_best(float& bv, int& bi) {
  for (int m = 16; m >= 1; m >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, m);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, m);
    if (route_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
  }
}

// A group's score for the group-limited methods: the sum of its two best choice values (noaux_tc, method 2) or
// its best score (group_limited_greedy), as the reference's serial loop computes it.
__device__ __forceinline__ float route_group_score(const float* c, int per, int method) {
  float x = -INFINITY, y = -INFINITY;
  if (method == 2) {
    for (int i = 0; i < per; ++i) {
      if (c[i] > x) { y = x; x = c[i]; } else if (c[i] > y) y = c[i];
    }
    return x + y;
  }
  for (int i = 0; i < per; ++i) x = fmaxf(x, c[i]);
  return x;
}

// One warp per token, kRouteWarps tokens per block, no block-wide barriers: the token's scores, choices and taken
// flags in its warp's shared memory. Each of the K picks is a warp-wide argmax over the untaken experts with the
// serial scan's order (larger, then lower index), so the choices and the weights' summation order are those of a
// one-thread scan; the softmax's sum too is taken serially, in expert order, by one lane. The bias is a weight (no
// kernel writes it): staged before the wait for the logits. A warp runs its token alone (one token per decode
// step), so its time is its instruction count times their latency (ncu: ~6.5 cycles per instruction, 3200
// instructions per token when every pick scanned every candidate): up to kRouteCap · 32 experts the candidates sit
// in registers. kRouteLoads: loads in flight per lane.
constexpr int kRouteWarps = 4, kRouteLoads = 16, kRouteCap = 16;
__host__ __device__ constexpr int route_warp_floats(int E) { return 2 * E + 64 + 64 + (E + 3) / 4; }
__global__ void __launch_bounds__(kRouteWarps * 32) k_route(RouteArgs a, const float* logits, const float* bias,
                                                            int64_t n, int32_t* idx, float* weight) {
  extern __shared__ float sm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, E = a.E;
  float* scores = sm + warp * route_warp_floats(E);
  float* choice = scores + E;
  float* gscore = choice + E;                            // [G <= 64]
  int* sel = reinterpret_cast<int*>(gscore + 64);        // [K <= 64]
  char* taken = reinterpret_cast<char*>(sel + 64);       // [E]
  // v[i] for the lane's i < E into f(i, v[i]): kRouteLoads loads in flight per lane (one memory latency for
  // E <= 512 where a loop of dependent iterations waits once per element)
  auto each = [&](const float* v, auto f) {
    for (int i0 = 0; i0 < E; i0 += 32 * kRouteLoads) {
      float r[kRouteLoads];
#pragma unroll
      for (int u = 0; u < kRouteLoads; ++u) r[u] = i0 + u * 32 + lane < E ? v[i0 + u * 32 + lane] : 0.0f;
#pragma unroll
      for (int u = 0; u < kRouteLoads; ++u)
        if (i0 + u * 32 + lane < E) f(i0 + u * 32 + lane, r[u]);
    }
  };
  if (bias) each(bias, [&](int i, float b) { choice[i] = b; });
  else
    for (int i = lane; i < E; i += 32) choice[i] = 0.0f;
  for (int i = lane; i < E; i += 32) taken[i] = 0;
  pdl_entry();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (t >= n) return;
  const float* l = logits + t * E;
  if (a.sigmoid) {
    each(l, [&](int i, float x) { scores[i] = 1.0f / (1.0f + expf(-x)); });
  } else {
    float mx = -INFINITY;
    each(l, [&](int i, float x) {
      scores[i] = x;
      mx = fmaxf(mx, x);
    });
    for (int m = 16; m >= 1; m >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, m));
    for (int i = lane; i < E; i += 32) scores[i] = expf(scores[i] - mx);
    __syncwarp();
    float s = 0;
    if (lane == 0)
      for (int i = 0; i < E; ++i) s += scores[i];
    s = __shfl_sync(0xffffffffu, s, 0);
    for (int i = lane; i < E; i += 32) scores[i] /= s;
  }
  for (int i = lane; i < E; i += 32) choice[i] += scores[i];  // (the bias + the score: scores[i] + bias[i])
  __syncwarp();
  // the warp's best untaken candidate among v[0, cnt) (flag: taken), by route_better; every lane gets it
  auto argmax = [&](auto value, auto skip, int cnt) {
    float bv = 0.0f;
    int bi = -1;
    for (int i = lane; i < cnt; i += 32)
      if (!skip(i) && route_better(value(i), i, bv, bi)) { bv = value(i); bi = i; }
    warp_route_best(bv, bi);
    return bi;
  };
  if (a.method != 0 && a.G > 1 && a.topk_group < a.G) {
    const int per = E / a.G;
    for (int g = lane; g < a.G; g += 32) gscore[g] = route_group_score((a.method == 2 ? choice : scores) + g * per, per, a.method);
    __syncwarp();
    unsigned long long keep = 0;  // the topk_group best groups (ties to the lower index)
    for (int s = 0; s < a.topk_group; ++s)
      keep |= 1ull << argmax([&](int g) { return gscore[g]; }, [&](int g) { return (keep >> g) & 1ull; }, a.G);
    for (int i = lane; i < E; i += 32)
      if (!((keep >> (i / per)) & 1ull)) choice[i] = -INFINITY;
    __syncwarp();
  }
  if (E <= 32 * kRouteCap) {
    // the lane's candidates (experts lane + 32·j) in registers and its best untaken one kept: a pick is one warp
    // argmax over the lanes' bests, then only the lane whose expert was taken looks again (at K2's 384 experts,
    // top-8: 2870 warp instructions per token against 3200 with an argmax over every candidate per pick)
    float v[kRouteCap];
    unsigned avail = 0;
#pragma unroll
    for (int j = 0; j < kRouteCap; ++j) {
      const bool in = j * 32 + lane < E;
      v[j] = in ? choice[j * 32 + lane] : 0.0f;
      avail |= in ? 1u << j : 0u;
    }
    float lv = 0.0f;
    int li = -1;
    auto mine = [&] {
      lv = 0.0f;
      li = -1;
#pragma unroll
      for (int j = 0; j < kRouteCap; ++j)
        if (((avail >> j) & 1u) && route_better(v[j], j * 32 + lane, lv, li)) { lv = v[j]; li = j * 32 + lane; }
    };
    mine();
    for (int s = 0; s < a.K; ++s) {
      float bv = lv;
      int bi = li;
      warp_route_best(bv, bi);
      if (lane == 0) sel[s] = bi;
      if ((bi & 31) == lane) {
        avail &= ~(1u << (bi >> 5));
        mine();
      }
    }
  } else {
    for (int s = 0; s < a.K; ++s) {
      const int bi = argmax([&](int i) { return choice[i]; }, [&](int i) { return taken[i] != 0; }, E);
      if (lane == 0) {
        sel[s] = bi;
        taken[bi] = 1;
      }
      __syncwarp();
    }
  }
  __syncwarp();
  float sum = 0;
  if (lane == 0)
    for (int s = 0; s < a.K; ++s) sum += scores[sel[s]];
  sum = __shfl_sync(0xffffffffu, sum, 0);
  for (int s = lane; s < a.K; s += 32) {
    float w = scores[sel[s]];
    if (a.norm_topk) w /= (sum + 1e-20f);
    idx[t * a.K + s] = sel[s];
    weight[t * a.K + s] = w * a.scaling;
  }
}

// A router value's order key: larger values have larger keys, -0 and +0 one key, NaN below every number (key 1), 0
// for a thread without an expert; with the lower index first among equal keys, a strict total order that agrees
// with route_better wherever that is one (no NaN).
__device__ __forceinline__ uint32_t route_key(float v) {
  if (v != v) return 1u;
  const uint32_t u = __float_as_uint(v + 0.0f);
  return (u & 0x80000000u ? ~u : u | 0x80000000u) + 1u;
}
// One block per token, thread i holding expert i (E <= kRouteBlockCap): the picks by rank instead of K argmax
// rounds in a row. An expert among the K best is among the K best of its warp (every expert better than it is
// too), so each warp ranks its 32 by their keys and offers its min(K, 32) best; each offered expert's rank among the
// offers is then its rank among all (the experts better than one of the K best are all offered) and those of rank
// < K are the picks, in the serial scan's order. Scores, the choice values, the group stage, the softmax's serial
// sum and the weights are computed as k_route computes them: the same bits. A token's time is a few dependent
// passes instead of K warp argmax rounds and their rescans: ncu at 384 experts, top-8, one token 4.7-5.0 µs against
// k_route's 9.9-10.5 (H100, NOTES 84); the offers' ranks are counted in parts by all the threads (96 threads
// counting 96 each left the block at 9.4 µs, waiting at its barriers).
constexpr int kRouteBlockCap = 1024;
__global__ void __launch_bounds__(kRouteBlockCap) k_route_block(RouteArgs a, const float* logits, const float* bias,
                                                                int32_t* idx, float* weight) {
  __shared__ float scores[kRouteBlockCap];
  __shared__ float cval[kRouteBlockCap];                  // the group stage's values
  __shared__ __align__(16) uint64_t comps[kRouteBlockCap];
  __shared__ uint64_t offers[kRouteBlockCap];             // [warp][min(K, 32)], by rank in the warp
  __shared__ int part[kRouteBlockCap];                    // the offers' partial ranks
  __shared__ float gscore[64];
  __shared__ int sel[64];
  __shared__ float red[32];
  const int i = threadIdx.x, lane = i & 31, warp = i >> 5, E = a.E;
  const bool in = i < E;
  const float b = bias && in ? bias[i] : 0.0f;            // a weight: read before the wait
  pdl_entry();
  const int64_t t = blockIdx.x;
  const float x = in ? logits[t * E + i] : 0.0f;
  float sc;
  if (a.sigmoid) {
    sc = 1.0f / (1.0f + expf(-x));
  } else {
    float mx = warp_max(in ? x : -INFINITY);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
    for (int w = 1; w < (blockDim.x >> 5); ++w) mx = fmaxf(mx, red[w]);
    sc = expf(x - mx);
    if (in) scores[i] = sc;
    __syncthreads();
    if (i == 0) {  // the sum in expert order, as the one-thread reference adds it
      float s = 0;
      for (int e = 0; e < E; ++e) s += scores[e];
      red[0] = s;
    }
    __syncthreads();
    sc /= red[0];
  }
  if (in) scores[i] = sc;
  float choice = b + sc;
  if (a.method != 0 && a.G > 1 && a.topk_group < a.G) {
    const int per = E / a.G;
    if (in) cval[i] = a.method == 2 ? choice : sc;
    __syncthreads();
    if (i < a.G) gscore[i] = route_group_score(cval + i * per, per, a.method);
    __syncthreads();
    if (i < a.G) {  // the group's rank (ties to the lower index): kept if among the topk_group best
      const uint32_t k = route_key(gscore[i]);
      int r = 0;
      for (int g = 0; g < a.G; ++g) {
        const uint32_t o = route_key(gscore[g]);
        r += o > k || (o == k && g < i);
      }
      sel[i] = r < a.topk_group;
    }
    __syncthreads();
    if (in && !sel[i / per]) choice = -INFINITY;
    __syncthreads();  // sel is reused for the picks
  }
  // (key, then the lower index) as one 64-bit value: a larger value is the better expert; 0 for no expert
  const uint64_t comp = (static_cast<uint64_t>(in ? route_key(choice) : 0u) << 32) | static_cast<uint32_t>(~i);
  comps[i] = comp;
  __syncwarp();
  int r = 0, r2 = 0;  // rank in the warp
  const ulonglong2* wc = reinterpret_cast<const ulonglong2*>(comps + warp * 32);
#pragma unroll
  for (int l = 0; l < 16; ++l) {
    const ulonglong2 o = wc[l];
    r += o.x > comp;
    r2 += o.y > comp;
  }
  r += r2;
  const int kc = min(a.K, 32), n_offer = (blockDim.x >> 5) * kc;
  if (r < kc) offers[warp * kc + r] = comp;
  __syncthreads();
  // each offer's rank among the offers, in P parts over the block's threads (K2: 96 offers, 4 parts of 24)
  const int P = blockDim.x / n_offer, per = (n_offer + P - 1) / P, c = i % n_offer, q = i / n_offer;
  if (q < P) {
    const uint64_t mine = offers[c];
    const int d1 = min(n_offer, (q + 1) * per);
    int cnt = 0;
#pragma unroll 4
    for (int d = q * per; d < d1; ++d) cnt += offers[d] > mine;
    part[q * n_offer + c] = cnt;
  }
  __syncthreads();
  if (i < n_offer) {
    const uint64_t mine = offers[i];
    int rank = 0;
    for (int u = 0; u < P; ++u) rank += part[u * n_offer + i];
    if (rank < a.K && (mine >> 32) != 0) sel[rank] = static_cast<int>(~static_cast<uint32_t>(mine));
  }
  __syncthreads();
  if (i < a.K) {  // the weights' sum in pick order, by each of the K threads alike
    float s = 0;
    for (int p = 0; p < a.K; ++p) s += scores[sel[p]];
    float w = scores[sel[i]];
    if (a.norm_topk) w /= (s + 1e-20f);
    idx[t * a.K + i] = sel[i];
    weight[t * a.K + i] = w * a.scaling;
  }
}

// Slot i's place in the router's idx / weight, or -1 for the shared expert's slot (Slots: last of each token's)
__device__ __forceinline__ int64_t routed_slot(const Slots& sl, int64_t i) {
  if (sl.k == sl.kr) return i;
  const int64_t t = i / sl.k;
  const int j = static_cast<int>(i - t * sl.k);
  return j < sl.kr ? t * sl.kr + j : -1;
}
__device__ __forceinline__ int slot_expert(const Slots& sl, int64_t i) {
  const int64_t r = routed_slot(sl, i);
  return r >= 0 ? sl.idx[r] : sl.shared;
}
__global__ void k_moe_count(Slots sl, int64_t n, int* counts) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(&counts[slot_expert(sl, i)], 1);
}
// Offsets of each expert's rows and row tiles, in expert order: one block, each thread a run of experts, a
// Hillis-Steele scan over the threads' sums. counts and cursor may be shared or global memory. Also the row tiles
// by size (Groups::cls_*), in expert order within each class: the three classes' tile counts of a thread packed
// in one 64-bit word (21 bits each: at most 65535 tiles in all), scanned with the rest. A listed tile has at most
// `piece` rows (32 or 16: an expert's rows in pieces of that many, the last piece the rest; its kernel takes
// min(8·NT, the group's rows from the piece's first) rows).
// inclusive sums of three values over the warp's lanes, in lane order
__device__ __forceinline__ void warp_scan3(int& a, int& b, unsigned long long& c) {
  const int lane = threadIdx.x & 31;
  for (int d = 1; d < 32; d <<= 1) {
    const int oa = __shfl_up_sync(0xffffffffu, a, d), ob = __shfl_up_sync(0xffffffffu, b, d);
    const unsigned long long oc = __shfl_up_sync(0xffffffffu, c, d);
    if (lane >= d) { a += oa; b += ob; c += oc; }
  }
}
constexpr int kScanThreads = 512;  // a multiple of 32, at most 1024 (moe_offsets: one warp scans the warps)
__device__ __forceinline__ int tile_class(int rows) { return rows <= 8 ? 0 : rows <= 16 ? 1 : 2; }
__device__ void moe_offsets(const int* counts, int E, int* row_off, int* tile_off, int* cursor, int* cls_count,
                            int2* cls_tiles, int cls_cap, int piece) {
  const int per = (E + kScanThreads - 1) / kScanThreads;
  const int e0 = min(E, static_cast<int>(threadIdx.x) * per), e1 = min(E, e0 + per);
  int r = 0, t = 0;
  unsigned long long c = 0;
  for (int e = e0; e < e1; ++e) {
    r += counts[e];
    t += (counts[e] + kBM - 1) / kBM;
    for (int left = counts[e]; left > 0; left -= piece) c += 1ull << (21 * tile_class(min(left, piece)));
  }
  // the threads' inclusive sums: within each warp by shuffles, then the warps' totals by warp 0 (two barriers)
  constexpr int kWarps = kScanThreads / 32;
  __shared__ int wr[kWarps], wt[kWarps];
  __shared__ unsigned long long wc[kWarps];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int ir = r, it = t;
  unsigned long long ic = c;
  warp_scan3(ir, it, ic);
  if (lane == 31) { wr[w] = ir; wt[w] = it; wc[w] = ic; }
  __syncthreads();
  if (w == 0) {  // the warps' exclusive offsets
    int xr = lane < kWarps ? wr[lane] : 0, xt = lane < kWarps ? wt[lane] : 0;
    unsigned long long xc = lane < kWarps ? wc[lane] : 0;
    const int or_ = xr, ot = xt;
    const unsigned long long oc = xc;
    warp_scan3(xr, xt, xc);
    if (lane < kWarps) { wr[lane] = xr - or_; wt[lane] = xt - ot; wc[lane] = xc - oc; }
  }
  __syncthreads();
  ir += wr[w];
  it += wt[w];
  ic += wc[w];
  r = ir - r;  // exclusive
  t = it - t;
  c = ic - c;
  int ci[3] = {static_cast<int>(c & 0x1fffff), static_cast<int>((c >> 21) & 0x1fffff), static_cast<int>(c >> 42)};
  for (int e = e0; e < e1; ++e) {
    row_off[e] = r;
    tile_off[e] = t;
    cursor[e] = r;
    for (int left = counts[e], r0 = r; left > 0; left -= piece, r0 += piece) {
      const int k = tile_class(min(left, piece));
      if (ci[k] < cls_cap) cls_tiles[k * cls_cap + ci[k]] = make_int2(e, r0);
      ++ci[k];
    }
    r += counts[e];
    t += (counts[e] + kBM - 1) / kBM;
  }
  if (threadIdx.x == kScanThreads - 1) {
    row_off[E] = ir;
    tile_off[E] = it;
    const unsigned long long all = ic;
    cls_count[0] = static_cast<int>(all & 0x1fffff);
    cls_count[1] = static_cast<int>((all >> 21) & 0x1fffff);
    cls_count[2] = static_cast<int>(all >> 42);
  }
  __syncthreads();
}
__global__ void __launch_bounds__(kScanThreads) k_moe_scan(const int* counts, int E, int* row_off, int* tile_off,
                                                           int* cursor, int* cls_count, int2* cls_tiles, int cls_cap,
                                                           int piece) {
  pdl_entry();
  moe_offsets(counts, E, row_off, tile_off, cursor, cls_count, cls_tiles, cls_cap, piece);
}
// The whole permutation in one block for few routed slots (decode steps): counts, offsets and cursors in shared
// memory, one launch instead of a memset and three.
constexpr int kPermuteSmallSlots = 4096, kPermuteSmallExperts = 2048;
__global__ void __launch_bounds__(kScanThreads) k_moe_permute_small(Slots sl, int n, int E, int* row_off,
                                                                    int* tile_off, int* perm, int* slot_pos,
                                                                    int* cls_count, int2* cls_tiles, int cls_cap,
                                                                    int piece) {
  pdl_entry();
  __shared__ int counts[kPermuteSmallExperts], cursor[kPermuteSmallExperts];
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&counts[slot_expert(sl, i)], 1);
  __syncthreads();
  moe_offsets(counts, E, row_off, tile_off, cursor, cls_count, cls_tiles, cls_cap, piece);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int p = atomicAdd(&cursor[slot_expert(sl, i)], 1);
    perm[p] = i;
    slot_pos[i] = p;
  }
}
__global__ void k_moe_scatter(Slots sl, int64_t n, int* cursor, int* perm, int* slot_pos) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int p = atomicAdd(&cursor[slot_expert(sl, i)], 1);
    perm[p] = static_cast<int>(i);
    slot_pos[i] = p;
  }
}
// grid (slots, column blocks of 4 * blockDim); H % 4 == 0 takes 16-byte loads
__global__ void k_moe_gather(const float* x, const int* perm, int k, int64_t H, bf16* xp) {
  pdl_entry();
  const int64_t p = blockIdx.x;
  const float* src = x + static_cast<int64_t>(perm[p] / k) * H;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * 4;
  if (c >= H) return;
  if ((H & 3) == 0) {
    const float4 v = *reinterpret_cast<const float4*>(src + c);
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(xp + p * H + c);
    d[0] = __floats2bfloat162_rn(v.x, v.y);
    d[1] = __floats2bfloat162_rn(v.z, v.w);
  } else {
    for (int64_t j = c; j < min(H, c + 4); ++j) xp[p * H + j] = __float2bfloat16(src[j]);
  }
}
// grid (tokens, column blocks of 4 * blockDim): each thread 4 columns, the token's slots in ascending expert id
__global__ void k_moe_combine(const float* D, const int* slot_pos, Slots sl, int64_t H, float* out) {
  pdl_entry();
  __shared__ int ids[64];
  __shared__ int64_t base[64];
  __shared__ float wgt[64];
  const int64_t t = blockIdx.x;
  // slots in ascending expert id, ties in slot order (a stable sort; k <= 64 <= blockDim): the k threads load
  // their slot's id together, then each puts its slot at its rank
  const int k = sl.k;
  int my = 0, pos = 0;
  float w = 0.0f;
  if (threadIdx.x < k) {  // the slot's id, position and weight: loads in flight together
    const int64_t r = routed_slot(sl, t * k + threadIdx.x);
    my = r >= 0 ? sl.idx[r] : sl.shared;
    w = r >= 0 ? sl.weight[r] : 1.0f;
    pos = slot_pos[t * k + threadIdx.x];
    ids[threadIdx.x] = my;
  }
  __syncthreads();
  if (threadIdx.x < k) {
    const int s = threadIdx.x;
    int rank = 0;
    for (int j = 0; j < k; ++j) rank += ids[j] < my || (ids[j] == my && j < s);
    base[rank] = static_cast<int64_t>(pos) * H;
    wgt[rank] = w;
  }
  __syncthreads();
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * 4;
  if (c >= H) return;
  if ((H & 3) == 0) {
    float4 acc = make_float4(0, 0, 0, 0);
    for (int s0 = 0; s0 < k; s0 += 8) {  // eight slots' loads in flight, then their sum in slot order
      float4 d[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (s0 + u < k) d[u] = *reinterpret_cast<const float4*>(D + base[s0 + u] + c);
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (s0 + u < k) {
          const float w = wgt[s0 + u];
          acc.x += d[u].x * w;
          acc.y += d[u].y * w;
          acc.z += d[u].z * w;
          acc.w += d[u].w * w;
        }
    }
    *reinterpret_cast<float4*>(out + t * H + c) = acc;
  } else {
    for (int64_t j = c; j < min(H, c + 4); ++j) {
      float acc = 0;
      for (int s = 0; s < k; ++s) acc += D[base[s] + j] * wgt[s];
      out[t * H + j] = acc;
    }
  }
}

__global__ void k_kv_append(const float* latent, const float* ckv, int64_t row0, int64_t n, int64_t C, int64_t dr,
                            bf16* lat_dst, bf16* rope_dst) {
  pdl_entry();
  const int64_t w = C + dr;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * w; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / w, c = i % w;
    if (c < C) lat_dst[r * C + c] = __float2bfloat16(latent[(row0 + r) * C + c]);
    else rope_dst[r * dr + (c - C)] = __float2bfloat16(ckv[(row0 + r) * w + c]);
  }
}

// Online-softmax state of one warp merged across the block's warps; writes o / l.
template <int NW, int VM>
__device__ void merge_warps(float mx, float l, const float (&o)[VM], int width, float* sm_m, float* sm_l, float* sm_o,
                            float* dst) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) { sm_m[warp] = mx; sm_l[warp] = l; }
  for (int m = 0; m < VM; ++m)
    if (lane + 32 * m < width) sm_o[warp * VM * 32 + lane + 32 * m] = o[m];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w]);
  float L = 0;
  for (int w = 0; w < NW; ++w) L += sm_m[w] == -INFINITY ? 0.0f : sm_l[w] * expf(sm_m[w] - M);
  for (int d = threadIdx.x; d < width; d += blockDim.x) {
    float acc = 0;
    for (int w = 0; w < NW; ++w)
      if (sm_m[w] != -INFINITY) acc += sm_o[w * VM * 32 + d] * expf(sm_m[w] - M);
    dst[d] = acc / L;
  }
}

constexpr int kNW = 4;

template <int DM>  // dn, dv <= 32*DM; dr <= 128
__global__ void __launch_bounds__(128) k_attn_expanded(AttnDims d, const float* q, const AttnRow* rows, float* out) {
  pdl_entry();
  __shared__ float sm_m[kNW], sm_l[kNW], sm_o[kNW * DM * 32];
  const AttnRow r = rows[blockIdx.x];
  const int h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int dq = d.dn + d.dr, dkv = d.dn + d.dv;
  const float* qh = q + static_cast<int64_t>(r.q_row) * d.nh * dq + h * dq;
  float qn[DM], qr[4], o[DM];
  for (int m = 0; m < DM; ++m) { qn[m] = lane + 32 * m < d.dn ? qh[lane + 32 * m] : 0.0f; o[m] = 0.0f; }
  for (int m = 0; m < 4; ++m) qr[m] = lane + 32 * m < d.dr ? qh[d.dn + lane + 32 * m] : 0.0f;
  float mx = -INFINITY, l = 0;
  for (int j = warp; j < r.len; j += kNW) {
    const float* kj = r.kvx + (static_cast<int64_t>(j) * d.nh + h) * dkv;
    const bf16* rj = r.k_rope + static_cast<int64_t>(j) * d.dr;
    float s = 0;
    for (int m = 0; m < DM; ++m)
      if (lane + 32 * m < d.dn) s += qn[m] * kj[lane + 32 * m];
    for (int m = 0; m < 4; ++m)
      if (lane + 32 * m < d.dr) s += qr[m] * bf(rj[lane + 32 * m]);
    s = warp_sum(s) * d.scale;
    const float mn = fmaxf(mx, s), corr = expf(mx - mn), p = expf(s - mn);
    l = l * corr + p;
    for (int m = 0; m < DM; ++m)
      if (lane + 32 * m < d.dv) o[m] = o[m] * corr + p * kj[d.dn + lane + 32 * m];
    mx = mn;
  }
  merge_warps<kNW, DM>(mx, l, o, d.dv, sm_m, sm_l, sm_o,
                       out + static_cast<int64_t>(r.q_row) * d.nh * d.dv + h * d.dv);
}

// Absorbed decode attention: q_lat = W_UK[h]ᵀ q_nope per row and head (k_qlat16, below), then
// (2) softmax(q_lat·latent + q_rope·k_rope) over the cached tokens, o_lat = Σ p·latent. One block per (row, group
// of HG heads), one warp per head: a tile of TJ cached tokens is read from memory once for all HG heads.
template <int CM, int HG>
__global__ void __launch_bounds__(HG * 32) k_attn_latent(AttnDims d, const float* q, const float* qlat,
                                                         const AttnRow* rows, float* olat) {
  pdl_entry();
  constexpr int TJ = CM <= 16 ? 32 : 16;  // tokens per tile (at most one per lane after the reduce-scatter)
  __shared__ __align__(16) bf16 lat_s[TJ * CM * 32];
  __shared__ __align__(16) bf16 rope_s[TJ * 128];
  const AttnRow r = rows[blockIdx.x];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y * HG + warp;
  const bool live = h < d.nh;
  const int dq = d.dn + d.dr;
  const float* qlh = qlat + (static_cast<int64_t>(blockIdx.x) * d.nh + (live ? h : 0)) * d.C;
  const float* qh = q + static_cast<int64_t>(r.q_row) * d.nh * dq + (live ? h : 0) * dq;
  float ql[CM], qr[4], o[CM];
  for (int m = 0; m < CM; ++m) { ql[m] = lane + 32 * m < d.C ? qlh[lane + 32 * m] : 0.0f; o[m] = 0.0f; }
  for (int m = 0; m < 4; ++m) qr[m] = lane + 32 * m < d.dr ? qh[d.dn + lane + 32 * m] : 0.0f;
  float mx = -INFINITY, l = 0;
  const bool vec = (d.C % 8) == 0 && (d.dr % 8) == 0;
  for (int j0 = 0; j0 < r.len; j0 += TJ) {
    const int nj = min(TJ, r.len - j0);
    __syncthreads();  // the previous tile is no longer read
    const bf16* lsrc = r.latent + static_cast<int64_t>(j0) * d.C;
    const bf16* rsrc = r.k_rope + static_cast<int64_t>(j0) * d.dr;
    if (vec) {
      for (int i = threadIdx.x; i < nj * d.C / 8; i += blockDim.x)
        reinterpret_cast<uint4*>(lat_s)[i] = reinterpret_cast<const uint4*>(lsrc)[i];
      for (int i = threadIdx.x; i < nj * d.dr / 8; i += blockDim.x)
        reinterpret_cast<uint4*>(rope_s)[i] = reinterpret_cast<const uint4*>(rsrc)[i];
    } else {
      for (int i = threadIdx.x; i < nj * d.C; i += blockDim.x) lat_s[i] = lsrc[i];
      for (int i = threadIdx.x; i < nj * d.dr; i += blockDim.x) rope_s[i] = rsrc[i];
    }
    __syncthreads();
    if (!live) continue;
    // Scores of the tile's TJ tokens at once: every lane's partial dot for every token, then a reduce-scatter
    // (31 shuffles for 32 tokens) leaves token j's score in lane j.
    float v[32];
    for (int j = 0; j < 32; ++j) {
      float sj = 0;
      if (j < nj) {
        const bf16* lj = lat_s + j * d.C;
        for (int m = 0; m < CM; ++m)
          if (lane + 32 * m < d.C) sj += ql[m] * bf(lj[lane + 32 * m]);
        const bf16* rj = rope_s + j * d.dr;
        for (int m = 0; m < 4; ++m)
          if (lane + 32 * m < d.dr) sj += qr[m] * bf(rj[lane + 32 * m]);
      }
      v[j] = sj;
    }
    for (int off = 16; off >= 1; off >>= 1) {
      const bool upper = lane & off;
      for (int i = 0; i < off; ++i) {
        const float send = upper ? v[i] : v[i + off];
        const float keep = upper ? v[i + off] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
    }
    const float s = lane < nj ? v[0] * d.scale : -INFINITY;
    float mt = s;
    for (int off = 16; off >= 1; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
    const float mn = fmaxf(mx, mt), corr = expf(mx - mn);
    const float p = lane < nj ? expf(s - mn) : 0.0f;
    l = l * corr + warp_sum(p);
    for (int m = 0; m < CM; ++m) o[m] *= corr;
    for (int j = 0; j < nj; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const bf16* lj = lat_s + j * d.C;
      for (int m = 0; m < CM; ++m)
        if (lane + 32 * m < d.C) o[m] += pj * bf(lj[lane + 32 * m]);
    }
    mx = mn;
  }
  if (!live) return;
  float* dst = olat + (static_cast<int64_t>(blockIdx.x) * d.nh + h) * d.C;
  for (int m = 0; m < CM; ++m)
    if (lane + 32 * m < d.C) dst[lane + 32 * m] = o[m] / l;
}

// ---- absorbed decode on tensor cores -------------------------------------------------------------------------
// All heads of a sequence attend to one shared cache row per token (latent C + rope dr): multi-query attention with
// head dim D = C + dr for scores and C for values. One block per (row, split of the cached tokens, group of 64
// heads), 8 warps: warp w owns heads 16·(w/2)..+15 and, for P·V, half (w%2) of the C output columns. Tiles of 32
// tokens are double-buffered in shared memory with cp.async; S = Q·Kᵀ and O += P·V run on mma.sync m16n8k16 (bf16
// in, fp32 accumulate; Q and P rounded to bf16, as the reference's bf16 attention does); softmax is online per
// head row in the log2 domain. Each split writes its unnormalized O with its max and sum; k_mla_combine merges.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const bf16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const bf16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// 2^x on the special-function unit (ex2.approx.ftz: ~2 ulp; -inf gives 0): the softmax's exponentials
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// Pins registers a wgmma wrote asynchronously after the wait for it: ordinary code that reads or rewrites them
// stays after the wait (the compiler does not know the wait is what makes them ready).
template <int N>
__device__ __forceinline__ void keep(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// One key tile's online-softmax step for a lane's rows a (elements 4n, 4n + 1 of s: columns 8n + 2tq, + 1) and b
// (4n + 2, 4n + 3), shared by both prefill kernels: keys from k0 past a row's length masked (MASK), the rows'
// maxima of the raw scores (scaling by the positive sc commutes with max), the new running maxima in the base-2
// domain, P = 2^(s·sc − max) with one rounding (fma), the row sums in column order. On return s holds P (fp32) and
// corr the factors O is to be multiplied by; l is updated.
template <bool MASK>
__device__ __forceinline__ void flash_softmax(float (&s)[32], int k0, int tq, int len_a, int len_b, float sc, float& m_a,
                                              float& m_b, float& l_a, float& l_b, float& corr_a, float& corr_b) {
  float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if constexpr (MASK) {
        const int key = k0 + n * 8 + 2 * tq + e;
        if (key >= len_a) s[4 * n + e] = -INFINITY;
        if (key >= len_b) s[4 * n + 2 + e] = -INFINITY;
      }
      mx_a = fmaxf(mx_a, s[4 * n + e]);
      mx_b = fmaxf(mx_b, s[4 * n + 2 + e]);
    }
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, m));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, m));
  }
  const float nm_a = fmaxf(m_a, mx_a * sc), nm_b = fmaxf(m_b, mx_b * sc);
  // a row with no key yet keeps max -inf: its p are 0 and nothing is rescaled
  const float base_a = nm_a == -INFINITY ? 0.0f : nm_a, base_b = nm_b == -INFINITY ? 0.0f : nm_b;
  corr_a = ex2(m_a - base_a);
  corr_b = ex2(m_b - base_b);
  m_a = nm_a;
  m_b = nm_b;
  float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    s[4 * n] = ex2(__fmaf_rn(s[4 * n], sc, -base_a));
    s[4 * n + 1] = ex2(__fmaf_rn(s[4 * n + 1], sc, -base_a));
    s[4 * n + 2] = ex2(__fmaf_rn(s[4 * n + 2], sc, -base_b));
    s[4 * n + 3] = ex2(__fmaf_rn(s[4 * n + 3], sc, -base_b));
    sum_a += s[4 * n] + s[4 * n + 1];
    sum_b += s[4 * n + 2] + s[4 * n + 3];
  }
  l_a = l_a * corr_a + sum_a;
  l_b = l_b * corr_b + sum_b;
}

// ---- expanded-form (prefill) attention on tensor cores, flash-attention style: one block per (tile of up to 64
// query rows of one sequence, head), 4 warps of 16 rows. Q (fp32) and each 64-key tile of K = [k_nope from kvx,
// k_rope from the cache] and V (kvx) are rounded to bf16 in shared memory (as the reference's bf16 attention
// rounds them); S = Q·Kᵀ and O += P·V are m16n8k16 mmas with fp32 accumulation, the softmax online in fp32
// (flash_softmax), P rounded to bf16 as the A operand straight from the S registers. Row i attends keys
// [0, len_i). A row's result depends only on its own keys: the same alone or batched.
constexpr int kFlashBM = kFlashTileRows, kFlashBN = 64;
template <int DQ, int DV>
__host__ __device__ constexpr size_t flash_smem() {
  return size_t(2) * (kFlashBM * (DQ + 8) + kFlashBN * (DQ + 8) + kFlashBN * (DV + 8));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <int DQ, int DV>
__global__ void __launch_bounds__(128) k_flash_expanded(AttnDims d, const float* __restrict__ q, const AttnRow* rows,
                                                        const AttnTile* tiles, float* __restrict__ out) {
  pdl_entry();
  constexpr int QP = DQ + 8, VP = DV + 8, KS = DQ / 16, NV = DV / 8;
  extern __shared__ __align__(16) uint8_t flash_sm[];
  bf16* Qs = reinterpret_cast<bf16*>(flash_sm);
  bf16* Ks = Qs + kFlashBM * QP;
  bf16* Vs = Ks + kFlashBN * QP;
  const AttnTile tile = tiles[blockIdx.x];
  const int h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const AttnRow r0 = rows[tile.first];
  const int dkv = d.dn + d.dv, max_len = rows[tile.first + tile.count - 1].len;
  // Q rows (zero past the tile's count)
  for (int i = threadIdx.x; i < kFlashBM * (DQ / 4); i += 128) {
    const int r = i / (DQ / 4), c = (i - r * (DQ / 4)) * 4;
    float4 v = make_float4(0, 0, 0, 0);
    if (r < tile.count) v = *reinterpret_cast<const float4*>(q + (static_cast<int64_t>(rows[tile.first + r].q_row) * d.nh + h) * DQ + c);
    *reinterpret_cast<uint2*>(Qs + r * QP + c) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
  }
  // each lane's two rows: their key counts (0 past the tile: nothing attended, nothing written)
  const int ra = warp * 16 + gq, rb = ra + 8;
  const int len_a = ra < tile.count ? rows[tile.first + ra].len : 0, len_b = rb < tile.count ? rows[tile.first + rb].len : 0;
  __syncthreads();
  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldsm4(qf[ks], Qs + (warp * 16 + (lane & 15)) * QP + ks * 16 + (lane >> 4) * 8);
  float o[NV][4];
#pragma unroll
  for (int n = 0; n < NV; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
  const float sc = d.scale * 1.4426950408889634f;
  for (int k0 = 0; k0 < max_len; k0 += kFlashBN) {
    __syncthreads();  // every warp is done with the previous tile
    for (int i = threadIdx.x; i < kFlashBN * (d.dn / 4); i += 128) {  // k_nope
      const int j = i / (d.dn / 4), c = (i - j * (d.dn / 4)) * 4;
      float4 v = make_float4(0, 0, 0, 0);
      if (k0 + j < max_len) v = *reinterpret_cast<const float4*>(r0.kvx + (static_cast<int64_t>(k0 + j) * d.nh + h) * dkv + c);
      *reinterpret_cast<uint2*>(Ks + j * QP + c) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
    }
    for (int i = threadIdx.x; i < kFlashBN * (d.dr / 8); i += 128) {  // k_rope (bf16 in the cache)
      const int j = i / (d.dr / 8), c = (i - j * (d.dr / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (k0 + j < max_len) v = *reinterpret_cast<const uint4*>(r0.k_rope + static_cast<int64_t>(k0 + j) * d.dr + c);
      *reinterpret_cast<uint4*>(Ks + j * QP + d.dn + c) = v;
    }
    for (int i = threadIdx.x; i < kFlashBN * (DV / 4); i += 128) {  // v
      const int j = i / (DV / 4), c = (i - j * (DV / 4)) * 4;
      float4 v = make_float4(0, 0, 0, 0);
      if (k0 + j < max_len) v = *reinterpret_cast<const float4*>(r0.kvx + (static_cast<int64_t>(k0 + j) * d.nh + h) * dkv + d.dn + c);
      *reinterpret_cast<uint2*>(Vs + j * VP + c) = make_uint2(pack_bf16(v.x, v.y), pack_bf16(v.z, v.w));
    }
    __syncthreads();
    // a warp none of whose rows reaches this tile skips it (as a whole: the softmax below shuffles across lanes)
    if (__all_sync(0xffffffffu, k0 >= len_a && k0 >= len_b)) continue;
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int np = 0; np < 4; ++np) {  // key n-tiles 2np, 2np + 1
        uint32_t b[4];
        ldsm4(b, Ks + (np * 16 + ((lane >> 4) << 3) + (lane & 7)) * QP + ks * 16 + ((lane >> 3) & 1) * 8);
        mma16816(s[2 * np], qf[ks], b[0], b[1]);
        mma16816(s[2 * np + 1], qf[ks], b[2], b[3]);
      }
    // online softmax in base 2 (s[n][e] is element 4n + e of flash_softmax's tile)
    float corr_a, corr_b;
    flash_softmax<true>(*reinterpret_cast<float(*)[32]>(&s[0][0]), k0, tq, len_a, len_b, sc, m_a, m_b, l_a, l_b, corr_a, corr_b);
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      o[n][0] *= corr_a;
      o[n][1] *= corr_a;
      o[n][2] *= corr_b;
      o[n][3] *= corr_b;
    }
    // O += P·V: P's A fragments from the S registers (keys 16kk .. 16kk + 15)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < NV / 2; ++np) {  // dim n-tiles 2np, 2np + 1
        uint32_t b[4];
        ldsm4t(b, Vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * VP + np * 16 + (lane >> 4) * 8);
        mma16816(o[2 * np], pa, b[0], b[1]);
        mma16816(o[2 * np + 1], pa, b[2], b[3]);
      }
    }
  }
  // the row sums over the quad, then O / l
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, m);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, m);
  }
  if (ra < tile.count) {
    float* oa = out + (static_cast<int64_t>(rows[tile.first + ra].q_row) * d.nh + h) * DV;
    const float inv = 1.0f / l_a;
#pragma unroll
    for (int n = 0; n < NV; ++n) *reinterpret_cast<float2*>(oa + n * 8 + 2 * tq) = make_float2(o[n][0] * inv, o[n][1] * inv);
  }
  if (rb < tile.count) {
    float* ob = out + (static_cast<int64_t>(rows[tile.first + rb].q_row) * d.nh + h) * DV;
    const float inv = 1.0f / l_b;
#pragma unroll
    for (int n = 0; n < NV; ++n) *reinterpret_cast<float2*>(ob + n * 8 + 2 * tq) = make_float2(o[n][2] * inv, o[n][3] * inv);
  }
}
// ---- the same prefill attention on warpgroup MMA: one block per (tile of up to 128 consecutive rows of one
// sequence, head), two warpgroups of 64 rows sharing every 64-key tile of K and V. Each warpgroup's per-row
// arithmetic is k_flash_expanded's, step for step: S = Q·Kᵀ as 12 k-steps of 16 from zero (wgmma m64n64k16; Q from
// registers in the A-fragment layout, K from shared memory), the same softmax step (flash_softmax), P rounded to
// bf16 as the A operand from the S registers, O += P·V as 4 k-steps (m64n128k16) — the tensor cores' k16 sums are
// those of mma.sync, so the bits are k_flash_expanded's (tested).
//
// Scheduled as FlashAttention-3 does: within a warpgroup the multiplies of S for tile j and of P·V for tile j − 1
// are issued together and the softmax of tile j runs while the tensor cores do P·V (O is rescaled once P·V is done:
// the same operations on O in the same order); across the two warpgroups a pair of named barriers makes them take
// turns issuing, so one's softmax runs while the other's multiplies do. Nothing else couples them: kvx arrives
// converted to bf16 in place (k_kvx_bf16), every thread copies its share of each key tile by cp.async into
// 128-byte-swizzled slabs of 64 keys (a 16-byte chunk c of key row r at chunk c ^ (r & 7); per stage K [3][64][128 B]
// and V [2][64][128 B], V the MN-major B operand), 4 stages, two tiles ahead; a stage's "full" mbarrier completes
// when all 256 threads' copies have landed, its "empty" one when all 256 threads are done with the tile it held.
// Keys past a row's length are masked (only tiles that reach past some row's length pay for the mask); a tile wholly
// past a row's length (k_flash_expanded skips it) leaves the row's O, max and sum bit for bit unchanged.
constexpr int kFwBN = 64, kFwStages = 4, kFwRows = 128;
constexpr int kFwStageBytes = 5 * kFwBN * 128;
constexpr size_t flash_wg_smem() { return 1024 + kFwStages * kFwStageBytes + 2 * kFwStages * sizeof(uint64_t); }

// kvx [n rows of 256 fp32: k_nope 128 | v 128] -> the first 512 bytes of each row as 256 bf16 (same order), in place:
// one warp per row reads all of it before any lane writes
__global__ void __launch_bounds__(256) k_kvx_bf16(float* kvx, int64_t n) {
  pdl_entry();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (row >= n) return;
  const int lane = threadIdx.x & 31;
  float* p = kvx + row * 256 + lane * 8;
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  __syncwarp();
  *reinterpret_cast<uint4*>(reinterpret_cast<bf16*>(kvx + row * 256) + lane * 8) =
      make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
}

// mbarrier helpers for the cp.async ring: a thread's copies issued so far arrive on b when they land; a plain arrival
__device__ __forceinline__ void cp_async_arrive(uint64_t* b) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(tma::smem_u32(b)) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(tma::smem_u32(b)) : "memory");
}
// named barriers for the two warpgroups' turns (ids 1 and 2; 0 is __syncthreads')
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

__global__ void __launch_bounds__(256, 1) k_flash_wg(AttnDims d, const float* __restrict__ q, const AttnRow* rows,
                                                     const AttnTile* tiles, float* __restrict__ out) {
  pdl_entry();
  extern __shared__ __align__(1024) unsigned char fw_raw[];
  unsigned char* kv_s = tma::align1024(fw_raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(kv_s + kFwStages * kFwStageBytes);
  uint64_t* empty = full + kFwStages;
  // a head's tiles side by side (their K/V tiles stay in L2), the heaviest (latest rows: the most keys) first
  const AttnTile tile = tiles[gridDim.x - 1 - blockIdx.x];
  const int h = blockIdx.y, wgi = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3, wid = threadIdx.x >> 5;
  const AttnRow r0 = rows[tile.first];
  const int max_len = rows[tile.first + tile.count - 1].len;
  const bf16* kv16 = reinterpret_cast<const bf16*>(r0.kvx);  // [key][head][512 bf16]: k_nope 128 | v 128 | unused
  if (threadIdx.x == 0) {
    for (int i = 0; i < kFwStages; ++i) {
      tma::bar_init(&full[i], 256);
      tma::bar_init(&empty[i], 256);
    }
    tma::bar_init_fence();
  }
  __syncthreads();
  // a key tile: warp w copies keys w, w + 8, ... (k_nope and v: the row's first 512 bytes, lane = chunk), and each
  // thread 2 of the 512 rope chunks; a key's swizzle (key & 7) is the warp's; keys past max_len arrive as zeros
  const int kv_slab = lane < 16 ? lane >> 3 : 3 + ((lane - 16) >> 3);
  const int kv_dst = kv_slab * (kFwBN * 128) + wid * 128 + (((lane & 7) ^ wid) << 4);
  const int rk = threadIdx.x >> 3, rc = threadIdx.x & 7;  // rope: keys rk and rk + 32, chunk rc
  const int rope_dst = 2 * (kFwBN * 128) + rk * 128 + ((rc ^ (rk & 7)) << 4);
  const int64_t key_stride = static_cast<int64_t>(d.nh) * 512;
  const int nt = (max_len + kFwBN - 1) / kFwBN;
  auto load = [&](int t) {  // tile t into stage t % 4, once every thread is done with tile t − 4 there
    if (t >= nt) return;
    const int stage = t % kFwStages, k0 = t * kFwBN;
    if (t >= kFwStages) tma::wait(&empty[stage], ((t / kFwStages) - 1) & 1);
    unsigned char* st = kv_s + stage * kFwStageBytes;
    const bf16* src = kv16 + (k0 + wid) * key_stride + h * 512 + lane * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const bool ok = k0 + wid + 8 * i < max_len;
      cp_async16(st + kv_dst + i * 1024, ok ? src + i * 8 * key_stride : kv16, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int key = k0 + rk + 32 * i;
      const bool ok = key < max_len;
      cp_async16(st + rope_dst + i * 4096, r0.k_rope + (ok ? static_cast<int64_t>(key) * 64 + rc * 8 : 0), ok ? 16 : 0);
    }
    cp_async_arrive(&full[stage]);
  };
  load(0);
  load(1);
  // each lane's two rows and their key counts
  const int ra = 64 * wgi + warp * 16 + gq, rb = ra + 8;
  const int len_a = ra < tile.count ? rows[tile.first + ra].len : 0, len_b = rb < tile.count ? rows[tile.first + rb].len : 0;
  // Q in registers, bf16, as the A fragments of the 12 k-steps (zero past the tile's count)
  uint32_t qf[12][4];
  {
    const float* qa = ra < tile.count ? q + (static_cast<int64_t>(rows[tile.first + ra].q_row) * d.nh + h) * 192 : nullptr;
    const float* qb = rb < tile.count ? q + (static_cast<int64_t>(rows[tile.first + rb].q_row) * d.nh + h) * 192 : nullptr;
#pragma unroll
    for (int ks = 0; ks < 12; ++ks)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int c = 16 * ks + 8 * hf + 2 * tq;
        const float2 va = qa ? *reinterpret_cast<const float2*>(qa + c) : make_float2(0, 0);
        const float2 vb = qb ? *reinterpret_cast<const float2*>(qb + c) : make_float2(0, 0);
        qf[ks][2 * hf] = pack_bf16(va.x, va.y);
        qf[ks][2 * hf + 1] = pack_bf16(vb.x, vb.y);
      }
  }
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
  const float sc = d.scale * 1.4426950408889634f;
  // Every wgmma below is issued unconditionally (a branch around one makes ptxas serialize them all), so both
  // warpgroups multiply every key tile of the block, the first warpgroup's last one fully masked when the block's
  // rows span two tiles.
  auto tile_in = [&](int it) {  // wait for tile it (and prefetch it + 2)
    load(it + 2);
    tma::wait(&full[it % kFwStages], (it / kFwStages) & 1);
    wg::fence_smem();  // the cp.async writes (generic proxy) before the tensor cores' reads (async proxy)
  };
  // turns: the first warpgroup issues first; each issues once the other has issued, then lets the other go
  const int my_turn = 1 + wgi, other_turn = 2 - wgi;
  if (wgi == 1) named_arrive(1);
  auto issue_s = [&](float (&s)[32], int it) {
    const unsigned char* kt = kv_s + (it % kFwStages) * kFwStageBytes;
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.0f;
    wg::fence();
#pragma unroll
    for (int ks = 0; ks < 12; ++ks) wg::mma_rs<64, 0>(s, qf[ks], tma::sw128_desc(kt + (ks >> 2) * 8192 + (ks & 3) * 32, 16, 1024), 1);
    wg::commit();
  };
  uint32_t pa[4][4];  // P of the previous tile, waiting for its P·V
  // O += P·V of tile it: 16 keys = 2048 bytes per k-step; V's two 64-column slabs 8192 bytes apart, 8 keys 1024
  auto issue_pv = [&](int it) {
    const unsigned char* vp = kv_s + (it % kFwStages) * kFwStageBytes + 3 * 8192;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wg::mma_rs<128, 1>(o, pa[kk], tma::sw128_desc(vp + kk * 2048, 8192, 1024), 1);
    wg::commit();
  };
  auto softmax = [&](float (&s)[32], int it, float& corr_a, float& corr_b) {
    const int k0 = it * kFwBN;
    if (k0 + kFwBN > min(len_a, len_b)) flash_softmax<true>(s, k0, tq, len_a, len_b, sc, m_a, m_b, l_a, l_b, corr_a, corr_b);
    else flash_softmax<false>(s, k0, tq, len_a, len_b, sc, m_a, m_b, l_a, l_b, corr_a, corr_b);
  };
  auto pack_p = [&](const float (&s)[32]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = pack_bf16(s[8 * kk], s[8 * kk + 1]);
      pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  {  // tile 0 (O is zero: its rescale is a no-op)
    float s[32], corr_a, corr_b;
    tile_in(0);
    named_sync(my_turn);
    issue_s(s, 0);
    if (wgi == 0 || nt > 1) named_arrive(other_turn);
    wg::wait<0>();
    keep(s);
    softmax(s, 0, corr_a, corr_b);
    pack_p(s);
  }
  for (int it = 1; it < nt; ++it) {
    float s[32], corr_a, corr_b;
    tile_in(it);
    named_sync(my_turn);
    issue_s(s, it);
    wg::fence();
    issue_pv(it - 1);
    if (wgi == 0 || it + 1 < nt) named_arrive(other_turn);  // (the second's last turn is not waited for)
    wg::wait<1>();  // S
    keep(s);
    softmax(s, it, corr_a, corr_b);
    wg::wait<0>();  // P·V of tile it - 1: O and pa free, and this thread is done with tile it − 1
    keep(o);
    bar_arrive(&empty[(it - 1) % kFwStages]);
    if (corr_a != 1.0f || corr_b != 1.0f) {
#pragma unroll
      for (int n = 0; n < 16; ++n) {
        o[4 * n] *= corr_a;
        o[4 * n + 1] *= corr_a;
        o[4 * n + 2] *= corr_b;
        o[4 * n + 3] *= corr_b;
      }
    }
    pack_p(s);
  }
  wg::fence();
  issue_pv(nt - 1);
  wg::wait<0>();
  keep(o);
  cp_async_wait<0>();
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, m);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, m);
  }
  if (ra < tile.count) {
    float* oa = out + (static_cast<int64_t>(rows[tile.first + ra].q_row) * d.nh + h) * 128;
    const float inv = 1.0f / l_a;
#pragma unroll
    for (int n = 0; n < 16; ++n) *reinterpret_cast<float2*>(oa + n * 8 + 2 * tq) = make_float2(o[4 * n] * inv, o[4 * n + 1] * inv);
  }
  if (rb < tile.count) {
    float* ob = out + (static_cast<int64_t>(rows[tile.first + rb].q_row) * d.nh + h) * 128;
    const float inv = 1.0f / l_b;
#pragma unroll
    for (int n = 0; n < 16; ++n) *reinterpret_cast<float2*>(ob + n * 8 + 2 * tq) = make_float2(o[4 * n + 2] * inv, o[4 * n + 3] * inv);
  }
}

__device__ __forceinline__ void pair_sync(int pair) { asm volatile("bar.sync %0, 64;\n" ::"r"(pair + 1)); }

constexpr int kMlaH = 64, kMlaT = 32, kMlaPs = 40, kMlaStages = 3, kMlaMaxSplits = 128;  // heads per block, tokens per tile, P row stride, tiles in flight
// floats per (row, split, head) of the split partial results: O[C], max, sum, 2 of padding (16-byte aligned rows)
__host__ __device__ constexpr int mla_part_stride(int C) { return C + kMlaPartPad; }
// A decode block's tokens: split `split` of its row's cache ([t0, t1): the row's own chunk where it has one, else the
// launch's), and how many tiles of T tokens cover it.
struct MlaSplit {
  int t0, t1, ntiles;
};
__device__ __forceinline__ MlaSplit mla_split(const AttnRow& r, int chunk, int split, int T) {
  const int rc = r.chunk > 0 ? r.chunk : chunk;
  const int t0 = split * rc, t1 = min(r.len, t0 + rc);
  return {t0, t1, t1 > t0 ? (t1 - t0 + T - 1) / T : 0};
}

size_t mla_smem_bytes(int D) {
  const int LS = D + 8;
  return (static_cast<size_t>(kMlaH) * LS + kMlaStages * kMlaT * LS + kMlaH * kMlaPs) * sizeof(bf16) + 4 * kMlaH * sizeof(float);
}

template <int NT>  // C = 16·NT output columns, NT/2 8-column tiles... per warp: 8·NT columns = C/2
__global__ void __launch_bounds__(256, 1) k_mla_decode(AttnDims d, const bf16* qcat, const AttnRow* rows, int chunk,
                                                       float* part) {
  pdl_entry();
  extern __shared__ __align__(16) unsigned char mla_smem[];
  const int D = d.C + d.dr, LS = D + 8;
  bf16* q_s = reinterpret_cast<bf16*>(mla_smem);
  bf16* k_s = q_s + kMlaH * LS;
  bf16* p_s = k_s + kMlaStages * kMlaT * LS;
  float* xm = reinterpret_cast<float*>(p_s + kMlaH * kMlaPs);
  float* xs = xm + 2 * kMlaH;
  const int row = blockIdx.x, split = blockIdx.y, hg = blockIdx.z, splits = gridDim.y;
  const AttnRow r = rows[row];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, mt = warp >> 1, half = warp & 1;
  const int g = lane >> 2, tq = lane & 3, lj = lane >> 3, l8 = lane & 7;
  const MlaSplit sp = mla_split(r, chunk, split, kMlaT);
  const int t0 = sp.t0, t1 = sp.t1, ntiles = sp.ntiles;
  auto load_tile = [&](int buf, int j0) {
    bf16* dst = k_s + buf * kMlaT * LS;
    const int cpr = D / 8;
    for (int i = threadIdx.x; i < kMlaT * cpr; i += blockDim.x) {
      const int t = i / cpr, c8 = (i % cpr) * 8, j = j0 + t;
      const bool ok = j < t1;
      const int jj = ok ? j : t0;
      const bf16* src = c8 < d.C ? r.latent + static_cast<int64_t>(jj) * d.C + c8 : r.k_rope + static_cast<int64_t>(jj) * d.dr + (c8 - d.C);
      cp_async16(dst + t * LS + c8, src, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  if (ntiles > 0) {  // Q (bf16, q_lat || q_rope) with the first tile; rows of heads past nh are zero
    const int cpr = D / 8;
    const bf16* qrow = qcat + static_cast<int64_t>(row) * d.nh * D;
    for (int i = threadIdx.x; i < kMlaH * cpr; i += blockDim.x) {
      const int hh = i / cpr, c8 = (i % cpr) * 8, h = hg * kMlaH + hh;
      cp_async16(q_s + hh * LS + c8, qrow + static_cast<int64_t>(h < d.nh ? h : 0) * D + c8, h < d.nh ? 16 : 0);
    }
  }
  if (ntiles > 0) load_tile(0, t0);
  if (ntiles > 1) load_tile(1, t0 + kMlaT);
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  const float sl = d.scale * 1.4426950408889634f;
  const int rr0 = mt * 16 + g, rr1 = rr0 + 8;
  for (int it = 0; it < ntiles; ++it) {
    // tile it+2 goes into the buffer tile it-1 used (free since the barrier that ended that iteration)
    if (it + 2 < ntiles) {
      load_tile((it + 2) % kMlaStages, t0 + (it + 2) * kMlaT);
      cp_async_wait<2>();
    } else if (it + 1 < ntiles) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* kt = k_s + (it % kMlaStages) * kMlaT * LS;
    // four independent accumulator sets (k-steps mod 4), so consecutive mma do not wait on each other
    float s4[4][2][4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int n = 0; n < 2; ++n) s4[u][n][0] = s4[u][n][1] = s4[u][n][2] = s4[u][n][3] = 0.0f;
    const int ksteps = D / 16;
    for (int kb = 0; kb < ksteps; kb += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (kb + u >= ksteps) break;
        const int k0 = (kb + u) * 16;
        uint32_t a[4], b[4];
        ldsm4(a, q_s + (mt * 16 + l8 + 8 * (lj & 1)) * LS + k0 + 8 * (lj >> 1));
        ldsm4(b, kt + (half * 16 + l8 + 8 * (lj >> 1)) * LS + k0 + 8 * (lj & 1));
        mma16816(s4[u][0], a, b[0], b[1]);
        mma16816(s4[u][1], a, b[2], b[3]);
      }
    }
    float s[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = (s4[0][n][e] + s4[1][n][e]) + (s4[2][n][e] + s4[3][n][e]);
    const int jb = t0 + it * kMlaT + half * 16;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n * 8 + 2 * tq + (e & 1);
        s[n][e] = jb + col < t1 ? s[n][e] * sl : -INFINITY;
      }
    float pm0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    float pm1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
    pm0 = fmaxf(pm0, __shfl_xor_sync(0xffffffffu, pm0, 1));
    pm0 = fmaxf(pm0, __shfl_xor_sync(0xffffffffu, pm0, 2));
    pm1 = fmaxf(pm1, __shfl_xor_sync(0xffffffffu, pm1, 1));
    pm1 = fmaxf(pm1, __shfl_xor_sync(0xffffffffu, pm1, 2));
    if (tq == 0) {
      xm[half * kMlaH + rr0] = pm0;
      xm[half * kMlaH + rr1] = pm1;
    }
    pair_sync(mt);
    float mnew[2], corr[2];
    mnew[0] = fmaxf(m_r[0], fmaxf(xm[rr0], xm[kMlaH + rr0]));
    mnew[1] = fmaxf(m_r[1], fmaxf(xm[rr1], xm[kMlaH + rr1]));
#pragma unroll
    for (int i = 0; i < 2; ++i) corr[i] = mnew[i] == -INFINITY ? 1.0f : exp2f(m_r[i] - mnew[i]);
    float ps[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        const float p = mnew[i] == -INFINITY ? 0.0f : exp2f(s[n][e] - mnew[i]);
        s[n][e] = p;
        ps[i] += p;
      }
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int col = half * 16 + n * 8 + 2 * tq;
      *reinterpret_cast<__nv_bfloat162*>(p_s + rr0 * kMlaPs + col) = __floats2bfloat162_rn(s[n][0], s[n][1]);
      *reinterpret_cast<__nv_bfloat162*>(p_s + rr1 * kMlaPs + col) = __floats2bfloat162_rn(s[n][2], s[n][3]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], 1);
      ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], 2);
    }
    if (tq == 0) {
      xs[half * kMlaH + rr0] = ps[0];
      xs[half * kMlaH + rr1] = ps[1];
    }
    pair_sync(mt);
    l_r[0] = l_r[0] * corr[0] + xs[rr0] + xs[kMlaH + rr0];
    l_r[1] = l_r[1] * corr[1] + xs[rr1] + xs[kMlaH + rr1];
    m_r[0] = mnew[0];
    m_r[1] = mnew[1];
    if (!__all_sync(0xffffffffu, corr[0] == 1.0f && corr[1] == 1.0f)) {  // (once the maxima settle, nothing to rescale)
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        o[n][0] *= corr[0];
        o[n][1] *= corr[0];
        o[n][2] *= corr[1];
        o[n][3] *= corr[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      uint32_t a[4];
      ldsm4(a, p_s + (mt * 16 + l8 + 8 * (lj & 1)) * kMlaPs + kk * 16 + 8 * (lj >> 1));
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        uint32_t b[4];
        ldsm4t(b, kt + (kk * 16 + l8 + 8 * (lj & 1)) * LS + half * 8 * NT + n * 8 + 8 * (lj >> 1));
        mma16816(o[n], a, b[0], b[1]);
        mma16816(o[n + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the tile and P are read before the next prefetch overwrites them
  }
  // partial results: [row][split][head][C + 4] = unnormalized O, then max (log2 domain) and sum (and 2 floats of
  // padding, so that each head's O starts 16-byte aligned)
  const int stride = mla_part_stride(d.C);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = hg * kMlaH + (i ? rr1 : rr0);
    if (h >= d.nh) continue;
    float* dst = part + ((static_cast<int64_t>(row) * splits + split) * d.nh + h) * stride;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int col = half * 8 * NT + n * 8 + 2 * tq;
      dst[col] = o[n][2 * i];
      dst[col + 1] = o[n][2 * i + 1];
    }
    if (half == 0 && tq == 0) {
      dst[d.C] = m_r[i];
      dst[d.C + 1] = l_r[i];
    }
  }
}

// ---- absorbed decode attention on Hopper's warpgroup MMA (wgmma): the same blocks, splits and partial results as
// k_mla_decode (one block per row, split of its cache and group of 64 heads; 32-token tiles in a 3-stage cp.async
// ring), with the tensor-core work issued per warpgroup from shared memory. The two warpgroups split S = Q·Kᵀ
// (64 heads × 32 tokens) by k (the first and second half of the C + dr dimensions, each a chain of m64n32k16 with
// Q and K from shared memory), exchange their partial sums through shared memory and both add them in the same
// order (part 0 + part 1), so both hold the same S, run the same online softmax, and multiply their P (bf16, in
// registers) into their half of O = P·V (64 heads × C/2 latent columns, m64n(C/2)k16 with V read transposed from
// the same tile). Each of the 64·C/2 accumulators per warpgroup stays in registers for the whole split. Shared
// memory holds Q and the tiles in the no-swizzle core-matrix layout (8 rows × 16 bytes in 128 contiguous bytes; k
// pieces of all rows, then the next piece), so one layout serves K (K-major) and V (MN-major, transposed).
constexpr int kWgStages = 3, kWgXs = kMlaT + 8;  // tiles in flight; S partial row stride (floats, conflict-free)

size_t mla_wg_smem(int D) {
  D = (D + 31) / 32 * 32;  // k-steps padded to an even count
  return 1024 /* alignment of the swizzled slabs */ + (static_cast<size_t>(kMlaH) * D + static_cast<size_t>(kWgStages) * kMlaT * D) * sizeof(bf16) +
         2 * kMlaH * kWgXs * sizeof(float) + (kWgStages + 1) * sizeof(uint64_t);
}
bool mla_wg_ok(const AttnDims& d) { return (d.C == 128 || d.C == 256 || d.C == 512) && (d.dr == 16 || d.dr == 32 || d.dr == 64); }

// cp.async of R rows × CH 16-byte pieces into [CH][R][16 B] by 256 threads: each warp takes 8 rows × 4 consecutive
// pieces at a time (64 contiguous bytes of each global row; every 8 lanes write 128 contiguous bytes of shared
// memory), a thread one row and every (256 / R)-th group of 4 pieces. src(row, piece, bytes) gives the source.
template <int R, class Src>
__device__ __forceinline__ void wg_stage(unsigned char* dst, int CH, Src src) {
  constexpr int RG = R / 8, STEP = 4 * (8 / RG);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = (warp % RG) * 8 + (lane & 7);
  for (int c = (warp / RG) * 4 + ((lane >> 3) & 3); c < CH; c += STEP) {
    int bytes;
    const void* p = src(row, c, bytes);
    cp_async16(dst + (c * R + row) * 16, p, bytes);
  }
}


// The online-softmax step of the decode kernels on one thread's scores of a tile (already scaled to the log2
// domain, masked keys -inf): s[4j + e] holds head (e >> 1) of the thread's two (rr0, rr0 + 8), key 8j + 2t + (e & 1),
// the 4 lanes of a quad hold a head's keys. Updates the running max m and sum l, leaves P = 2^(s − m) in s and the
// factor for O in corr.
template <int NJ>
__device__ __forceinline__ void mla_softmax_step(float (&s)[4 * NJ], float (&m_r)[2], float (&l_r)[2], float (&corr)[2]) {
  float pm[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    pm[0] = fmaxf(pm[0], fmaxf(s[4 * j], s[4 * j + 1]));
    pm[1] = fmaxf(pm[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  float ps[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    pm[i] = fmaxf(pm[i], __shfl_xor_sync(0xffffffffu, pm[i], 1));
    pm[i] = fmaxf(pm[i], __shfl_xor_sync(0xffffffffu, pm[i], 2));
    const float mnew = fmaxf(m_r[i], pm[i]);
    corr[i] = ex2(m_r[i] - mnew);
    m_r[i] = mnew;
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e >> 1;
      const float p = ex2(s[4 * j + e] - m_r[i]);
      s[4 * j + e] = p;
      ps[i] += p;
    }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], 1);
    ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], 2);
    l_r[i] = l_r[i] * corr[i] + ps[i];
  }
}
// O (a warpgroup's m64nN accumulators) times each head's factor (unconditionally: a branch around it would serialize
// the wgmma chain).
template <int N>
__device__ __forceinline__ void mla_rescale_o(float (&o)[N / 2], float c0, float c1) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
    o[4 * j] *= c0;
    o[4 * j + 1] *= c0;
    o[4 * j + 2] *= c1;
    o[4 * j + 3] *= c1;
  }
}
// A split's partial results, as k_mla_decode's: [row][split][head][C + 4] = unnormalized O (this warpgroup's N
// columns from col0), then max (log2 domain) and sum (written where `stats`).
template <int N>
__device__ __forceinline__ void mla_write_part(const AttnDims& d, float* part, int row, int split, int splits, int hg, int rr0,
                                               int tq, int col0, bool stats, const float (&o)[N / 2], const float (&m_r)[2],
                                               const float (&l_r)[2]) {
  const int stride = mla_part_stride(d.C);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = hg * kMlaH + rr0 + 8 * i;
    if (h >= d.nh) continue;
    float* dst = part + ((static_cast<int64_t>(row) * splits + split) * d.nh + h) * stride + col0;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) *reinterpret_cast<float2*>(dst + 8 * j + 2 * tq) = make_float2(o[4 * j + 2 * i], o[4 * j + 2 * i + 1]);
    if (stats && tq == 0) {
      dst[d.C - col0] = m_r[i];
      dst[d.C - col0 + 1] = l_r[i];
    }
  }
}

// NC = C / 2: the latent columns of O per warpgroup; KSH: 16-wide k-steps of S per warpgroup, (C + dr) / 32 rounded
// up (the dimensions padded with zeros to an even count of k-steps). Both are compile-time so that each
// warpgroup's chain of wgmma is unrolled and issued back to back (ptxas serializes a chain inside a runtime loop).
//
// TMA (rope 64, kv_lora a multiple of 64): the cache tiles and Q arrive by tensor copies (cp.async.bulk.tensor, one
// thread issues them; an mbarrier per stage) in 64-wide slabs of 128-byte rows with the 128-byte swizzle, which
// the wgmma descriptors name (K-major: +32 bytes per k-step inside a slab, 1024 bytes per 8 rows; V transposed: 4096
// bytes per 64-column slab, 1024 per 8 tokens). Tensor copies stream the cache at the copy bandwidth where the
// per-thread cp.async ring tops out at ~2/3 of it (bench/NOTES.md 33); rows past a cache's length come back as zeros.
// maps: per row, the latent [len][C] and rope [len][64] tensor maps (mla_tma_maps); qmap: q_cat as [rows · nh][D].
template <int NC, int KSH, bool TMA>
__global__ void __launch_bounds__(256, 1) k_mla_wg(AttnDims d, const bf16* qcat, const AttnRow* rows, int chunk, float* part,
                                                   const __grid_constant__ CUtensorMap qmap, const CUtensorMap* maps) {
  pdl_entry();
  extern __shared__ __align__(1024) unsigned char wg_smem_raw[];
  constexpr int Dp = 32 * KSH, CHp = Dp / 8, SLABS = Dp / 64;
  const int D = d.C + d.dr, CH = D / 8;
  // (swizzled slabs need 1024-byte alignment)
  unsigned char* q_s = tma::align1024(wg_smem_raw);
  unsigned char* k_s = q_s + kMlaH * Dp * 2;              // stages × [CHp][32 tokens][16 B] (TMA: [slab][32][128 B])
  float* x_s = reinterpret_cast<float*>(k_s + kWgStages * kMlaT * Dp * 2);  // [2][64][kWgXs] partial S
  uint64_t* bars = reinterpret_cast<uint64_t*>(x_s + 2 * kMlaH * kWgXs);   // TMA: one per stage, then Q's
  const int row = blockIdx.x, split = blockIdx.y, hg = blockIdx.z, splits = gridDim.y;
  const AttnRow r = rows[row];
  const int wgi = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const MlaSplit sp = mla_split(r, chunk, split, kMlaT);
  const int t0 = sp.t0, t1 = sp.t1, ntiles = sp.ntiles;
  const int C8 = d.C / 8;
  auto load_tile = [&](int buf, int j0) {
    if constexpr (TMA) {
      if (threadIdx.x == 0) {
        unsigned char* dst = k_s + buf * kMlaT * Dp * 2;
        tma::expect(&bars[buf], kMlaT * Dp * 2);
        for (int sl = 0; sl < SLABS - 1; ++sl) tma::load_2d(dst + sl * kMlaT * 128, &maps[2 * row], 64 * sl, j0, &bars[buf]);
        tma::load_2d(dst + (SLABS - 1) * kMlaT * 128, &maps[2 * row + 1], 0, j0, &bars[buf]);
      }
      return;
    }
    wg_stage<kMlaT>(k_s + buf * kMlaT * Dp * 2, CHp, [&](int t, int c, int& bytes) -> const void* {
      const int j = j0 + t, jj = j < t1 ? j : t0;
      bytes = j < t1 && c < CH ? 16 : 0;
      if (c >= CH) c = 0;
      return c < C8 ? static_cast<const void*>(r.latent + static_cast<int64_t>(jj) * d.C + c * 8)
                    : static_cast<const void*>(r.k_rope + static_cast<int64_t>(jj) * d.dr + (c - C8) * 8);
    });
    cp_async_commit();
  };
  if constexpr (TMA) {
    if (threadIdx.x == 0) {
      for (int i = 0; i <= kWgStages; ++i) tma::bar_init(&bars[i]);
      tma::bar_init_fence();
    }
    __syncthreads();
    if (ntiles > 0 && threadIdx.x == 0) {  // Q: rows of heads past this row's nh are the next row's (unused) or zeros
      tma::expect(&bars[kWgStages], kMlaH * Dp * 2);
      for (int sl = 0; sl < SLABS; ++sl) tma::load_2d(q_s + sl * kMlaH * 128, &qmap, 64 * sl, row * d.nh + hg * kMlaH, &bars[kWgStages]);
      load_tile(0, t0);
      if (ntiles > 1) load_tile(1, t0 + kMlaT);
    }
    if (ntiles > 0) tma::wait(&bars[kWgStages], 0);
  } else if (ntiles > 0) {  // Q (bf16 q_lat || q_rope) with the first tile; heads past nh are zero
    const bf16* qrow = qcat + static_cast<int64_t>(row) * d.nh * D;
    wg_stage<kMlaH>(q_s, CHp, [&](int hh, int c, int& bytes) -> const void* {
      const int h = hg * kMlaH + hh;
      bytes = h < d.nh && c < CH ? 16 : 0;
      if (c >= CH) c = 0;
      return qrow + static_cast<int64_t>(h < d.nh ? h : 0) * D + c * 8;
    });
    load_tile(0, t0);
    if (ntiles > 1) load_tile(1, t0 + kMlaT);
    else cp_async_commit();
  }
  float o[NC / 2];
#pragma unroll
  for (int i = 0; i < NC / 2; ++i) o[i] = 0.0f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
  const float sl = d.scale * 1.4426950408889634f;
  const int rr0 = 16 * warp + g;  // this thread's heads (of the 64): rr0 and rr0 + 8
  const int kb = wgi * KSH;  // this warpgroup's k-steps: [kb, kb + KSH)
  for (int it = 0; it < ntiles; ++it) {
    if constexpr (TMA) {
      tma::wait(&bars[it % kWgStages], (it / kWgStages) & 1);
    } else {
      cp_async_wait<1>();  // this thread's pieces of tile it (and Q) have landed
      wg::fence_smem();
    }
    __syncthreads();     // everyone's; and every thread is past tile it-1, whose buffer the prefetch below reuses
    const unsigned char* kt = k_s + (it % kWgStages) * kMlaT * Dp * 2;
    float s[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) s[i] = 0.0f;
    wg::fence();
    if constexpr (TMA) {  // k-step ks: slab ks / 4, 32 bytes per k-step inside its 128-byte rows
#pragma unroll
      for (int i = 0; i < KSH; ++i) {
        const int ks = kb + i;
        wg::mma_ss<32, 0, 0>(s, tma::sw128_desc(q_s + (ks >> 2) * kMlaH * 128 + (ks & 3) * 32, 16, 1024),
                             tma::sw128_desc(kt + (ks >> 2) * kMlaT * 128 + (ks & 3) * 32, 16, 1024), 1);
      }
    } else {
      // descriptors advance by address / 16 in their low bits: a k-step is 2 pieces of 64 heads / 32 tokens
      const uint64_t qd = wg::smem_desc(q_s + kb * 2 * kMlaH * 16, kMlaH * 16, 128),
                     kd = wg::smem_desc(kt + kb * 2 * kMlaT * 16, kMlaT * 16, 128);
#pragma unroll
      for (int i = 0; i < KSH; ++i) wg::mma_ss<32, 0, 0>(s, qd + i * (2 * kMlaH), kd + i * (2 * kMlaT), 1);
    }
    wg::commit();
    // the prefetch of tile it + 2 is issued while the tensor cores work on S
    if (it + 2 < ntiles) load_tile((it + 2) % kWgStages, t0 + (it + 2) * kMlaT);
    else if (!TMA) cp_async_commit();
    wg::wait<0>();
    float* xw = x_s + wgi * kMlaH * kWgXs;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<float2*>(xw + rr0 * kWgXs + 8 * j + 2 * tq) = make_float2(s[4 * j], s[4 * j + 1]);
      *reinterpret_cast<float2*>(xw + (rr0 + 8) * kWgXs + 8 * j + 2 * tq) = make_float2(s[4 * j + 2], s[4 * j + 3]);
    }
    __syncthreads();
    const float* xo = x_s + (wgi ^ 1) * kMlaH * kWgXs;
    // keys past the split's end (only in its last tile) are masked; every tile has a valid first key, so the running
    // maxima are finite from the first tile on and ex2(-inf) = 0 covers the initial m = -inf and masked keys
    const int jb = t0 + it * kMlaT;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * tq + (e & 1);
        const float other = xo[(rr0 + 8 * (e >> 1)) * kWgXs + col];
        const float v = wgi == 0 ? s[4 * j + e] + other : other + s[4 * j + e];  // part 0 + part 1 in both
        s[4 * j + e] = jb + col < t1 ? v * sl : -INFINITY;
      }
    float corr[2];
    mla_softmax_step<4>(s, m_r, l_r, corr);
    mla_rescale_o<NC>(o, corr[0], corr[1]);
    // P as the A operand (registers): k-step kk is tokens 16kk..16kk+15, S's 8-column tiles 2kk and 2kk+1
    uint32_t pa[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      pa[kk][0] = u32_of(__floats2bfloat162_rn(s[8 * kk], s[8 * kk + 1]));
      pa[kk][1] = u32_of(__floats2bfloat162_rn(s[8 * kk + 2], s[8 * kk + 3]));
      pa[kk][2] = u32_of(__floats2bfloat162_rn(s[8 * kk + 4], s[8 * kk + 5]));
      pa[kk][3] = u32_of(__floats2bfloat162_rn(s[8 * kk + 6], s[8 * kk + 7]));
    }
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      if constexpr (TMA)  // V: 16 tokens = 2048 bytes per k-step; 64-column slabs 4096 bytes apart, 8 tokens 1024
        wg::mma_rs<NC, 1>(o, pa[kk], tma::sw128_desc(kt + kk * 2048 + wgi * (NC / 64) * kMlaT * 128, kMlaT * 128, 1024), 1);
      else  // V: tokens along k (8 per 128 bytes), columns along n (a piece per 512 bytes)
        wg::mma_rs<NC, 1>(o, pa[kk], wg::smem_desc(kt + kk * 256 + wgi * (NC / 8) * kMlaT * 16, 128, kMlaT * 16), 1);
    }
    wg::commit();
    wg::wait<0>();
  }
  if constexpr (!TMA) cp_async_wait<0>();
  mla_write_part<NC>(d, part, row, split, splits, hg, rr0, tq, wgi * NC, wgi == 0, o, m_r, l_r);
}

// olat16: o_lat in bf16 instead of fp32 (the same rounding the tensor-core W_UV matmul would apply)
// One block per (row, head): the max and sum of every split loaded together (one round trip), then each thread 4
// consecutive columns by float4 loads (the loop over columns has no store between its loads, which otherwise waited
// for each other: 14.9 µs at 64 × 4096 with scalar loads). Per column the same fma chain over the splits in order.
__global__ void __launch_bounds__(128) k_mla_combine(AttnDims d, int splits, const float* __restrict__ part, float* __restrict__ olat,
                                                     bf16* __restrict__ olat16) {
  pdl_entry();
  __shared__ float w_s[kMlaMaxSplits];
  __shared__ float inv_l;
  const int row = blockIdx.x, h = blockIdx.y, stride = mla_part_stride(d.C);
  const float* base = part + (static_cast<int64_t>(row) * splits * d.nh + h) * stride;
  const int64_t ss = static_cast<int64_t>(d.nh) * stride;  // from one split to the next
  if (threadIdx.x < 32) {  // one warp: the splits' maxima and sums
    float2 ml[kMlaMaxSplits / 32];
    float M = -INFINITY;
#pragma unroll
    for (int j = 0; j < kMlaMaxSplits / 32; ++j) {
      const int sp = threadIdx.x + 32 * j;
      ml[j] = sp < splits ? *reinterpret_cast<const float2*>(base + sp * ss + d.C) : make_float2(-INFINITY, 0.0f);
      M = fmaxf(M, ml[j].x);
    }
    for (int off = 16; off >= 1; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float L = 0.0f;
#pragma unroll
    for (int j = 0; j < kMlaMaxSplits / 32; ++j) {
      const int sp = threadIdx.x + 32 * j;
      const float w = ml[j].x == -INFINITY ? 0.0f : exp2f(ml[j].x - M);
      if (sp < splits) {
        L = __fmaf_rn(w, ml[j].y, L);
        w_s[sp] = w;
      }
    }
    L = warp_sum(L);
    if (threadIdx.x == 0) inv_l = 1.0f / L;
  }
  __syncthreads();
  const int64_t ob = (static_cast<int64_t>(row) * d.nh + h) * d.C;
  for (int c = 4 * threadIdx.x; c < d.C; c += 4 * blockDim.x) {  // (C is a multiple of 32; rows 16-byte aligned)
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int sp = 0; sp < splits; ++sp) {
      const float4 v = *reinterpret_cast<const float4*>(base + sp * ss + c);
      const float w = w_s[sp];
      acc.x = __fmaf_rn(v.x, w, acc.x);
      acc.y = __fmaf_rn(v.y, w, acc.y);
      acc.z = __fmaf_rn(v.z, w, acc.z);
      acc.w = __fmaf_rn(v.w, w, acc.w);
    }
    const float il = inv_l;
    if (olat16) {
      *reinterpret_cast<uint2*>(olat16 + ob + c) = make_uint2(pack_bf16(acc.x * il, acc.y * il), pack_bf16(acc.z * il, acc.w * il));
    } else {
      *reinterpret_cast<float4*>(olat + ob + c) = make_float4(acc.x * il, acc.y * il, acc.z * il, acc.w * il);
    }
  }
}

// ---- absorbed decode attention with specialized warpgroups (the default where the tiles come by tensor copies):
// the blocks, splits and partial results of k_mla_wg, with 64-token tiles in two stages. Warpgroup 0 computes the
// whole S = Q·Kᵀ of a tile (64 heads × 64 tokens, a chain of m64n64k16 over all C + 64 dimensions), runs the online
// softmax, and hands P (bf16) and each head's rescale factor to warpgroup 1 through shared memory; each warpgroup
// then adds P·V into its half of O (latent columns [0, C/2) and [C/2, C); P from registers in the first, from shared
// memory in the second). Nothing else couples them: no S halves to exchange and no softmax computed twice (k_mla_wg
// ties both warpgroups at two block barriers a tile, bench/NOTES.md 37), so the scores of tile j + 1 run on the
// tensor cores while warpgroup 1 still multiplies tile j. Two named barriers pace the pair: "P ready" (warpgroup 0
// arrives after writing P_j, warpgroup 1 waits) and "P consumed" (warpgroup 1 arrives after its P_j·V, warpgroup 0
// waits before writing P_j+1 — its thread 0 then loads tile j + 2 into the freed stage, while S_j+1 runs). One tile
// is in flight while one is multiplied (Q 72 KB + two 72 KB stages + P fill the shared memory).
constexpr int kWsT = 64, kMlaWsMinChunk = 1024;  // tokens per tile; per split where the launch splits evenly
size_t mla_ws_smem(int D) {
  const size_t SL = static_cast<size_t>(D + 63) / 64;
  return 1024 /* alignment of the swizzled slabs */ + SL * (kMlaH + 2 * kWsT) * 128 + kMlaH * kWsT * sizeof(bf16) + kMlaH * sizeof(float) +
         3 * sizeof(uint64_t);
}

// NC = C / 2 (the latent columns of O per warpgroup), SL = (C + 64) / 64 (128-byte slabs of a key row; rope 64).
template <int NC, int SL>
__global__ void __launch_bounds__(256, 1) k_mla_ws(AttnDims d, const AttnRow* rows, int chunk, float* part,
                                                   const __grid_constant__ CUtensorMap qmap, const CUtensorMap* maps) {
  pdl_entry();
  extern __shared__ __align__(1024) unsigned char ws_smem_raw[];
  constexpr int KS = 4 * SL;          // 16-wide k-steps of S
  constexpr int TB = kWsT * 128;      // bytes of one slab of a tile
  unsigned char* q_s = tma::align1024(ws_smem_raw);  // [SL][64 heads][128 B]
  unsigned char* k_s = q_s + SL * kMlaH * 128;                  // 2 stages × [SL][64 tokens][128 B]
  unsigned char* p_s = k_s + 2 * SL * TB;                       // P: [8 pieces of 8 tokens][64 heads][16 B]
  float* corr_s = reinterpret_cast<float*>(p_s + kMlaH * kWsT * 2);  // each head's factor for O before P_j·V
  uint64_t* bars = reinterpret_cast<uint64_t*>(corr_s + kMlaH);     // the two stages', then Q's
  const int row = blockIdx.x, split = blockIdx.y, hg = blockIdx.z, splits = gridDim.y;
  const AttnRow r = rows[row];
  const int wgi = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const MlaSplit sp = mla_split(r, chunk, split, kWsT);
  const int t0 = sp.t0, t1 = sp.t1, ntiles = sp.ntiles;
  // a tile: every slab in boxes of kMlaT rows (the maps' box); rows past the cache's length arrive as zeros
  auto load_tile = [&](int buf, int j0) {
    unsigned char* dst = k_s + buf * SL * TB;
    tma::expect(&bars[buf], SL * TB);
#pragma unroll
    for (int h = 0; h < kWsT / kMlaT; ++h) {
      for (int sl = 0; sl < SL - 1; ++sl) tma::load_2d(dst + sl * TB + h * kMlaT * 128, &maps[2 * row], 64 * sl, j0 + h * kMlaT, &bars[buf]);
      tma::load_2d(dst + (SL - 1) * TB + h * kMlaT * 128, &maps[2 * row + 1], 0, j0 + h * kMlaT, &bars[buf]);
    }
  };
  if (threadIdx.x == 0) {
    for (int i = 0; i < 3; ++i) tma::bar_init(&bars[i]);
    tma::bar_init_fence();
  }
  __syncthreads();
  if (ntiles > 0 && threadIdx.x == 0) {  // Q: rows of heads past this row's nh are the next row's (unused) or zeros
    tma::expect(&bars[2], SL * kMlaH * 128);
    for (int sl = 0; sl < SL; ++sl) tma::load_2d(q_s + sl * kMlaH * 128, &qmap, 64 * sl, row * d.nh + hg * kMlaH, &bars[2]);
    load_tile(0, t0);
    if (ntiles > 1) load_tile(1, t0 + kWsT);
  }
  float o[NC / 2];
#pragma unroll
  for (int i = 0; i < NC / 2; ++i) o[i] = 0.0f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
  const int rr0 = 16 * warp + g;  // this thread's heads (of the 64): rr0 and rr0 + 8
  if (wgi == 0) {
    const float sl = d.scale * 1.4426950408889634f;
    if (ntiles > 0) tma::wait(&bars[2], 0);
    for (int it = 0; it < ntiles; ++it) {
      const int st = it & 1;
      tma::wait(&bars[st], (it >> 1) & 1);
      const unsigned char* kt = k_s + st * SL * TB;
      float s[kWsT / 2];
#pragma unroll
      for (int i = 0; i < kWsT / 2; ++i) s[i] = 0.0f;
      wg::fence();
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)  // k-step ks: slab ks / 4, 32 bytes per k-step inside its 128-byte rows
        wg::mma_ss<kWsT, 0, 0>(s, tma::sw128_desc(q_s + (ks >> 2) * kMlaH * 128 + (ks & 3) * 32, 16, 1024),
                               tma::sw128_desc(kt + (ks >> 2) * TB + (ks & 3) * 32, 16, 1024), 1);
      wg::commit();
      if (it > 0) {
        named_sync(2);  // warpgroup 1's P_j-1·V has finished (this one's too): P and the other stage are free
        if (threadIdx.x == 0 && it + 1 < ntiles) load_tile(st ^ 1, t0 + (it + 1) * kWsT);
      }
      wg::wait<0>();
      // keys past the split's end (only in its last tile) are masked; every tile has a valid first key, so the running
      // maxima are finite from the first tile on and ex2(-inf) = 0 covers the initial m = -inf and masked keys
      const int jb = t0 + it * kWsT;
#pragma unroll
      for (int j = 0; j < kWsT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * tq + (e & 1);
          s[4 * j + e] = jb + col < t1 ? s[4 * j + e] * sl : -INFINITY;
        }
      float corr[2];
      mla_softmax_step<kWsT / 8>(s, m_r, l_r, corr);
      // P as the A operand (registers): k-step kk is tokens 16kk..16kk+15, S's 8-column tiles 2kk and 2kk+1; the
      // same words to shared memory for warpgroup 1 (8-token pieces of 64 heads × 16 bytes: conflict-free stores)
      uint32_t pa[kWsT / 16][4];
#pragma unroll
      for (int kk = 0; kk < kWsT / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) pa[kk][i] = u32_of(__floats2bfloat162_rn(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]));
#pragma unroll
      for (int j = 0; j < kWsT / 8; ++j) {
        const int kk = j >> 1, hi = j & 1;
        *reinterpret_cast<uint32_t*>(p_s + (j * kMlaH + rr0) * 16 + 4 * tq) = pa[kk][2 * hi];
        *reinterpret_cast<uint32_t*>(p_s + (j * kMlaH + rr0 + 8) * 16 + 4 * tq) = pa[kk][2 * hi + 1];
      }
      if (tq == 0) {
        corr_s[rr0] = corr[0];
        corr_s[rr0 + 8] = corr[1];
      }
      wg::fence_smem();  // P for the other warpgroup's wgmma (the async proxy)
      named_arrive(1);
      mla_rescale_o<NC>(o, corr[0], corr[1]);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < kWsT / 16; ++kk)  // V: 16 tokens = 2048 bytes per k-step; 64-column slabs TB apart
        wg::mma_rs<NC, 1>(o, pa[kk], tma::sw128_desc(kt + kk * 2048, TB, 1024), 1);
      wg::commit();
      wg::wait<0>();  // (no wgmma in flight across iterations: ptxas would serialize every chain, C7514)
    }
  } else {
    for (int it = 0; it < ntiles; ++it) {
      const int st = it & 1;
      tma::wait(&bars[st], (it >> 1) & 1);
      named_sync(1);  // P_j and the factors are written
      const float c0 = corr_s[rr0], c1 = corr_s[rr0 + 8];
      const unsigned char* kt = k_s + st * SL * TB;
      mla_rescale_o<NC>(o, c0, c1);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < kWsT / 16; ++kk)  // P: a k-step is 2 pieces (2048 bytes); V: the second half's slabs
        wg::mma_ss<NC, 0, 1>(o, wg::smem_desc(p_s + kk * 2 * kMlaH * 16, kMlaH * 16, 128),
                             tma::sw128_desc(kt + (NC / 64) * TB + kk * 2048, TB, 1024), 1);
      wg::commit();
      wg::wait<0>();
      if (it + 1 < ntiles) named_arrive(2);
    }
  }
  mla_write_part<NC>(d, part, row, split, splits, hg, rr0, tq, wgi * NC, wgi == 0, o, m_r, l_r);
}

constexpr int kRB = 16, kCB = 128;  // rows per block, output columns per block (4 per thread, 8 reduction parts)

// y[rr][n] = Σ_k x[rr][k] · W[k][n] for the first R (16 or 4) of the block's 16 rows and 128 columns of W (bf16, row
// stride ldw): each thread keeps R x 4 sums over its eighth of k; the eight partial sums are added in a fixed order
// (deterministic). A row's arithmetic does not depend on R: R = 4 (at most 4 live rows, the batch-1 decode step)
// only frees the registers to keep 16 weight loads in flight instead of 4 (the kernel is latency-bound there).
template <int R>
__device__ __forceinline__ void rows_matmul(const float* xT /* [K][16] smem */, const bf16* W, int64_t ldw, int K, int N,
                                            int n0, float* red /* [8][16][kCB] smem */) {
  constexpr int U = R <= 4 ? 16 : 4;  // weight loads in flight per thread
  const int cg = threadIdx.x & 31, part = threadIdx.x >> 5, n = n0 + 4 * cg;
  float acc[R][4];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) acc[rr][0] = acc[rr][1] = acc[rr][2] = acc[rr][3] = 0.0f;
  const int per = (K + 7) / 8, k0 = part * per, k1 = min(K, k0 + per);
  auto step = [&](int k, const float (&w)[4]) {
    const float4* xr = reinterpret_cast<const float4*>(xT + k * kRB);
#pragma unroll
    for (int q4 = 0; q4 < R / 4; ++q4) {
      const float4 x = xr[q4];
      const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[q4 * 4 + i][j] += xs[i] * w[j];
    }
  };
  if (n < N) {
    if (n + 3 < N && (ldw % 4) == 0) {
      for (int kb = k0; kb < k1; kb += U) {
        uint2 u[U];
#pragma unroll
        for (int q = 0; q < U; ++q)
          if (kb + q < k1) u[q] = *reinterpret_cast<const uint2*>(W + static_cast<int64_t>(kb + q) * ldw + n);
#pragma unroll
        for (int q = 0; q < U; ++q)
          if (kb + q < k1) {
            const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&u[q].x),
                                 hi = *reinterpret_cast<const __nv_bfloat162*>(&u[q].y);
            const float w[4] = {__low2float(lo), __high2float(lo), __low2float(hi), __high2float(hi)};
            step(kb + q, w);
          }
      }
    } else {
      for (int k = k0; k < k1; ++k) {
        const bf16* wr = W + static_cast<int64_t>(k) * ldw + n;
        float w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = n + j < N ? bf(wr[j]) : 0.0f;
        step(k, w);
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[(part * kRB + rr) * kCB + 4 * cg + j] = acc[rr][j];
  __syncthreads();
}

// Row rr, column j (of the block's kCB) of the product: the eight partial sums in a fixed order.
__device__ __forceinline__ float rows16_sum(const float* red, int rr, int j) {
  float v = 0.0f;
#pragma unroll
  for (int p = 0; p < 8; ++p) v += red[(p * kRB + rr) * kCB + j];
  return v;
}

size_t rows16_smem(int K) { return (static_cast<size_t>(K) * kRB + 8 * kRB * kCB) * sizeof(float); }

// q_lat = W_UK[h]ᵀ q_nope (also written in bf16 with q_rope after it, for the tensor-core kernel, when qcat is given).
template <int R>
__global__ void __launch_bounds__(256) k_qlat16(AttnDims d, const float* q, const bf16* w_uk, const AttnRow* rows, int n_rows,
                                                float* qlat, bf16* qcat) {
  pdl_entry();
  extern __shared__ float sm16[];
  float* xT = sm16;                  // [dn][16]
  float* red = sm16 + d.dn * kRB;    // [8][16][kCB]
  const int r0 = blockIdx.x * kRB, h = blockIdx.y, dq = d.dn + d.dr, D = d.C + d.dr, n0 = blockIdx.z * kCB;
  const int nr = min(kRB, n_rows - r0);
  for (int i = threadIdx.x; i < kRB * d.dn; i += blockDim.x) {
    const int rr = i / d.dn, k = i % d.dn;
    xT[k * kRB + rr] = rr < nr ? q[(static_cast<int64_t>(rows[r0 + rr].q_row) * d.nh + h) * dq + k] : 0.0f;
  }
  if (qcat && blockIdx.z == 0)  // the rope part, copied once per (rows, head)
    for (int i = threadIdx.x; i < nr * d.dr; i += blockDim.x) {
      const int rr = i / d.dr, k = i % d.dr;
      qcat[(static_cast<int64_t>(r0 + rr) * d.nh + h) * D + d.C + k] =
          __float2bfloat16(q[(static_cast<int64_t>(rows[r0 + rr].q_row) * d.nh + h) * dq + d.dn + k]);
    }
  __syncthreads();
  rows_matmul<R>(xT, w_uk + static_cast<int64_t>(h) * d.dn * d.C, d.C, d.dn, d.C, n0, red);
  for (int i = threadIdx.x; i < nr * kCB; i += blockDim.x) {
    const int rr = i / kCB, c = n0 + i % kCB;
    if (c >= d.C) continue;
    const float v = rows16_sum(red, rr, i % kCB);
    qlat[(static_cast<int64_t>(r0 + rr) * d.nh + h) * d.C + c] = v;
    if (qcat) qcat[(static_cast<int64_t>(r0 + rr) * d.nh + h) * D + c] = __float2bfloat16(v);
  }
}

// out = W_UV[h] o_lat
template <int R>
__global__ void __launch_bounds__(256) k_uv16(AttnDims d, const bf16* w_uvt, const AttnRow* rows, int n_rows, const float* olat,
                                              float* out) {
  pdl_entry();
  extern __shared__ float sm16[];
  float* xT = sm16;                 // [C][16]
  float* red = sm16 + d.C * kRB;    // [8][16][kCB]
  const int r0 = blockIdx.x * kRB, h = blockIdx.y, n0 = blockIdx.z * kCB;
  const int nr = min(kRB, n_rows - r0);
  for (int i = threadIdx.x; i < kRB * d.C; i += blockDim.x) {
    const int rr = i / d.C, c = i % d.C;
    xT[c * kRB + rr] = rr < nr ? olat[(static_cast<int64_t>(r0 + rr) * d.nh + h) * d.C + c] : 0.0f;
  }
  __syncthreads();
  rows_matmul<R>(xT, w_uvt + static_cast<int64_t>(h) * d.C * d.dv, d.dv, d.C, d.dv, n0, red);
  for (int i = threadIdx.x; i < nr * kCB; i += blockDim.x) {
    const int rr = i / kCB, v = n0 + i % kCB;
    if (v >= d.dv) continue;
    out[static_cast<int64_t>(rows[r0 + rr].q_row) * d.nh * d.dv + h * d.dv + v] = rows16_sum(red, rr, i % kCB);
  }
}

// The absorption matmuls on tensor cores, per head h: q_lat = q_nope · W_UK[h] (K = dn, N = C) and out = o_lat ·
// W_UV[h] (K = C, N = dv), with the activations rounded to bf16 (the reference's q_nope is bf16, and it rounds the
// attention output to bf16 too) and fp32 accumulation. A block is 64 output columns (16 per warp) × up to RB rows
// (16 or 64; m-tiles past the rows skipped), K in 32-wide stages of X (bf16) and W ([32 k][64 n], cp.async) in shared memory,
// the later stages' loads in flight while the current one is multiplied. Each output's chain of mma runs over k in
// order from zero, whatever the number of rows: a row's bits do not depend on the batch. q_lat goes to qcat (bf16,
// with the rope part after it), W_UV's output to Y (fp32).
constexpr int kHmRows = 64, kHmCols = 64, kHmK = 32, kHmXL = kHmK + 8, kHmWL = kHmCols + 8;
// XBF: X in bf16 (o_lat as the combine writes it), staged by cp.async in an NS-stage ring like W; otherwise X is fp32
// (q), read into registers a stage ahead and converted (NS = 2).
template <bool QLAT, bool XBF, int NS, int RB>
__global__ void __launch_bounds__(128) k_head_mm(AttnDims d, const void* __restrict__ Xv, const bf16* __restrict__ W,
                                                 const AttnRow* rows, int n_rows, float* __restrict__ Y, bf16* __restrict__ qcat) {
  pdl_entry();
  static_assert(XBF || NS == 2, "fp32 X goes through registers, one stage ahead");
  static_assert(RB % 16 == 0 && RB <= kHmRows, "rows per block: whole m-tiles");
  constexpr int MT = RB / 16;
  __shared__ __align__(16) bf16 xs[NS][RB * kHmXL];
  __shared__ __align__(16) bf16 ws[NS][kHmK * kHmWL];
  __shared__ int64_t xoff[RB];  // where each row's K inputs for this head start in X
  const float* X = static_cast<const float*>(Xv);
  const bf16* Xb = static_cast<const bf16*>(Xv);
  const int r0 = blockIdx.x * RB, h = blockIdx.y, n0 = blockIdx.z * kHmCols;
  const int K = QLAT ? d.dn : d.C, N = QLAT ? d.C : d.dv, D = d.C + d.dr, dq = d.dn + d.dr;
  const int nr = min(RB, n_rows - r0), mts = (nr + 15) / 16;
  const bf16* wh = W + static_cast<int64_t>(h) * K * N;
  for (int rr = threadIdx.x; rr < nr; rr += blockDim.x)
    xoff[rr] = QLAT ? (static_cast<int64_t>(rows[r0 + rr].q_row) * d.nh + h) * dq : (static_cast<int64_t>(r0 + rr) * d.nh + h) * d.C;
  __syncthreads();
  if (QLAT) {  // the rope part (bf16) after q_lat, 4 values per thread, spread over the column blocks
    const int q4 = d.dr / 4;
    for (int i = threadIdx.x + blockIdx.z * blockDim.x; i < nr * q4; i += blockDim.x * gridDim.z) {
      const int rr = i / q4, k = (i - rr * q4) * 4;
      const float4 v = __ldg(reinterpret_cast<const float4*>(X + xoff[rr] + d.dn + k));
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(qcat + (static_cast<int64_t>(r0 + rr) * d.nh + h) * D + d.C + k);
      dst[0] = __floats2bfloat162_rn(v.x, v.y);
      dst[1] = __floats2bfloat162_rn(v.z, v.w);
    }
  }
  auto load_w = [&](int buf, int k0) {  // W: 32 k × 8 pieces of 8 columns
    for (int i = threadIdx.x; i < kHmK * (kHmCols / 8); i += blockDim.x) {
      const int kk = i >> 3, c = n0 + (i & 7) * 8;
      cp_async16(&ws[buf][kk * kHmWL + (i & 7) * 8], wh + static_cast<int64_t>(k0 + kk) * N + (c < N ? c : 0), c < N ? 16 : 0);
    }
  };
  auto load_xb = [&](int buf, int k0) {  // bf16 X: rows × 4 pieces of 8 k
    for (int i = threadIdx.x; i < mts * 16 * (kHmK / 8); i += blockDim.x) {
      const int rr = i >> 2, p = i & 3;
      cp_async16(&xs[buf][rr * kHmXL + p * 8], Xb + xoff[rr < nr ? rr : 0] + k0 + p * 8, rr < nr ? 16 : 0);
    }
  };
  constexpr int XPT = RB * (kHmK / 4) / 128;  // fp32 X: float4 per thread and stage
  float4 xv[XPT];
  auto load_x = [&](int k0) {  // into registers; stored (as bf16) after the current stage's mma
#pragma unroll
    for (int u = 0; u < XPT; ++u) {
      const int i = threadIdx.x + 128 * u, rr = i >> 3;
      xv[u] = rr < nr ? __ldg(reinterpret_cast<const float4*>(X + xoff[rr] + k0 + (i & 7) * 4)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  };
  auto store_x = [&](int buf) {
#pragma unroll
    for (int u = 0; u < XPT; ++u) {
      const int i = threadIdx.x + 128 * u;
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(&xs[buf][(i >> 3) * kHmXL + (i & 7) * 4]);
      dst[0] = __floats2bfloat162_rn(xv[u].x, xv[u].y);
      dst[1] = __floats2bfloat162_rn(xv[u].z, xv[u].w);
    }
  };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3, lj = lane >> 3, l8 = lane & 7;
  float acc[MT][2][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < 2; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.0f;
  const int nst = K / kHmK;
  for (int i = 0; i < NS - 1; ++i) {  // one cp.async group per stage, empty past the last
    if (i < nst) {
      load_w(i, i * kHmK);
      if constexpr (XBF) load_xb(i, i * kHmK);
    }
    cp_async_commit();
  }
  if constexpr (!XBF) {
    load_x(0);
    store_x(0);
  }
  for (int st = 0; st < nst; ++st) {
    const int buf = st % NS, next = st + NS - 1;
    cp_async_wait<NS - 2>();
    __syncthreads();  // stage st is in; every warp is done with stage st - 1's buffers, which `next` reuses
    if (next < nst) {  // the later stages' loads in flight during this one's mma
      load_w(next % NS, next * kHmK);
      if constexpr (XBF) load_xb(next % NS, next * kHmK);
      else load_x(next * kHmK);
    }
    cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < kHmK / 16; ++kk) {
      uint32_t b[4];
      ldsm4t(b, &ws[buf][(kk * 16 + l8 + 8 * (lj & 1)) * kHmWL + warp * 16 + 8 * (lj >> 1)]);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < mts) {
          uint32_t a[4];
          ldsm4(a, &xs[buf][(m * 16 + l8 + 8 * (lj & 1)) * kHmXL + kk * 16 + 8 * (lj >> 1)]);
          mma16816(acc[m][0], a, b[0], b[1]);
          mma16816(acc[m][1], a, b[2], b[3]);
        }
    }
    if constexpr (!XBF)
      if (next < nst) store_x(next % NS);  // (that buffer was last read in stage st - 1, before the barrier)
  }
  cp_async_wait<0>();
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = m * 16 + g + 8 * (e >> 1), c = n0 + warp * 16 + n * 8 + 2 * tq + (e & 1);
        if (m >= mts || rr >= nr || c >= N) continue;
        const float v = acc[m][n][e];
        if (QLAT) {  // q_lat in bf16 for the tensor-core attention (the fp32 copy is only the CUDA-core kernel's)
          qcat[(static_cast<int64_t>(r0 + rr) * d.nh + h) * D + c] = __float2bfloat16(v);
        } else {
          Y[static_cast<int64_t>(rows[r0 + rr].q_row) * d.nh * d.dv + h * d.dv + c] = v;
        }
      }
}
bool head_mm_ok(const AttnDims& d) { return d.dn % kHmK == 0 && d.C % kHmK == 0 && d.dv % 8 == 0 && d.dr % 4 == 0; }

// (value, id) ordered as the samplers order logits: larger value first, then lower id.
__device__ __forceinline__ bool before(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// logits_top in one launch over chunks of the vocabulary, so one row spreads over many multiprocessors: each
// chunk's block takes its M best (value, id) and Σ exp(l − chunk max) in double from the chunk it holds in shared
// memory; the row's last block to finish (a counter per row) takes the M best of the chunks' candidates and the
// log of Σ sum_c · exp(max_c − row max), added in chunk order. Every (value, id) comparison is the samplers' order,
// as in the CPU reference.
constexpr int kTopChunk = 4096, kTopThreads = 512;
__device__ __forceinline__ void top_reduce(float* sv, int* si) {
  for (int w = kTopThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w && before(sv[threadIdx.x + w], si[threadIdx.x + w], sv[threadIdx.x], si[threadIdx.x])) {
      sv[threadIdx.x] = sv[threadIdx.x + w];
      si[threadIdx.x] = si[threadIdx.x + w];
    }
    __syncthreads();
  }
}
// M passes over n (value, id) pairs read by get(j), each taking the best pair after the previous pass's; writes
// the M picks to out_v/out_i (thread 0). Pairs past the available ones come out as (-inf, INT_MAX).
template <class Get>
__device__ void top_passes(int n, int M, Get get, float* sv, int* si, float* out_v, int* out_i) {
  float pv = INFINITY;
  int pid = -1;
  for (int m = 0; m < M; ++m) {
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      float v;
      int id;
      get(j, v, id);
      const bool after = v < pv || (v == pv && id > pid);
      if (after && before(v, id, bv, bi)) { bv = v; bi = id; }
    }
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    top_reduce(sv, si);
    pv = sv[0];
    pid = si[0];
    if (threadIdx.x == 0) {
      out_v[m] = pv;
      out_i[m] = pid;
    }
    __syncthreads();
  }
}
__global__ void __launch_bounds__(kTopThreads) k_top(const float* lg, int64_t V, int M, float* cand_v, int* cand_i,
                                                     float* cmax, double* psum, int* done, float* maxv, double* log_sum,
                                                     float* top_v, int32_t* top_i) {
  pdl_entry();
  __shared__ float sl[kTopChunk];
  __shared__ float sv[kTopThreads];
  __shared__ int si[kTopThreads];
  __shared__ double sd[kTopThreads];
  __shared__ bool last;
  const int nch = gridDim.x;
  const int64_t r = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * kTopChunk;
  const int n = static_cast<int>(min(static_cast<int64_t>(kTopChunk), V - c0));
  const float* l = lg + r * V + c0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sl[i] = l[i];
  __syncthreads();
  const int64_t at = (r * nch + blockIdx.x) * M;
  top_passes(n, M, [&](int j, float& v, int& id) { v = sl[j]; id = static_cast<int>(c0 + j); }, sv, si, cand_v + at,
             cand_i + at);
  __shared__ float m_sh;
  if (threadIdx.x == 0) m_sh = cand_v[at];  // the first pick: the chunk's max (thread 0 wrote it)
  __syncthreads();
  const float m = m_sh;
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += exp(static_cast<double>(sl[i] - m));
  sd[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kTopThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sd[threadIdx.x] += sd[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    psum[r * nch + blockIdx.x] = sd[0];
    cmax[r * nch + blockIdx.x] = m;
    __threadfence();  // this chunk's results, visible device-wide before it counts itself in
    last = atomicAdd(done + r, 1) == nch - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* cv = cand_v + r * nch * M;
  const int* ci = cand_i + r * nch * M;
  top_passes(nch * M, M, [&](int j, float& v, int& id) { v = __ldcg(cv + j); id = __ldcg(ci + j); }, sv, si,
             top_v + r * M, reinterpret_cast<int*>(top_i) + r * M);
  if (threadIdx.x == 0) {
    const float mx = top_v[r * M];  // the row's max (thread 0 wrote it)
    double t = 0;
    for (int b = 0; b < nch; ++b) {
      const float cm = __ldcg(cmax + r * nch + b);
      if (cm == -INFINITY && mx != -INFINITY) continue;  // a chunk of -inf logits adds nothing (its sum is NaN)
      t += __ldcg(psum + r * nch + b) * exp(static_cast<double>(cm - mx));
    }
    maxv[r] = mx;
    log_sum[r] = log(t);
    done[r] = 0;  // for the next launch on this stream
  }
}

__global__ void __launch_bounds__(256) k_row_ops(float* data, int64_t width, const int64_t* rows, const int* seg,
                                                 const DRowOp* ops, const float* vecs) {
  pdl_entry();
  __shared__ double part[256];
  float* h = data + rows[blockIdx.x] * width;
  for (int k = seg[blockIdx.x]; k < seg[blockIdx.x + 1]; ++k) {
    const DRowOp op = ops[k];
    const float* v = vecs + static_cast<int64_t>(op.vec) * width;
    if (op.kind == 0) {
      for (int64_t i = threadIdx.x; i < width; i += blockDim.x) h[i] += op.add_coef * v[i];
      __syncthreads();
      continue;
    }
    double acc = 0;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) acc += static_cast<double>(h[i]) * v[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
      __syncthreads();
    }
    const double sc = (op.target - part[0] / op.vnorm) / op.vnorm;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) h[i] = static_cast<float>(h[i] + sc * v[i]);
    __syncthreads();
  }
}

// ---- sampling a whole row on the device with the caller's uniform draw (model/logits.hpp's rule): mass
// e_i = exp((l_i - max) / T) in double; the token whose cumulative mass in descending-logit order (ties: lower id
// first) first exceeds u x (nucleus mass) is found by a 4-pass radix select over the logits' order keys, then a
// walk of the tied ids. Scratch e: [rows, V] doubles.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The first element in (descending key, ascending id) order whose cumulative mass reaches X: strictly above X
// (strict) or at least X. Returns its id; *cum_before gets the mass before it... computed by the whole block.
__device__ int select_crossing(const float* l, const double* e, int64_t V, double X, bool strict, double* hist,
                               double* red, int* sel) {
  uint32_t prefix = 0;
  double above = 0;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t mask = level == 0 ? 0u : (0xFFFFFFFFu << (32 - 8 * level));
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const uint32_t k = order_key(l[i]);
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], e[i]);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double cum = above;
      int b = 255;
      for (; b > 0; --b) {
        const double next = cum + hist[b];
        if (strict ? next > X : next >= X) break;
        cum = next;
      }
      sel[0] = b;
      red[0] = cum;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sel[0]) << shift;
    above = red[0];
    __syncthreads();
  }
  // tied ids at key `prefix`, in ascending id order: each thread a contiguous chunk
  const int64_t chunk = (V + blockDim.x - 1) / blockDim.x;
  const int64_t i0 = threadIdx.x * chunk, i1 = min(V, i0 + chunk);
  double mine = 0;
  for (int64_t i = i0; i < i1; ++i)
    if (order_key(l[i]) == prefix) mine += e[i];
  hist[threadIdx.x] = mine;  // blockDim.x <= 256 here
  __syncthreads();
  if (threadIdx.x == 0) {
    double cum = above;
    int t = 0, last = -1;
    for (; t < static_cast<int>(blockDim.x); ++t) {
      if (hist[t] > 0) last = t;
      if (strict ? cum + hist[t] > X : cum + hist[t] >= X) break;
      cum += hist[t];
    }
    if (t == static_cast<int>(blockDim.x)) t = last < 0 ? 0 : last;  // rounding: the last tied element
    sel[0] = t;
    red[0] = cum;
  }
  __syncthreads();
  int found = -1;
  if (threadIdx.x == sel[0]) {
    double cum = red[0];
    for (int64_t i = i0; i < i1; ++i) {
      if (order_key(l[i]) != prefix) continue;
      found = static_cast<int>(i);
      cum += e[i];
      if (strict ? cum > X : cum >= X) break;
    }
    sel[1] = found;
  }
  __syncthreads();
  const int r = sel[1];
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(256) k_sample_rows(const float* lg, int64_t V, const int64_t* rows,
                                                     const RowDrawD* draws, double* scratch, int32_t* tok, float* logit) {
  pdl_entry();
  __shared__ double hist[256], red[2];
  __shared__ int sel[2];
  __shared__ float smx[256];
  const float* l = lg + rows[blockIdx.x] * V;
  double* e = scratch + blockIdx.x * V;
  const RowDrawD d = draws[blockIdx.x];
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, l[i]);
  smx[threadIdx.x] = mx;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) smx[threadIdx.x] = fmaxf(smx[threadIdx.x], smx[threadIdx.x + w]);
    __syncthreads();
  }
  const double m = smx[0];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) acc += (e[i] = exp((l[i] - m) / d.temperature));
  hist[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) hist[threadIdx.x] += hist[threadIdx.x + w];
    __syncthreads();
  }
  const double S = hist[0];
  __syncthreads();
  double N = S;  // the nucleus: the smallest prefix whose mass reaches top_p (inclusive)
  int end_id = -1;
  if (d.top_p < 1.0) {
    end_id = select_crossing(l, e, V, d.top_p * S, false, hist, red, sel);
    // nucleus mass = mass strictly before the end element in the order + its own
    const float le = l[end_id];
    const uint32_t ke = order_key(le);
    double part = 0;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const uint32_t k = order_key(l[i]);
      if (k > ke || (k == ke && i <= end_id)) part += e[i];
    }
    hist[threadIdx.x] = part;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) hist[threadIdx.x] += hist[threadIdx.x + w];
      __syncthreads();
    }
    N = hist[0];
    __syncthreads();
  }
  int t = select_crossing(l, e, V, d.u * N, true, hist, red, sel);
  if (end_id >= 0) {  // never past the nucleus (rounding)
    const uint32_t kt = order_key(l[t]), ke = order_key(l[end_id]);
    if (kt < ke || (kt == ke && t > end_id)) t = end_id;
  }
  if (threadIdx.x == 0) {
    tok[blockIdx.x] = t;
    logit[blockIdx.x] = l[t];
  }
}

// ---- streamed-weight matmul ("few-row": built for decode, where a group has few rows, and used for every aligned
// shape so that a row's result never depends on how many rows come with it). The weights are the mma's A operand
// (16 output features × 16 k per m16n8k16), read from global memory straight into registers and dequantized there
// (no shared-memory tile); X is the B operand (8 rows per n-tile, up to 32 rows per block: the row tiles of
// row_tile()), staged in shared memory. Each lane reads 16 contiguous weight bytes per row and chunk, so the k order
// inside a chunk is a lane-specific permutation that the B fragments follow; X is staged in its own order with an
// XOR swizzle inside 128-byte segments (few_swz), so that every X read is one conflict-free 16-byte load (NOTES
// 55). A block is 4 warps × 16 output features over a range of K stages; dense matrices with few output columns split K over blocks by shape alone (partial sums
// added in split order by the tile's last block). Each output element's chain of operations depends only on its own row,
// the weights and the shape, so it is the same alone or batched. The dequantized weight values are those of the
// tile kernels (bf16(fp8 · scale), bf16((q − 8) · scale)); the fp32 sums are grouped differently.
constexpr int kFewWarps = 4, kFewCols = 16 * kFewWarps, kFewWideWarps = 8;
template <int FMT>
__host__ __device__ constexpr int few_kc() { return FMT == kInt4 ? 512 : 256; }  // K per stage
template <int FMT>
__host__ __device__ constexpr int few_per16() { return FMT == kBf16 ? 8 : FMT == kFp8 ? 16 : 32; }  // elements per 16 B
template <int FMT>
__host__ __device__ constexpr int few_chunks() { return few_kc<FMT>() / (4 * few_per16<FMT>()); }
// K per stage of a matrix in its format
__host__ __device__ constexpr int few_stage_k(const DLin& W) { return W.fmt == kInt4 ? few_kc<kInt4>() : few_kc<kBf16>(); }
template <int FMT>
__host__ __device__ constexpr int few_xld() { return few_kc<FMT>(); }  // X row stride (elements; a multiple of 128 bytes)
// The XOR swizzle of X's 16-byte pieces inside each 128-byte segment of a staged row (k_gemm_few): piece q of row r
// sits at slot q ^ few_swz. Lane (gq, tq) reads its P pieces per chunk (P = 1, 2, 4 for bf16, FP8, INT4), the four
// lanes of a quad side by side; with the swizzle the eight 16-byte reads of a quarter-warp (rows gq, gq + 1) fall
// in eight different bank groups, and the eight pieces a quarter-warp copies stay in one segment.
template <int P>
__device__ __forceinline__ int few_swz(int r, int q) { return P == 1 ? 4 * (r & 1) : P == 2 ? (r & 1) : ((q >> 3) & 1) | 2 * (r & 1); }
template <int FMT>
__host__ __device__ constexpr size_t few_smem(int nt) { return size_t(2) * 8 * nt * few_xld<FMT>() * 2; }

// n / d for d > 0 with m = (2^32 − 1) / d taken once: floor(n·m / 2^32) is n / d or one less (its error
// n·(2^32 − m·d) / (d·2^32) < n / 2^32 < 1), so one compare corrects it — four integer instructions where a division
// by a run-time divisor is a dozen (the streamed kernel's scale index per chunk and row)
__device__ __forceinline__ uint32_t div_by(uint32_t n, uint32_t d, uint32_t m) {
  const uint32_t q = __umulhi(n, m);
  return q + (n - q * d >= d ? 1u : 0u);
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
// two e4m3 bytes (low byte first) -> bf16x2 of bf16(fp8 · sc), as load_w_tile computes each
__device__ __forceinline__ uint32_t fp8x2_deq(uint32_t two, float sc) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return u32_of(__floats2bfloat162_rn(f.x * sc, f.y * sc));
}
// nibbles 0 and 4 of w (each q + 8) -> bf16x2 of bf16((q − 8) · sc): 128 + nibble built as a bf16 bit pattern,
// minus 136 exactly; then one rounding of the product (bf16 multiply when the scale is a bf16 value, else fp32)
// L3: the mask and the bias as one LOP3 (written as two operations with two constants, ptxas emits two: an
// instruction holds one immediate). The streamed kernel's integer pipe (half the rate of the FMA pipes) bounds its
// INT4 dequantization; the warpgroup kernel got slower with it (NOTES 55), so it keeps the plain form.
template <bool SB, bool L3 = false>
__device__ __forceinline__ uint32_t int4x2_deq(uint32_t w, float sc, __nv_bfloat162 sc2) {
  uint32_t v;
  if constexpr (L3) asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(w), "r"(0x000f000fu), "r"(0x43004300u));  // (a & b) | c
  else v = (w & 0x000f000fu) | 0x43004300u;
  const __nv_bfloat162 q = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), __floats2bfloat162_rn(136.0f, 136.0f));
  if constexpr (SB) {
    return u32_of(__hmul2(q, sc2));
  } else {
    const float2 f = __bfloat1622float2(q);
    return u32_of(__floats2bfloat162_rn(f.x * sc, f.y * sc));
  }
}

// X elements 0-7 of a 16-byte piece as INT4 fragments take them: (0, 4), (1, 5), (2, 6), (3, 7) — the B words of
// an mma with int4x2_deq's A (nibbles 2h, 2h + 4 and 2h + 1, 2h + 5 of a weight word) are words 2h and 2h + 1
__device__ __forceinline__ uint32_t int4_pair_word(const uint4& v, int i) {  // word i of the paired piece
  const uint32_t lo = i < 2 ? v.x : v.y, hi = i < 2 ? v.z : v.w;
  return __byte_perm(lo, hi, i % 2 == 0 ? 0x5410 : 0x7632);
}

// L2 prefetch of the weights (prefetch.global.L2, 128-byte lines; the block's 64 weight rows of one K stage, two
// lines a thread at most). A dense launch's weights are known before the kernel before it is done (no kernel writes
// them): its first kFewPrefetch stages are asked for before the wait on that kernel, so that the block's first loads
// after the wait find them in L2 and the weight stream starts while the kernel before ends (the small kernels
// between a decode step's matmuls leave the memory idle); grouped launches learn their groups after the wait.
// Prefetching stage st + 1 inside the loop as well made the batch-1 step 20% slower (NOTES 67).
constexpr int kFewPrefetch = 2;
// A streamed weight load (16 bytes, read once). L2B: through the read-only path without a place in L1, asking L2
// for the 256-byte block around it (a quad's four lanes read 64 contiguous bytes of a row per chunk and the next
// chunks follow): the dense launches (the batch-1 step 1659-1728 -> 1584-1627 us, NOTES 70) and INT4's expert
// launches of up to 8 rows (NOTES 71); the other expert launches keep __ldg (with the hint they were 2-4% slower at
// 64-256 tokens) and their code: L2B is a template argument.
template <bool L2B>
__device__ __forceinline__ uint4 ld_weights(const uint8_t* p) {
  if constexpr (L2B) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
  }
  return __ldg(reinterpret_cast<const uint4*>(p));
}
template <int FMT>
__device__ __forceinline__ void few_prefetch(const DLin& W, int ct, int ks, int ksplit) {
  constexpr int KC = few_kc<FMT>();
  constexpr int BPR = FMT == kBf16 ? KC * 2 : FMT == kFp8 ? KC : KC / 2;  // bytes of a row's stage
  constexpr int LPR = BPR / 128;                                          // 128-byte lines per row and stage
  const int nst = W.K / KC, sps = (nst + ksplit - 1) / ksplit, st0 = ks * sps;
  const int st1 = min(nst, st0 + min(sps, kFewPrefetch));
  for (int st = st0; st < st1; ++st)
    for (int i = threadIdx.x; i < kFewCols * LPR; i += blockDim.x) {
      const int n = ct * kFewCols + i / LPR;
      if (n < W.N)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(W.w + static_cast<int64_t>(n) * W.w_ld + static_cast<int64_t>(st) * BPR +
                                                        (i % LPR) * 128));
    }
}

// Five blocks per multiprocessor at up to 8 rows (NT = 1; 96 registers): the gate+up pair at one row has 576 blocks
// (9 experts or 18432 features x 2, 64 per block), one wave of 660 slots instead of 528 + a partial second wave.
// K split (SPLIT, part != nullptr): each block writes its split's sums to part; the last of a tile's ksplit blocks to
// finish (a counter per tile in cnt, which it resets) adds the splits' sums in split order into Y: Y[i] = Σ_s
// part[s][i] from 0 — what a separate reduction kernel did, without its launch (NOTES 61). A template parameter, so
// that the unsplit launches (every expert launch) compile without that tail: with it in every variant the MoE block
// ran 5-10% slower at 1-256 tokens (NOTES 63).
// Grouped launches with the row tiles by size (Groups::cls_tiles) run one launch per size, each over its list, so
// that an expert of a few rows runs at NT = 1's occupancy beside one of 30 (NOTES 64).
// One block's tile: rows [r0, r0 + rows) of group g (rows <= 8·NT), output features ct·64 .. +64, K split part ks
// (SPLIT: the split counters are per (blockIdx.z, blockIdx.y, column tile)); L2B: ld_weights' L2 hint.
template <int FMT, int NT, bool SB, bool SPLIT, bool L2B, int WB>
__device__ __forceinline__ void few_tile(const bf16* __restrict__ X, int M, float* __restrict__ Y, const DLin& W, int ksplit,
                                         float* part, int* cnt, int g, int r0, int rows, int ct, int ks) {
  constexpr int KC = few_kc<FMT>(), E16 = few_per16<FMT>(), CH = few_chunks<FMT>(), CW = 4 * E16;
  constexpr int XLD = few_xld<FMT>(), R = 8 * NT, P = E16 / 8;  // P: a lane's 16-byte X pieces per chunk
  constexpr int C = 16 * WB, NTH = 32 * WB;                      // the block's output features and threads
  const int nst = W.K / KC, sps = (nst + ksplit - 1) / ksplit, st0 = ks * sps, st1 = min(nst, st0 + sps);
  extern __shared__ __align__(16) uint8_t few_sm[];
  bf16* xs = reinterpret_cast<bf16*>(few_sm);  // [2][R][XLD]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int nA = ct * C + warp * 16 + gq, nB = nA + 8;
  const bool okA = nA < W.N, okB = nB < W.N;
  const uint8_t* wb = W.w + g * W.w_stride;
  const SPtr sb = scales_of(W, g);
  const uint8_t* rowA = wb + static_cast<int64_t>(okA ? nA : 0) * W.w_ld;
  const uint8_t* rowB = wb + static_cast<int64_t>(okB ? nB : 0) * W.w_ld;
  // the scales' rows of the lane's two weight rows, once; k's scale column by a reciprocal taken once (div_by)
  // (32-bit: a matrix holds fewer than 2^31 scales; the group's offset is in sb)
  const uint32_t kmul = FMT == kBf16 ? 0u : 0xffffffffu / static_cast<uint32_t>(FMT == kFp8 ? W.bi : W.g);
  const int srA = (FMT == kFp8 ? (okA ? nA / W.bo : 0) : (okA ? nA : 0)) * W.s_cols;
  const int srB = (FMT == kFp8 ? (okB ? nB / W.bo : 0) : (okB ? nB : 0)) * W.s_cols;
  auto stage_x = [&](int st, int buf) {
    bf16* dst = xs + buf * R * XLD;
    constexpr int cpr = KC / 8;  // 16-byte pieces per row
    for (int c = threadIdx.x; c < R * cpr; c += NTH) {
      const int r = c / cpr, q = c - r * cpr;
      const bool ok = r < rows;
      cp_async16(dst + r * XLD + (q ^ few_swz<P>(r, q)) * 8,
                 X + static_cast<int64_t>(r0 + (ok ? r : 0)) * W.K + static_cast<int64_t>(st) * KC + q * 8, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  if (st0 < st1) stage_x(st0, 0);
  for (int st = st0; st < st1; ++st) {
    const int buf = (st - st0) & 1;
    uint4 wa[CH], wv[CH];
    float sa[CH], sv[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int k = st * KC + c * CW + tq * E16;  // first element of this lane's 16 bytes
      const int64_t off = FMT == kBf16 ? int64_t(k) * 2 : FMT == kFp8 ? int64_t(k) : int64_t(k) / 2;
      wa[c] = okA ? ld_weights<L2B>(rowA + off) : make_uint4(0, 0, 0, 0);
      wv[c] = okB ? ld_weights<L2B>(rowB + off) : make_uint4(0, 0, 0, 0);
      if constexpr (FMT == kFp8) {
        const uint32_t kb = div_by(k, W.bi, kmul);
        sa[c] = okA ? sb.ld<false>(srA + kb) : 0.0f;
        sv[c] = okB ? sb.ld<false>(srB + kb) : 0.0f;
      } else if constexpr (FMT == kInt4) {
        // bf16 scales: kept as their raw bits (low half) until the chunk's dequantization builds the bf16x2 from
        // them with one multiply. Shifted into a float right at the load instead, the same kernel was far slower
        // (gate+up at 16 rows 155 us against 93, and 110 with fp32 scales; NOTES 58) — presumably the conversion
        // was placed right after the load, so each stage waited for it before staging the next X
        const uint32_t kg = div_by(k, W.g, kmul);
        const int64_t ia = srA + kg, ib = srB + kg;
        if constexpr (SB) {
          sa[c] = okA ? __uint_as_float(__ldg(sb.h + ia)) : 0.0f;
          sv[c] = okB ? __uint_as_float(__ldg(sb.h + ib)) : 0.0f;
        } else {
          sa[c] = okA ? sb.ld<false>(ia) : 0.0f;
          sv[c] = okB ? sb.ld<false>(ib) : 0.0f;
        }
      }
    }
    if (st + 1 < st1) stage_x(st + 1, buf ^ 1);
    else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    constexpr bool kPair = FMT == kInt4 && NT >= 2;
    if constexpr (kPair) {
      // INT4 fragments pair elements e and e + 4 of each 8 (int4x2_deq): the block pairs X once per stage, in place
      // (each piece's 16 bytes permuted), instead of each warp doing it with two byte permutes per mma and row tile
      uint4* xp = reinterpret_cast<uint4*>(xs + buf * R * XLD);
      const int n = (rows + 7) / 8 * 8 * (XLD / 8);
      for (int i = threadIdx.x; i < n; i += NTH) {
        const uint4 v = xp[i];
        xp[i] = make_uint4(int4_pair_word(v, 0), int4_pair_word(v, 1), int4_pair_word(v, 2), int4_pair_word(v, 3));
      }
      __syncthreads();
    }
    // lane (gq, tq) reads piece p of chunk c, piece q = c·4P + tq·P + p of rows gq + 8j (row parity = gq's), at
    // slot q ^ few_swz: the swizzle only touches bits the lane's own part of q holds, so the slot is a lane offset
    // per p (per chunk parity for bf16: c·4 has bit 2) plus a constant
    const bf16* xb = xs + buf * R * XLD + gq * XLD;
    auto xaddr = [&](int j, int c, int p) {
      const int lq = P == 1 ? (c & 1) * 4 + tq : tq * P + p;  // the bits of q below 8 (P = 1) or below 4P
      const int base = P == 1 ? (c >> 1) * 8 : c * 4 * P;
      return xb + j * 8 * XLD + (base + (lq ^ few_swz<P>(gq, lq))) * 8;
    };
    auto xpiece = [&](int j, int c, int p) { return *reinterpret_cast<const uint4*>(xaddr(j, c, p)); };
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      if constexpr (FMT == kBf16 && NT == 1) {  // half a piece per mma: two registers fewer live (96 at five blocks per SM)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t a[4] = {word_of(wa[c], 2 * h), word_of(wv[c], 2 * h), word_of(wa[c], 2 * h + 1), word_of(wv[c], 2 * h + 1)};
          const uint2 b = *reinterpret_cast<const uint2*>(xaddr(0, c, 0) + 4 * h);
          mma16816(acc[0], a, b.x, b.y);
        }
      } else if constexpr (FMT == kBf16) {
        uint4 xv[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j)
          if (j * 8 < rows) xv[j] = xpiece(j, c, 0);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t a[4] = {word_of(wa[c], 2 * h), word_of(wv[c], 2 * h), word_of(wa[c], 2 * h + 1), word_of(wv[c], 2 * h + 1)};
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (j * 8 < rows) mma16816(acc[j], a, word_of(xv[j], 2 * h), word_of(xv[j], 2 * h + 1));
        }
      } else if constexpr (FMT == kFp8) {
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          uint4 xv[NT];
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (j * 8 < rows) xv[j] = xpiece(j, c, p);
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int h = 2 * p + hh;
            const uint32_t pa = word_of(wa[c], h), pb = word_of(wv[c], h);
            const uint32_t a[4] = {fp8x2_deq(pa, sa[c]), fp8x2_deq(pb, sv[c]), fp8x2_deq(pa >> 16, sa[c]), fp8x2_deq(pb >> 16, sv[c])};
#pragma unroll
            for (int j = 0; j < NT; ++j)
              if (j * 8 < rows) mma16816(acc[j], a, word_of(xv[j], 2 * hh), word_of(xv[j], 2 * hh + 1));
          }
        }
      } else {
        __nv_bfloat162 s2a, s2b;
        if constexpr (SB) {
          const uint32_t ba = __float_as_uint(sa[c]) * 0x10001u, bb = __float_as_uint(sv[c]) * 0x10001u;
          s2a = *reinterpret_cast<const __nv_bfloat162*>(&ba);
          s2b = *reinterpret_cast<const __nv_bfloat162*>(&bb);
        } else {
          s2a = __floats2bfloat162_rn(sa[c], sa[c]);
          s2b = __floats2bfloat162_rn(sv[c], sv[c]);
        }
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          const uint32_t pa = word_of(wa[c], wi), pb = word_of(wv[c], wi);
          uint4 xv[NT];  // paired by the block's pass (kPair), else paired per mma below
#pragma unroll
          for (int j = 0; j < NT; ++j)
            if (j * 8 < rows) xv[j] = xpiece(j, c, wi);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // elements (2h, 2h+4) and (2h+1, 2h+5) of the word's eight
            const uint32_t a[4] = {int4x2_deq<SB, true>(pa >> (8 * h), sa[c], s2a), int4x2_deq<SB, true>(pb >> (8 * h), sv[c], s2b),
                                   int4x2_deq<SB, true>(pa >> (8 * h + 4), sa[c], s2a),
                                   int4x2_deq<SB, true>(pb >> (8 * h + 4), sv[c], s2b)};
#pragma unroll
            for (int j = 0; j < NT; ++j)
              if (j * 8 < rows)
                mma16816(acc[j], a, kPair ? word_of(xv[j], 2 * h) : int4_pair_word(xv[j], 2 * h),
                         kPair ? word_of(xv[j], 2 * h + 1) : int4_pair_word(xv[j], 2 * h + 1));
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is staged again
  }
  cp_async_wait<0>();
  float* out = part ? part + static_cast<int64_t>(ks) * M * W.N : Y;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = j * 8 + 2 * tq + e;
      if (tok < rows) {
        const int64_t row = static_cast<int64_t>(r0 + tok) * W.N;
        if (okA) out[row + nA] = acc[j][e];
        if (okB) out[row + nB] = acc[j][2 + e];
      }
    }
  if constexpr (SPLIT) {
    // the tile's split sums: the last block to arrive adds them
    __shared__ int last;
    __threadfence();  // this block's partial sums, visible device-wide before it counts itself in
    __syncthreads();
    int* c = cnt + (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * (gridDim.x / ksplit) + ct;
    if (threadIdx.x == 0) last = atomicAdd(c, 1) == ksplit - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int64_t plane = static_cast<int64_t>(M) * W.N;
    for (int i = threadIdx.x; i < rows * C; i += NTH) {
      const int tok = i / C, n = ct * C + i % C;
      if (n >= W.N) continue;
      const int64_t o = static_cast<int64_t>(r0 + tok) * W.N + n;
      float a = 0;
      for (int sp = 0; sp < ksplit; ++sp) a += __ldcg(part + sp * plane + o);
      Y[o] = a;
    }
    if (threadIdx.x == 0) *c = 0;  // for the next launch on this stream
  }
}

// MINB: blocks per multiprocessor the registers must allow (launch bounds). Five at up to 8 rows; dense bf16
// matrices at up to 8 rows (lm_head, the attention's and dense MLP's projections at decode) take four, where the
// kernel does not spill (40 bytes at five): the batch-1 step 1722-1748 -> 1661-1687 us (NOTES 68). The grouped bf16
// expert launches keep five (their gate+up at one token is one wave of 576 blocks at five, not at four).
template <int FMT, int NT, bool SB, bool SPLIT, int MINB, bool L2B, int WB = kFewWarps>
__global__ void __launch_bounds__(32 * WB, MINB) k_gemm_few(const bf16* __restrict__ X, int M, float* __restrict__ Y, DLin W,
                                                     float* __restrict__ Y2, DLin W2, Groups gr, int ksplit,
                                                     float* part, int* cnt) {
  if (blockIdx.z == 1) {
    W = W2;
    Y = Y2;
    if (part) part += static_cast<int64_t>(ksplit) * M * W.N;
  }
  const int ct = blockIdx.x / ksplit, ks = blockIdx.x - ct * ksplit;
  if (kFewPrefetch > 0 && !gr.row_off && blockIdx.y == 0) few_prefetch<FMT>(W, ct, ks, ksplit);
  // gr.late: a launch per tile size after the first of its matmul (gemm_few). It reads only what the kernel before
  // the first one wrote (X, the tile lists), complete once that launch's blocks were past their wait — and this
  // launch starts only after every block of the launch before it has let it (pdl_entry's order: wait, then let the
  // next start) — and it writes rows that the other sizes' launches do not. So it does not wait at the start: its
  // blocks run beside the launches before it, whose tiles are few where they are slow (a fraction of a wave, NOTES
  // 79). Block (0, 0, 0) waits for them at its end, so that this launch completes after them and what waits for
  // it (the next kernel) waits for them too.
  const bool first_block = blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0;
  if (gr.late) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  else pdl_entry();
  // a launch per tile size (gemm_few, gr.cls_tiles): tile blockIdx.y of this launch's list (tiles of 8·NT rows or
  // fewer, more than the next smaller size); else the row tile blockIdx.y
  int g = 0, r0 = 0, r1 = 0;
  bool mine = true;
  if (gr.cls_tiles) {
    constexpr int c = NT == 1 ? 0 : NT == 2 ? 1 : 2;
    if (static_cast<int>(blockIdx.y) >= gr.cls_count[c]) {
      mine = false;
    } else {
      const int2 t = gr.cls_tiles[c * gr.cls_cap + blockIdx.y];
      g = t.x;
      r0 = t.y;
      r1 = min(r0 + kBM, gr.row_off[g + 1]);
    }
  } else {
    mine = row_tile(gr, M, blockIdx.y, g, r0, r1);
  }
  if (mine) few_tile<FMT, NT, SB, SPLIT, L2B, WB>(X, M, Y, W, ksplit, part, cnt, g, r0, min(r1 - r0, 8 * NT), ct, ks);
  if (gr.late && first_block) asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// ---- many-row matmul ("tile"): the streamed kernel's chain of mma operations per output element, on block tiles
// of 64·FW output features × 16·WN rows that a cp.async ring stages in shared memory, so that a weight byte is read
// once per tile of rows (the streamed kernel reads it once per 32) and each lane's fragments serve WN n-tiles
// (weights) and 4 m-tiles (rows). Every mma gets the operands k_gemm_few gives it, in the same places: a lane's 16
// bytes of a weight row per chunk, dequantized by the same functions, and the X elements of the same k; an output
// element's mmas run in the same k order from zero, K is split where the streamed kernel splits it (dense narrow
// matrices), and the splits' sums are added in split order from zero, as the streamed kernel's last block adds them, here in
// registers. So a row's bits are those of
// the streamed kernel at any row count, and the two kernels can be chosen by batch size alone.
// Warps: FW along the features (64 each) × 2 along the rows (8·WN each). Shared memory per stage: the weight tile
// [64·FW][64 bytes] (one chunk: 32 bf16 / 64 fp8 / 128 int4 k), then the X tile [R][chunk] with each lane's 16-byte
// pieces side by side for the four lanes of a quad, rows of 128 bytes and more XOR-swizzled by row parity
// (conflict-free 16-byte reads for every quarter-warp). Dense launches are one-dimensional and walk the tiles in
// groups of 16 row tiles per column tile, so that the blocks resident at once share their X and weight tiles in L2.
constexpr int kTileThreadsPerFW = 64, kTileRaster = 16;
template <int FMT>
__host__ __device__ constexpr int tile_cw() { return 4 * few_per16<FMT>(); }  // k per chunk
template <int FMT>
__host__ __device__ constexpr int tile_stages() { return FMT == kBf16 ? 5 : FMT == kFp8 ? 3 : 2; }
template <int FMT, int FW, int WN>
__host__ __device__ constexpr int tile_stage_bytes() { return 64 * FW * 64 + 16 * WN * tile_cw<FMT>() * 2; }
template <int FMT, int FW, int WN>
__host__ __device__ constexpr size_t tile_smem() {
  // bf16: two more buffers of the weight tile rearranged into mma fragment order (k_gemm_tile's quads)
  return size_t(tile_stages<FMT>()) * tile_stage_bytes<FMT, FW, WN>() + (FMT == kBf16 ? size_t(2) * 64 * FW * 64 : 0);
}

__device__ __forceinline__ void mma16816_nv(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A many-row block's tile: grouped launches (row_off) take the R / kBM row tiles of row_tile() starting at a
// multiple of R / kBM inside their group (the other blocks return false); dense ones are rasterized, kTileRaster
// row tiles per column tile, then the next column tile. Rows [r0, r1) of group g, column tile ct (of BF features).
__device__ __forceinline__ bool block_tile(const Groups& gr, int M, int N, int R, int BF, int& g, int& r0, int& r1, int& ct) {
  g = 0;
  if (gr.row_off) {
    ct = blockIdx.x;
    if (!row_tile(gr, M, blockIdx.y, g, r0, r1)) return false;
    if ((blockIdx.y - gr.tile_off[g]) % (R / kBM)) return false;  // another block's
    r1 = min(r0 + R, gr.row_off[g + 1]);
    return true;
  }
  const int rts = (M + R - 1) / R, cts = (N + BF - 1) / BF, b = blockIdx.x, per = kTileRaster * cts;
  const int first = b / per * kTileRaster, gs = min(rts - first, kTileRaster), in = b - first * cts;
  const int rt = first + in % gs;
  ct = in / gs;
  r0 = rt * R;
  r1 = min(r0 + R, M);
  return r0 < r1;
}

// cps: chunks per K split (SPLIT); grouped row tiles come in kBM units (row_tile's) and a block takes R / kBM of them
template <int FMT, int FW, int WN, bool SPLIT, bool SB>
__global__ void __launch_bounds__(kTileThreadsPerFW * FW, FW == 2 ? 2 : 1)
    k_gemm_tile(const bf16* __restrict__ X, int M, float* __restrict__ Y, DLin W, float* __restrict__ Y2, DLin W2,
                Groups gr, int cps) {
  pdl_entry();
  constexpr int NT = kTileThreadsPerFW * FW, BF = 64 * FW;
  constexpr int CW = tile_cw<FMT>(), XP = CW / 8, PL = XP / 4, NS = tile_stages<FMT>(), R = 16 * WN;
  constexpr int SW = XP >= 8 ? 4 : 0, STAGE = tile_stage_bytes<FMT, FW, WN>(), E16 = few_per16<FMT>();
  if (blockIdx.z == 1) {
    W = W2;
    Y = Y2;
  }
  int g, r0, r1, ct;
  if (!block_tile(gr, M, W.N, R, BF, g, r0, r1, ct)) return;
  const int rows = r1 - r0, n0 = ct * BF;
  const uint8_t* wb = W.w + g * W.w_stride;
  const SPtr sb = scales_of(W, g);
  extern __shared__ __align__(128) uint8_t tile_sm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int wf = (warp % FW) * 64, wr = (warp / FW) * WN * 8;  // the warp's first feature and row in the tile
  const int nch = W.K / CW;
  const bool full = wr + WN * 8 <= rows;  // every n-tile of the warp has rows
  // Staging, with every address but the chunk's offset fixed per thread: its weight pieces are rows (tid >> 2) +
  // i·NT/4, piece tid & 3; its X pieces rows tid / XP + i·NT/XP (same parity: NT/XP is even), piece tid % XP.
  // Pieces past the matrix or the tile are zero-filled from a valid address.
  constexpr int WPT = BF * 4 / NT, XPT = R * XP / NT, XRS = NT / XP;
  const int tid = threadIdx.x, xr = tid / XP, xq = tid % XP;
  const int xpos = ((xq % PL) * 4 + xq / PL) ^ ((xr & 1) * SW);
  const uint8_t* wsrc = wb + static_cast<int64_t>(min(n0 + (tid >> 2), W.N - 1)) * W.w_ld + (tid & 3) * 16;
  const int64_t wstep = static_cast<int64_t>(NT / 4) * W.w_ld, xstep = static_cast<int64_t>(XRS) * W.K;
  const bf16* xsrc = X + static_cast<int64_t>(r0 + min(xr, rows - 1)) * W.K + xq * 8;
  const int wvalid = W.N - n0 - (tid >> 2), xvalid = rows - xr;  // piece i is in when i·NT/4 < wvalid (i·XRS < xvalid)
  const uint32_t sm0 = static_cast<uint32_t>(__cvta_generic_to_shared(tile_sm));
  const uint32_t wdst = sm0 + tid * 16, xdst = sm0 + BF * 64 + (xr * CW + xpos * 8) * 2;
  auto stage = [&](int c, int buf) {
    const uint8_t* w = wsrc + static_cast<int64_t>(c) * 64;
    const bf16* x = xsrc + static_cast<int64_t>(c) * CW;
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
      const bool ok = i * (NT / 4) < wvalid;
      cp_async16_s(wdst + buf * STAGE + i * NT * 16, ok ? w + i * wstep : w, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < XPT; ++i) {
      const bool ok = i * XRS < xvalid;
      cp_async16_s(xdst + buf * STAGE + i * XRS * CW * 2, ok ? x + i * xstep : x, ok ? 16 : 0);
    }
  };
  float acc[4][WN][4];
  float tot[SPLIT ? 4 : 1][SPLIT ? WN : 1][4];
  auto each_acc = [&](auto f) {  // f(m-tile, n-tile, element) over every accumulator
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int j = 0; j < WN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(mt, j, e);
  };
  each_acc([&](int mt, int j, int e) {
    acc[mt][j][e] = 0.0f;
    if constexpr (SPLIT) tot[mt][j][e] = 0.0f;
  });
#pragma unroll
  for (int s = 0; s < NS - 1; ++s) {
    if (s < nch) stage(s, s);
    cp_async_commit();
  }
  // one chunk's mmas; FULL: every n-tile has rows (no per-tile test, so the fragment loads can run ahead)
  auto chunk = [&](auto full_tag, const uint8_t* ws, const bf16* xs, const float (&sc)[4][2]) {
    constexpr bool FULL = decltype(full_tag)::value;
    if constexpr (FMT == kBf16) {
      // every n-tile's X piece first (each serves both mmas of the chunk)
      uint4 bx[WN];
#pragma unroll
      for (int j = 0; j < WN; ++j) {
        const int r = wr + j * 8 + gq;
        bx[j] = FULL || wr + j * 8 < rows ? *reinterpret_cast<const uint4*>(xs + r * CW + tq * 8) : make_uint4(0, 0, 0, 0);
      }
      // ws is the quad buffer here: each m-tile's fragments in mma order, one 16-byte load each. The chunk's first
      // mma of every accumulator, then its second (32 mmas apart); the second half's fragments load meanwhile.
      uint4 qf[2][4];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
          qf[hh][mt] = *reinterpret_cast<const uint4*>(ws + ((wf / 16 + mt) * 8 + gq) * 128 + tq * 32 + ((gq & 1) ^ hh) * 16);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int j = 0; j < WN; ++j)
          if (FULL || wr + j * 8 < rows)
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
              const uint32_t a[4] = {qf[hh][mt].x, qf[hh][mt].y, qf[hh][mt].z, qf[hh][mt].w};
              mma16816_nv(acc[mt][j], a, hh ? bx[j].z : bx[j].x, hh ? bx[j].w : bx[j].y);
            }
    } else {
      uint4 wa[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          wa[mt][hf] = *reinterpret_cast<const uint4*>(ws + (wf + mt * 16 + gq + 8 * hf) * 64 + tq * 16);
#pragma unroll
      for (int u = 0; u < PL; ++u) {
        uint32_t a[4][2][4];  // [m-tile][mma of the piece]
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            if constexpr (FMT == kFp8) {
              const uint32_t pa = word_of(wa[mt][0], 2 * u + hh), pb = word_of(wa[mt][1], 2 * u + hh);
              a[mt][hh][0] = fp8x2_deq(pa, sc[mt][0]);
              a[mt][hh][1] = fp8x2_deq(pb, sc[mt][1]);
              a[mt][hh][2] = fp8x2_deq(pa >> 16, sc[mt][0]);
              a[mt][hh][3] = fp8x2_deq(pb >> 16, sc[mt][1]);
            } else {
              const uint32_t pa = word_of(wa[mt][0], u), pb = word_of(wa[mt][1], u);
              const __nv_bfloat162 s2a = __floats2bfloat162_rn(sc[mt][0], sc[mt][0]), s2b = __floats2bfloat162_rn(sc[mt][1], sc[mt][1]);
              a[mt][hh][0] = int4x2_deq<SB>(pa >> (8 * hh), sc[mt][0], s2a);
              a[mt][hh][1] = int4x2_deq<SB>(pb >> (8 * hh), sc[mt][1], s2b);
              a[mt][hh][2] = int4x2_deq<SB>(pa >> (8 * hh + 4), sc[mt][0], s2a);
              a[mt][hh][3] = int4x2_deq<SB>(pb >> (8 * hh + 4), sc[mt][1], s2b);
            }
          }
#pragma unroll
        for (int j = 0; j < WN; ++j)
          if (FULL || wr + j * 8 < rows) {
            const int r = wr + j * 8 + gq;
            const uint4 b = *reinterpret_cast<const uint4*>(xs + r * CW + ((u * 4 + tq) ^ ((r & 1) * SW)) * 8);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              uint32_t b0, b1;
              if constexpr (FMT == kInt4) {
                const uint32_t lo = hh == 0 ? b.x : b.y, hi = hh == 0 ? b.z : b.w;
                b0 = __byte_perm(lo, hi, 0x5410);
                b1 = __byte_perm(lo, hi, 0x7632);
              } else {
                b0 = hh == 0 ? b.x : b.z;
                b1 = hh == 0 ? b.y : b.w;
              }
#pragma unroll
              for (int mt = 0; mt < 4; ++mt) mma16816_nv(acc[mt][j], a[mt][hh], b0, b1);
            }
          }
      }
    }
  };
  // scales: FP8 one per lane and chunk (the tile kernel takes FP8 only with bo % 64 == 0, so a warp's 64 features
  // lie in one block of rows); INT4 one per row and chunk, rows nA + 8·i (i = 2·mt + hf)
  const int nA = n0 + wf + gq;
  SPtr srow;
  int64_t sstep = 0;
  if constexpr (FMT == kFp8) srow = sb + static_cast<int64_t>(min(nA, W.N - 1) / W.bo) * W.s_cols;
  if constexpr (FMT == kInt4) {
    srow = sb + static_cast<int64_t>(nA) * W.s_cols;
    sstep = static_cast<int64_t>(8) * W.s_cols;
  }
  const int sdiv = FMT == kFp8 ? W.bi : W.g;
  // The k loop, instantiated per kind of warp (2: every n-tile has rows, 1: some do, 0: none; it only stages and
  // waits), so that no path joins inside it (a join of the paths costs register moves of every accumulator), and
  // split by split (the end of one adds its sum to the total).
  // bf16: each chunk's weight tile is rearranged once per block into the A fragments' order ("quads": rows g and
  // g + 8 of an m-tile interleaved by 4-byte words, the two 16-byte halves swapped on odd g so that a quarter-warp's
  // loads miss no bank), so a warp loads each fragment with one 16-byte read instead of assembling it from two rows
  // with register moves. Chunk c + 1 is rearranged while chunk c is multiplied (from the other quad buffer).
  uint8_t* quads = tile_sm + NS * STAGE;
  auto rearrange = [&](int raw_buf, int qbuf) {
    const uint8_t* raw = tile_sm + raw_buf * STAGE;
    uint8_t* q = quads + qbuf * BF * 64;
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 2·BF (unit, piece) items: unit = m-tile · 8 + g
      const int it = tid + i * NT, u = it >> 2, pc = it & 3, g = u & 7, ra = (u >> 3) * 16 + g;
      const uint4 a = *reinterpret_cast<const uint4*>(raw + ra * 64 + pc * 16);
      const uint4 b = *reinterpret_cast<const uint4*>(raw + (ra + 8) * 64 + pc * 16);
      uint8_t* dst = q + u * 128 + pc * 32;
      *reinterpret_cast<uint4*>(dst + (g & 1) * 16) = make_uint4(a.x, b.x, a.y, b.y);
      *reinterpret_cast<uint4*>(dst + ((g & 1) ^ 1) * 16) = make_uint4(a.z, b.z, a.w, b.w);
    }
  };
  auto k_loop = [&](auto mode) {
    constexpr int MODE = decltype(mode)::value;
    constexpr bool XF = FMT == kBf16;
    int buf = 0, sbuf = (NS - 1) % NS;
    const int per = SPLIT ? cps : nch;
    if constexpr (XF) {  // chunk 0's quads
      cp_async_wait<NS - 2>();
      __syncthreads();
      rearrange(0, 0);
    }
    for (int c0 = 0; c0 < nch; c0 += per) {
      const int c1 = min(nch, c0 + per);
      for (int c = c0; c < c1; ++c) {
        float sc[4][2];  // the lane's scales of this chunk, rows gq and gq + 8 of each m-tile
        if constexpr (FMT != kBf16 && MODE != 0) {
          const int kc = (c * CW + tq * E16) / sdiv;
#pragma unroll
          for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              if constexpr (FMT == kFp8) {
                sc[mt][hf] = nA + mt * 16 + 8 * hf < W.N ? srow.ld<false>(kc) : 0.0f;
              } else {
                sc[mt][hf] = nA + mt * 16 + 8 * hf < W.N ? srow.ld<SB>((2 * mt + hf) * sstep + kc) : 0.0f;
              }
            }
        }
        if constexpr (XF) cp_async_wait<NS - 3>();  // chunk c + 1 is in (to be rearranged)
        else cp_async_wait<NS - 2>();                 // chunk c is in
        __syncthreads();  // ... and every warp is done with the buffers written next
        if (c + NS - 1 < nch) stage(c + NS - 1, sbuf);
        cp_async_commit();
        sbuf = sbuf + 1 == NS ? 0 : sbuf + 1;
        const uint8_t* ws = tile_sm + buf * STAGE;
        const bf16* xs = reinterpret_cast<const bf16*>(ws + BF * 64);
        buf = buf + 1 == NS ? 0 : buf + 1;
        if constexpr (XF) {
          if (c + 1 < nch) rearrange(buf, (c + 1) & 1);
          ws = quads + (c & 1) * BF * 64;
        }
        if constexpr (MODE == 2) chunk(std::true_type{}, ws, xs, sc);
        if constexpr (MODE == 1) chunk(std::false_type{}, ws, xs, sc);
      }
      if constexpr (SPLIT) {  // the end of a split: its sum joins the total, in split order
        each_acc([&](int mt, int j, int e) {
          tot[mt][j][e] += acc[mt][j][e];
          acc[mt][j][e] = 0.0f;
        });
      }
    }
  };
  if constexpr (FMT == kBf16) {  // (FP8/INT4: no separate full path; their registers go to dequantizing)
    if (full) k_loop(std::integral_constant<int, 2>{});
    else if (wr < rows) k_loop(std::integral_constant<int, 1>{});
    else k_loop(std::integral_constant<int, 0>{});
  } else {
    if (wr < rows) k_loop(std::integral_constant<int, 1>{});
    else k_loop(std::integral_constant<int, 0>{});
  }
  cp_async_wait<0>();
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    const int n = n0 + wf + mt * 16 + gq;
#pragma unroll
    for (int j = 0; j < WN; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tok = wr + j * 8 + 2 * tq + e;
        if (tok < rows) {
          float* y = Y + static_cast<int64_t>(r0 + tok) * W.N;
          if constexpr (SPLIT) {
            if (n < W.N) y[n] = tot[mt][j][e];
            if (n + 8 < W.N) y[n + 8] = tot[mt][j][2 + e];
          } else {
            if (n < W.N) y[n] = acc[mt][j][e];
            if (n + 8 < W.N) y[n + 8] = acc[mt][j][2 + e];
          }
        }
      }
  }
}

// ---- many-row matmul on warpgroup MMA ("wg"): the tile kernel's contract (the streamed kernel's bits at any row
// count) on Hopper's wgmma. A wgmma m64nNk16 chain gives the bits of the same chain of mma.sync m16n8k16 over the
// same k-slots (bench/NOTES.md 30), so each output element runs the streamed kernel's chain if every k-step holds
// the elements that k_gemm_few puts in its mma's 16 k-slots. Weights are the A operand (64 features per warpgroup,
// 16 per warp), read from a shared-memory tile into registers exactly as k_gemm_tile reads them (a lane's 16 bytes
// of rows g and g + 8 per chunk, dequantized by the same functions), so their k order is the streamed kernel's by
// construction. X is the B operand (N = R rows of the block), read by the tensor cores from shared memory in
// natural k order; so X is first rewritten (k_permute_x, into a workspace) with every chunk of CW elements in the
// streamed kernel's k-slot order: with P = CW / 8 words per lane's 16 bytes, output word 8h + s of a chunk (k-step
// h, slot word s) is source word P·(s % 4) + 2h + s / 4 (bf16: a 4 x 4 word transpose of every 64 bytes). Then X
// tiles come by tensor copies (TMA) as [R rows][64 k] with 128-byte swizzle, 32 bytes per k-step.
// Block: 2 warpgroups x 64 features (128) x R rows; stages of 64 k (bf16: 2 chunks; FP8: 1), weights by cp.async
// and X by TMA into a ring of NS stages, two behind the multiplies (a stage's buffer is rewritten only after every
// warpgroup has waited for the wgmma group that read it). The tensor cores read A registers until the group is
// waited for, so a warpgroup waits for its previous group before loading the next fragments (the other
// warpgroup's multiplies fill that gap). K splits (narrow dense matrices) end with their sum added to the total in
// registers, in split order as the streamed kernel adds them. INT4 (chunks of 128 k, stages of one chunk) takes X permuted element by
// element (k_permute_x4: its fragments pair elements 4 apart).
constexpr int kWgFeat = 128, kWgThreads = 256;
template <int FMT>
__host__ __device__ constexpr int wg_xb() { return FMT == kInt4 ? 2 : 1; }  // X boxes of 64 k per stage
template <int FMT>
__host__ __device__ constexpr int wg_kc() { return 64 * wg_xb<FMT>() / tile_cw<FMT>(); }  // chunks per stage
template <int FMT, int R>
__host__ __device__ constexpr int wg_stage_bytes() { return wg_xb<FMT>() * R * 128 + kWgFeat * 64 * wg_kc<FMT>(); }  // X, W
// Stages: as many as fit 221 KB (of 227), at most 6; BPS = 2 (blocks per multiprocessor): as many as fit 110 KB, so
// that two blocks share a multiprocessor. The grouped (expert) launches at 64 rows per block take BPS = 2: one block
// of 8 warps per multiprocessor left most of its issue slots idle waiting on its pipeline (MoE block 512-2048 tokens
// 12-14% faster in INT4, NOTES 58); dense launches at 64 rows (a grid of about two waves) were 5-10% slower with it.
template <int FMT, int R, int BPS = 1>
__host__ __device__ constexpr int wg_stages() {
  return (BPS == 2 ? 110 : 221) * 1024 / wg_stage_bytes<FMT, R>() > 6 ? 6 : (BPS == 2 ? 110 : 221) * 1024 / wg_stage_bytes<FMT, R>();
}
template <int FMT, int R, int BPS = 1>
__host__ __device__ constexpr size_t wg_smem() { return size_t(wg_stages<FMT, R, BPS>()) * wg_stage_bytes<FMT, R>() + 1024 + 64; }

// Xp = X with each chunk of 4P words in k-slot order (see above); one thread per output 16-byte piece
__global__ void k_permute_x(const uint32_t* __restrict__ X, int64_t pieces, int P, uint4* __restrict__ Xp) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pieces; i += int64_t(gridDim.x) * blockDim.x) {
    const int pc = static_cast<int>(i % P), h = pc >> 1, cm = pc & 1;
    const uint32_t* src = X + (i / P) * 4 * P + 2 * h + cm;
    Xp[i] = make_uint4(__ldg(src), __ldg(src + P), __ldg(src + 2 * P), __ldg(src + 3 * P));
  }
}

// INT4: Xp word 8t + s of a 128-element chunk (k-step t = 2·wi + h, slot word s = q + 4·cm) holds source elements
// 32q + 8wi + 2h + cm and that + 4 (k_gemm_few's B fragments of word wi, half h); one thread per output word
__global__ void k_permute_x4(const bf16* __restrict__ X, int64_t words, uint32_t* __restrict__ Xp) {
  pdl_entry();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words; i += int64_t(gridDim.x) * blockDim.x) {
    const int w = static_cast<int>(i & 63), t = w >> 3, sw = w & 7, q = sw & 3, cm = sw >> 2;
    const bf16* src = X + (i >> 6) * 128 + 32 * q + 8 * (t >> 1) + 2 * (t & 1) + cm;
    const uint16_t lo = __bfloat16_as_ushort(src[0]), hi = __bfloat16_as_ushort(src[4]);
    Xp[i] = lo | (static_cast<uint32_t>(hi) << 16);
  }
}

// xmap: Xp as [M][K] bf16, boxes of 64 k x R rows, 128-byte swizzle; wmap/wmap2: the pair's weights as bytes.
// cps: chunks per K split (SPLIT); grouped row tiles come in kBM units (row_tile's) and a block takes R / kBM.
template <int FMT, int R, bool SPLIT, bool SB, int BPS = 1>
__global__ void __launch_bounds__(kWgThreads, BPS)
    k_gemm_wg(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap,
              const __grid_constant__ CUtensorMap wmap2, int M, float* __restrict__ Y, DLin W, float* __restrict__ Y2,
              DLin W2, Groups gr, int cps) {
  pdl_entry();
  constexpr int CW = tile_cw<FMT>(), KC = wg_kc<FMT>(), NS = wg_stages<FMT, R, BPS>(), XB = wg_xb<FMT>(), KST = 64 * XB;
  constexpr int STAGE = wg_stage_bytes<FMT, R>(), XBYTES = XB * R * 128, E16 = few_per16<FMT>();
  static_assert(NS >= 3, "the ring needs two stages ahead of the multiplies");
  const CUtensorMap* wm = &wmap;
  if (blockIdx.z == 1) {
    W = W2;
    Y = Y2;
    wm = &wmap2;
  }
  int g, r0, r1, ct;
  if (!block_tile(gr, M, W.N, R, kWgFeat, g, r0, r1, ct)) return;
  const int rows = r1 - r0, n0 = ct * kWgFeat;
  const SPtr sb = scales_of(W, g);
  extern __shared__ __align__(1024) uint8_t wg_sm_raw[];
  // (swizzled tiles need 1024-byte alignment)
  uint8_t* wg_sm = tma::align1024(wg_sm_raw);
  uint64_t* bars = reinterpret_cast<uint64_t*>(wg_sm + NS * STAGE);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int f0 = (warp >> 2) * 64 + (warp & 3) * 16;  // the warp's first feature in the tile
  const int nst = W.K / KST;
  if (tid == 0) {
    for (int i = 0; i < NS; ++i) tma::bar_init(&bars[i]);
    tma::bar_init_fence();
  }
  __syncthreads();
  // One thread loads a stage: the X tile and the weight tile's KC chunks ([128 rows][64 bytes] each, rows of the
  // stacked matrices g·N + n0 + i: rows past this matrix's N are another expert's or zeros, never stored).
  const int wrow = g * W.N + n0;
  auto stage = [&](int st, int buf) {
    if (tid == 0) {
      uint8_t* dst = wg_sm + buf * STAGE;
      tma::expect(&bars[buf], STAGE);
#pragma unroll
      for (int b = 0; b < XB; ++b) tma::load_2d(dst + b * R * 128, &xmap, st * KST + b * 64, r0, &bars[buf]);
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) tma::load_2d(dst + XBYTES + kc * kWgFeat * 64, wm, (st * KC + kc) * 64, wrow, &bars[buf]);
    }
  };
  float acc[R / 2];
#pragma unroll
  for (int e = 0; e < R / 2; ++e) acc[e] = 0.0f;
  float tot[SPLIT ? R / 2 : 1];  // K split: the splits' sums added in split order
#pragma unroll
  for (int e = 0; e < (SPLIT ? R / 2 : 1); ++e) tot[e] = 0.0f;
  // scales (FP8: one per lane and chunk; the launch takes FP8 only with bo % 64 == 0, so a warpgroup's 64
  // features lie in one block of rows)
  SPtr srow;
  if constexpr (FMT == kFp8) srow = sb + static_cast<int64_t>(min(n0 + f0 + gq, W.N - 1) / W.bo) * W.s_cols;
  if constexpr (FMT == kInt4) srow = sb + static_cast<int64_t>(n0 + f0 + gq) * W.s_cols;  // INT4: rows' own scales
  const bool sa_ok = n0 + f0 + gq < W.N, sv_ok = n0 + f0 + gq + 8 < W.N;
#pragma unroll
  for (int s = 0; s < NS - 2; ++s)
    if (s < nst) stage(s, s);
  const int per = SPLIT ? cps / KC : nst;  // stages per split
  int buf = 0, sbuf = NS - 2, st = 0;
  // (a do loop: with a path that skips it, the accumulators' zeros would reach the final wait and ptxas would
  // serialize every wgmma; K >= 256 here)
  do {
    tma::wait(&bars[buf], (st / NS) & 1);  // stage st has landed
    __syncthreads();  // every warpgroup has waited for the wgmma group that read buffer sbuf (and is past its loads)
    if (st + NS - 2 < nst) stage(st + NS - 2, sbuf);
    sbuf = sbuf + 1 == NS ? 0 : sbuf + 1;
    const uint8_t* ws = wg_sm + buf * STAGE + XBYTES;
    wg::wait<0>();  // the previous group is done with its A registers
    uint32_t a[KC][CW / 16][4];
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const uint4 wa = *reinterpret_cast<const uint4*>(ws + kc * kWgFeat * 64 + (f0 + gq) * 64 + tq * 16);
      const uint4 wv = *reinterpret_cast<const uint4*>(ws + kc * kWgFeat * 64 + (f0 + gq + 8) * 64 + tq * 16);
      if constexpr (FMT == kBf16) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[kc][h][0] = word_of(wa, 2 * h);
          a[kc][h][1] = word_of(wv, 2 * h);
          a[kc][h][2] = word_of(wa, 2 * h + 1);
          a[kc][h][3] = word_of(wv, 2 * h + 1);
        }
      } else if constexpr (FMT == kFp8) {
        const int kk = ((st * KC + kc) * CW + tq * E16) / W.bi;
        const float sa = sa_ok ? srow.ld<false>(kk) : 0.0f, sv = sv_ok ? srow.ld<false>(kk) : 0.0f;
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const uint32_t pa = word_of(wa, h), pb = word_of(wv, h);
          a[kc][h][0] = fp8x2_deq(pa, sa);
          a[kc][h][1] = fp8x2_deq(pb, sv);
          a[kc][h][2] = fp8x2_deq(pa >> 16, sa);
          a[kc][h][3] = fp8x2_deq(pb >> 16, sv);
        }
      } else {  // INT4: k-step 2·wi + h holds elements (2h, 2h + 4) and (2h + 1, 2h + 5) of word wi's eight
        const int kk = ((st * KC + kc) * CW + tq * E16) / W.g;
        const float sa = sa_ok ? srow.ld<SB>(kk) : 0.0f, sv = sv_ok ? srow.ld<SB>(8 * W.s_cols + kk) : 0.0f;
        const __nv_bfloat162 s2a = __floats2bfloat162_rn(sa, sa), s2b = __floats2bfloat162_rn(sv, sv);
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          const uint32_t pa = word_of(wa, wi), pb = word_of(wv, wi);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            a[kc][2 * wi + h][0] = int4x2_deq<SB>(pa >> (8 * h), sa, s2a);
            a[kc][2 * wi + h][1] = int4x2_deq<SB>(pb >> (8 * h), sv, s2b);
            a[kc][2 * wi + h][2] = int4x2_deq<SB>(pa >> (8 * h + 4), sa, s2a);
            a[kc][2 * wi + h][3] = int4x2_deq<SB>(pb >> (8 * h + 4), sv, s2b);
          }
        }
      }
    }
    wg::fence();
    const uint8_t* xs = wg_sm + buf * STAGE;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
#pragma unroll
      for (int h = 0; h < CW / 16; ++h)
        wg::mma_rs<R, 0>(acc, a[kc][h], tma::sw128_desc(xs + ((kc * (CW / 16) + h) >> 2) * R * 128 + ((kc * (CW / 16) + h) & 3) * 32, 16, 1024), 1);
    wg::commit();
    buf = buf + 1 == NS ? 0 : buf + 1;
    if constexpr (SPLIT) {
      if ((st + 1) % per == 0 || st + 1 == nst) {  // the end of a split: its sum joins the total
        wg::wait<0>();
#pragma unroll
        for (int e = 0; e < R / 2; ++e) {
          tot[e] += acc[e];
          acc[e] = 0.0f;
        }
      }
    }
  } while (++st < nst);
  wg::wait<0>();
  const float* res = SPLIT ? tot : acc;
  const int na = n0 + f0 + gq;
#pragma unroll
  for (int j = 0; j < R / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = j * 8 + 2 * tq + e;
      if (tok < rows) {
        float* y = Y + static_cast<int64_t>(r0 + tok) * W.N;
        if (na < W.N) y[na] = res[4 * j + e];
        if (na + 8 < W.N) y[na + 8] = res[4 * j + 2 + e];
      }
    }
}

// RMSNorm, one block per row: the row read once (16-byte loads where aligned) into shared memory when it fits there
// (row_in_smem; out may alias x, so a row that does not fit is read again from x), squares summed by warps.
// ADD: the residual add before the norm, x[t] += y[t] written back through sum (x itself; rows d apart), the same
// fp32 adds as k_add, so the same bits as k_add then the norm, in one launch. The weights, which no kernel writes,
// are read into registers (kNormW per thread) before the wait on the kernel before, so that their latency overlaps
// its end.
constexpr int kNormW = 8;
template <bool ADD>
__global__ void __launch_bounds__(1024) k_rmsnorm_row(const float* x, int64_t ld, const float* __restrict__ y, float* sum,
                                                      const float* __restrict__ w, int64_t d, float eps, float* out,
                                                      bf16* out16, bool row_in_smem) {
  float wr[kNormW];
#pragma unroll
  for (int j = 0; j < kNormW; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    wr[j] = i < d ? w[i] : 0.0f;
  }
  pdl_entry();
  extern __shared__ float row[];  // [d] when row_in_smem
  __shared__ float part[32];
  const int64_t t = blockIdx.x;
  const float* xr = x + t * ld;
  float ss = 0;
  if ((d & 3) == 0 && (ld & 3) == 0) {
    for (int64_t i = threadIdx.x; i < d / 4; i += blockDim.x) {
      float4 v = reinterpret_cast<const float4*>(xr)[i];
      if constexpr (ADD) {
        const float4 a = reinterpret_cast<const float4*>(y + t * d)[i];
        v = make_float4(v.x + a.x, v.y + a.y, v.z + a.z, v.w + a.w);
        reinterpret_cast<float4*>(sum + t * d)[i] = v;
      }
      if (row_in_smem) reinterpret_cast<float4*>(row)[i] = v;
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      float v = xr[i];
      if constexpr (ADD) {
        v += y[t * d + i];
        sum[t * d + i] = v;
      }
      if (row_in_smem) row[i] = v;
      ss += v * v;
    }
  }
  // block_sum's barriers also make this block's writes of the summed row visible to the reads below
  const float r = 1.0f / sqrtf(block_sum(ss, part) / static_cast<float>(d) + eps);
  const float* src = row_in_smem ? row : ADD ? sum + t * d : xr;
  auto put = [&](int64_t i, float wi) {
    const float v = wi * (src[i] * r);
    out[t * d + i] = v;
    if (out16) out16[t * d + i] = __float2bfloat16(v);  // what k_f32_to_bf16 makes of out
  };
#pragma unroll
  for (int j = 0; j < kNormW; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (i < d) put(i, wr[j]);
  }
  for (int64_t i = threadIdx.x + static_cast<int64_t>(kNormW) * blockDim.x; i < d; i += blockDim.x) put(i, w[i]);
}

// fp32-input matmul (routers) for bf16 weights with K % 64 == 0: a block of 8 warps per output feature and up to 4
// rows, each warp a slice of K read 16 bytes per lane, the slices added in warp order.
// The lane's first kF32Pre weight pieces (K up to 8192: all of them) are loaded before the wait for X — weights,
// which no kernel writes — so their latency overlaps the kernel before (the router follows a norm).
constexpr int kF32Pre = 4;
__global__ void __launch_bounds__(256) k_gemm_f32_split(const float* __restrict__ X, int M, float* __restrict__ Y, DLin W) {
  __shared__ float red[8][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x, m0 = blockIdx.y * 4, mr = min(4, M - m0);
  const int slice = W.K / 8;  // a multiple of 8
  const bf16* wr = reinterpret_cast<const bf16*>(W.w + static_cast<int64_t>(n) * W.w_ld) + warp * slice;
  uint4 pre[kF32Pre];
#pragma unroll
  for (int j = 0; j < kF32Pre; ++j)
    if (lane * 8 + 256 * j < slice) pre[j] = __ldg(reinterpret_cast<const uint4*>(wr + lane * 8 + 256 * j));
  pdl_entry();
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const float* xw = X + static_cast<int64_t>(m0) * W.K + warp * slice;
#pragma unroll
  for (int j = 0; j < kF32Pre; ++j) {
    const int k = lane * 8 + 256 * j;
    if (k < slice) {  // the held piece
      float wf[8];
      unpack_w8(pre[j], wf);
      dot8_rows(wf, xw + k, W.K, mr, acc);
    }
  }
  for (int k = lane * 8 + 256 * kF32Pre; k < slice; k += 256) dot8_rows(wr + k, xw + k, W.K, mr, acc);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) red[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < mr) {
    float v = 0;
    for (int w = 0; w < 8; ++w) v += red[w][threadIdx.x];
    Y[static_cast<int64_t>(m0 + threadIdx.x) * W.N + n] = v;
  }
}

// The same per-element chain as k_gemm_f32_split (warp w sums K slice w, lane l the 8-element pieces l·8 + 256·i of
// it in that order, each piece as dot8_rows adds it; then the butterfly and the warps in order), for NE output
// features × RM rows per block: each X piece is loaded once for NE features and each weight piece once for RM rows
// (the split kernel reads every X row once per feature: 45 GB of L2 reads for a 384-expert router at 4096 tokens).
// The same bits as the split kernel at any row count (the op test compares them).
template <int NE, int RM>
__global__ void __launch_bounds__(256) k_gemm_f32_tile(const float* __restrict__ X, int M, float* __restrict__ Y, DLin W) {
  pdl_entry();
  __shared__ float red[8][NE * RM];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * NE, m0 = blockIdx.y * RM, mr = min(RM, M - m0);
  const int slice = W.K / 8;
  float acc[NE][RM];
#pragma unroll
  for (int e = 0; e < NE; ++e)
#pragma unroll
    for (int r = 0; r < RM; ++r) acc[e][r] = 0.0f;
  const float* xb = X + static_cast<int64_t>(m0) * W.K + warp * slice;
  for (int k = lane * 8; k < slice; k += 256) {
    float4 xa[RM], xc[RM];
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const float4* xp = reinterpret_cast<const float4*>(xb + static_cast<int64_t>(r < mr ? r : 0) * W.K + k);
      xa[r] = xp[0];
      xc[r] = xp[1];
    }
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int n = min(n0 + e, W.N - 1);
      float wf[8];
      load_w8(reinterpret_cast<const bf16*>(W.w + static_cast<int64_t>(n) * W.w_ld) + warp * slice + k, wf);
#pragma unroll
      for (int r = 0; r < RM; ++r) acc[e][r] += dot8(xa[r], xc[r], wf);
    }
  }
#pragma unroll
  for (int e = 0; e < NE; ++e)
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const float v = warp_sum(acc[e][r]);
      if (lane == 0) red[warp][e * RM + r] = v;
    }
  __syncthreads();
  if (threadIdx.x < NE * RM) {
    const int e = threadIdx.x / RM, r = threadIdx.x % RM;
    if (r < mr && n0 + e < W.N) {
      float v = 0;
      for (int w = 0; w < 8; ++w) v += red[w][threadIdx.x];
      Y[static_cast<int64_t>(m0 + r) * W.N + n0 + e] = v;
    }
  }
}
bool g_f32_tile = true;

int grid_for(int64_t n, int block = 256) { return static_cast<int>(std::min<int64_t>(cdiv(n, block), 65535 * 8)); }

bool g_few_rows = true;
bool g_few_by_rows = true;  // the expert launches by tile size (gemm_few)
int g_few_piece = -1;        // the most rows of a listed tile (moe_permute): 32, 16 (no 32-row launch), 8; -1: by tokens
int g_few_wide = -1;         // bit c: class c's expert launch (8·2^c rows) in wide blocks (gemm_few); -1: by format
bool g_route_block = true;  // the router by one block per token (k_route_block) where it fits, else k_route
bool g_few_late = true;      // the expert launches per tile size after the first run beside it (Groups::late; NOTES
                             // 83: FP8/INT4 64 tokens -4/-5% on the H100)
int sm_count() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    if (n <= 0) n = 1;
  }
  return n;
}
bool same_shape(const DLin& a, const DLin& b) {
  return a.fmt == b.fmt && a.N == b.N && a.K == b.K && a.bo == b.bo && a.bi == b.bi && a.g == b.g && a.scales_bf16() == b.scales_bf16();
}
// The expert launch classes (bit c: tiles of up to 8·2^c rows) that run 8-warp blocks of 128 features: INT4's 9-16
// and 17-32-row launches (MoE 256 tokens 2672 -> 2538 us, NOTES 71); FP8's keep 4 warps (no gain at 128-256 tokens,
// 2-3% slower at 16-32).
int few_wide_classes(int fmt) { return g_few_wide >= 0 ? g_few_wide : fmt == kInt4 ? 6 : 0; }
template <int FMT, int NT, bool SB, int WB = kFewWarps>
void launch_few(dim3 grid, size_t smem, cudaStream_t s, const bf16* X, int M, float* Y, const DLin& W, float* Y2,
                const DLin& W2, const Groups& gr, int ksplit, float* part, int* cnt) {
  auto go = [&](auto kernel) {
    allow_smem(reinterpret_cast<const void*>(kernel), int(few_smem<FMT>(NT)));
    launch_k(kernel, grid, 32 * WB, smem, s, X, M, Y, W, Y2, W2, gr, ksplit, part, cnt);
  };
  if constexpr (WB != kFewWarps) {  // wide blocks: grouped launches, K whole, two blocks per multiprocessor
    go(k_gemm_few<FMT, NT, SB, false, 2, false, WB>);
    return;
  }
  constexpr int kMinB = NT == 1 ? 5 : 4;
  if (!gr.row_off) {  // dense: the L2 hint of ld_weights; bf16 at NT = 1 four blocks per multiprocessor (MINB)
    constexpr int kMinBD = FMT == kBf16 && NT == 1 ? 4 : kMinB;
    if (part) go(k_gemm_few<FMT, NT, SB, true, kMinBD, true>);
    else go(k_gemm_few<FMT, NT, SB, false, kMinBD, true>);
    return;
  }
  // INT4 experts of 1-8 rows take the L2 hint too (MoE 1-4 tokens queued 1% faster, NOTES 71; at 9-32 rows it made
  // them slower, NOTES 70)
  constexpr bool kL2B = FMT == kInt4 && NT == 1;
  if (part) go(k_gemm_few<FMT, NT, SB, true, kMinB, kL2B>);
  else go(k_gemm_few<FMT, NT, SB, false, kMinB, kL2B>);
}
template <int FMT, bool SB>
void launch_few_nt(int nt, bool wide, dim3 grid, cudaStream_t s, const bf16* X, int M, float* Y, const DLin& W, float* Y2,
                   const DLin& W2, const Groups& gr, int ksplit, float* part, int* cnt) {
  const size_t smem = few_smem<FMT>(nt);
  if constexpr (FMT != kBf16) {
    if (wide && nt == 2) return launch_few<FMT, 2, SB, kFewWideWarps>(grid, smem, s, X, M, Y, W, Y2, W2, gr, ksplit, part, cnt);
    if (wide && nt == 4) return launch_few<FMT, 4, SB, kFewWideWarps>(grid, smem, s, X, M, Y, W, Y2, W2, gr, ksplit, part, cnt);
  }
  if (nt == 1) launch_few<FMT, 1, SB>(grid, smem, s, X, M, Y, W, Y2, W2, gr, ksplit, part, cnt);
  else if (nt == 2) launch_few<FMT, 2, SB>(grid, smem, s, X, M, Y, W, Y2, W2, gr, ksplit, part, cnt);
  else launch_few<FMT, 4, SB>(grid, smem, s, X, M, Y, W, Y2, W2, gr, ksplit, part, cnt);
}
// The split matmuls' tile counters of a stream: zero between launches (the last block of each tile resets its
// own), grown (synchronously, once) to the largest grid seen; one array per stream, so launches on different
// streams never share a counter, and launches on one stream run one after the other. Freed with the stream
// (release_split_counters).
struct SplitCounters {
  std::mutex mu;
  std::unordered_map<cudaStream_t, std::pair<int*, size_t>> per_stream;
};
SplitCounters& split_counter_map() {
  static SplitCounters c;
  return c;
}
int* split_counters(cudaStream_t s, size_t n) {
  SplitCounters& c = split_counter_map();
  std::lock_guard<std::mutex> lk(c.mu);
  auto& [p, cap] = c.per_stream[s];
  if (cap < n) {
    if (p) {
      if (cudaStreamSynchronize(s) != cudaSuccess || cudaFree(p) != cudaSuccess) cuda_fail(cudaGetLastError(), "split counters");
    }
    p = nullptr;
    cap = 0;
    const size_t want = std::max<size_t>(n, 4096);
    if (cudaMalloc(reinterpret_cast<void**>(&p), want * sizeof(int)) != cudaSuccess) {
      cudaGetLastError();
      cuda_fail(cudaErrorMemoryAllocation, "counters of the split matmuls");
    }
    if (cudaMemset(p, 0, want * sizeof(int)) != cudaSuccess) cuda_fail(cudaGetLastError(), "split counters");
    cap = want;
  }
  return p;
}
// One launch of the streamed-weight matmul over max_row_tiles row tiles of at most max_rows rows (8/16/32: the
// n-tiles a block carries; it does not change any output bit).
void gemm_few(const bf16* X, int M, float* Y, const DLin& W, const Groups& groups, int max_row_tiles, int max_rows,
              int ksplit, cudaStream_t s, float* Y2, const DLin* W2) {
  const int nt = max_rows <= 8 ? 1 : max_rows <= 16 ? 2 : 4;
  const int col_tiles = static_cast<int>(cdiv(W.N, kFewCols));
  float* part = nullptr;
  const int64_t n_out = static_cast<int64_t>(M) * W.N;
  if (ksplit > 1 && cudaMallocAsync(reinterpret_cast<void**>(&part), sizeof(float) * n_out * ksplit * (W2 ? 2 : 1), s) != cudaSuccess) {
    cudaGetLastError();
    cuda_fail(cudaErrorMemoryAllocation, "partial sums of a split matmul");
  }
  const dim3 grid(static_cast<unsigned>(col_tiles * ksplit), static_cast<unsigned>(max_row_tiles), W2 ? 2u : 1u);
  int* cnt = part ? split_counters(s, static_cast<size_t>(col_tiles) * grid.y * grid.z) : nullptr;
  const DLin& w2 = W2 ? *W2 : W;
  auto launch = [&](int nt_, dim3 grid_, const Groups& gr, bool wide = false) {
    switch (W.fmt) {
      case kFp8: launch_few_nt<kFp8, false>(nt_, wide, grid_, s, X, M, Y, W, Y2, w2, gr, ksplit, part, cnt); break;
      case kInt4:
        if (W.scales_bf16()) launch_few_nt<kInt4, true>(nt_, wide, grid_, s, X, M, Y, W, Y2, w2, gr, ksplit, part, cnt);
        else launch_few_nt<kInt4, false>(nt_, wide, grid_, s, X, M, Y, W, Y2, w2, gr, ksplit, part, cnt);
        break;
      default: launch_few_nt<kBf16, false>(nt_, wide, grid_, s, X, M, Y, W, Y2, w2, gr, ksplit, part, cnt); break;
    }
  };
  bool by_size = false;
  if (groups.cls_tiles && g_few_by_rows && ksplit == 1 && W.fmt != kBf16) {
    // Expert launches (FP8, INT4): the host knows only a bound on an expert's rows (the tokens), and the kernel's
    // row count NT sets its shared memory and registers for every block (INT4 at NT = 4: 64 KB, three blocks per
    // multiprocessor; NT = 1: 16 KB, five), which their dequantization needs to keep the memory busy (NOTES 64:
    // MoE INT4 32-128 tokens 60-57% -> 82-70% of the floor, FP8 66-67% -> 78-80%). bf16 experts, whose kernel
    // waits on memory rather than on instructions, ran 2-6% slower that way (the launches' tails) and keep one
    // launch. So one launch per tile size over moe_permute's lists of the tiles of that size: 17-32 rows, 9-16, 1-8
    // (in pieces of 32 rows a group has at most one tile of fewer than 32 rows, and a tile of class c more than 8·c
    // rows, which bounds each list and so the launch's rows of blocks; in pieces of 8, a group's tiles number at most
    // its rows / 8 + 1; the blocks past the list's length do nothing). A block per tile: a loop over tiles in the
    // block made the kernels spill. Every tile's arithmetic is what one launch would do (the same bits).
    // every listed tile has at most piece rows: 8 (one launch, several 8-row tiles per expert), 16 (no 32-row
    // launch) or 32
    const int piece = groups.cls_piece;
    int64_t gy[3] = {0, 0, 0};
    for (int c = 0; c <= (piece == 8 ? 0 : nt == 4 && piece == 32 ? 2 : nt >= 2 ? 1 : 0); ++c)
      gy[c] = c == 2   ? int64_t(M) / 17
              : c == 1 ? (piece == 16 ? int64_t(M) / 9 : std::min<int64_t>(groups.G, M / 9))
                       : (piece == 8 ? int64_t(M) / 8 : 0) + std::min<int64_t>(groups.G, M);
    by_size = gy[0] <= 65535 && gy[1] <= 65535 && gy[2] <= 65535;
    if (by_size) {
      // every launch after the first beside the ones before it (Groups::late, k_gemm_few; set_few_late)
      Groups gc = groups;
      for (int c = 2; c >= 0; --c) {
        if (gy[c] == 0) continue;
        const bool wide = c > 0 && (few_wide_classes(W.fmt) >> c & 1);  // 8-warp blocks of 128 features (K whole)
        const unsigned gx = wide ? static_cast<unsigned>(cdiv(W.N, 16 * kFewWideWarps)) : grid.x;
        launch(1 << c, dim3(gx, static_cast<unsigned>(gy[c]), grid.z), gc, wide);
        gc.late = g_few_late && g_pdl;
      }
    }
  }
  if (!by_size) {
    Groups plain = groups;  // one launch over every row tile
    plain.cls_tiles = nullptr;
    launch(nt, grid, plain);
  }
  if (part) cudaFreeAsync(part, s);
}

template <int FMT, int FW, int WN, bool SPLIT, bool SB>
void launch_tile(dim3 grid, cudaStream_t s, const bf16* X, int M, float* Y, const DLin& W, float* Y2, const DLin& W2,
                 const Groups& gr, int cps) {
  const void* k = reinterpret_cast<const void*>(k_gemm_tile<FMT, FW, WN, SPLIT, SB>);
  allow_smem(k, int(tile_smem<FMT, FW, WN>()));
  launch_k(k_gemm_tile<FMT, FW, WN, SPLIT, SB>, grid, kTileThreadsPerFW * FW, tile_smem<FMT, FW, WN>(), s, X, M, Y, W, Y2, W2, gr, cps);
}
// dense launches' feature warps per block: 2 for bf16 (128 x 128 tiles, two blocks per SM), 4 for FP8/INT4 (256 x
// 128, one), whose dequantization is then shared by more rows per block (NOTES round 5)
template <int FMT, bool SB>
void launch_tile_fmt(bool split, dim3 grid, cudaStream_t s, const bf16* X, int M, float* Y, const DLin& W, float* Y2,
                     const DLin& W2, const Groups& gr, int cps) {
  if (gr.row_off) {  // grouped (experts): 128 x 128 tiles (64-row ones measured slower at every size: NOTES 26)
    launch_tile<FMT, 2, 8, false, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  } else if constexpr (FMT == kBf16) {
    if (split) launch_tile<FMT, 2, 4, true, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
    else launch_tile<FMT, 2, 8, false, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  } else {
    if (split) launch_tile<FMT, 4, 4, true, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
    else launch_tile<FMT, 4, 8, false, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  }
}
// One launch of the tile kernel: grouped (row_tiles: the kBM-row tiles of the groups) or dense (all M rows), K split
// into ksplit parts of the streamed kernel's stages (1: whole).
bool g_wg_gemm = true;
int g_wg_rows = 0;  // 0: by shape
PFN_cuTensorMapEncodeTiled_v12000 tma_encoder();
bool encode_map(CUtensorMap* m, const void* base, uint64_t cols, uint64_t rows, uint64_t ld, uint32_t box_rows);
void gemm_wg(const bf16* X, int M, float* Y, const DLin& W, const Groups& groups, int row_tiles, int ksplit,
             cudaStream_t s, float* Y2, const DLin* W2);
void gemm_tile(const bf16* X, int M, float* Y, const DLin& W, const Groups& groups, int row_tiles, int ksplit,
               cudaStream_t s, float* Y2, const DLin* W2) {
  // (dense launches with fewer 256-row blocks than multiprocessors stay on the tile kernel: its 64-row tiles fill
  // the GPU better there)
  // (tensor maps over the weights: grouped ones must be stacked back to back)
  if (g_wg_gemm && tma_encoder() && (!groups.row_off || W.w_stride == W.N * W.w_ld) &&
      (groups.row_off || g_wg_rows || cdiv(W.N, kWgFeat) * cdiv(M, ksplit > 1 ? 128 : 256) >= sm_count())) {
    gemm_wg(X, M, Y, W, groups, row_tiles, ksplit, s, Y2, W2);
    return;
  }
  const bool split = ksplit > 1;
  const int fw = W.fmt == kBf16 ? 2 : 4;
  const int R = split ? 64 : 128, BF = groups.row_off ? 128 : 64 * fw;
  const int nst = W.K / few_stage_k(W), sps = (nst + ksplit - 1) / ksplit;
  const int cw = W.fmt == kBf16 ? tile_cw<kBf16>() : W.fmt == kFp8 ? tile_cw<kFp8>() : tile_cw<kInt4>();
  const int cps = sps * (few_stage_k(W) / cw);
  const int64_t cts = cdiv(W.N, BF);
  const dim3 grid = groups.row_off ? dim3(static_cast<unsigned>(cts), static_cast<unsigned>(row_tiles), W2 ? 2u : 1u)
                                   : dim3(static_cast<unsigned>(cts * cdiv(M, R)), 1u, W2 ? 2u : 1u);
  const DLin& w2 = W2 ? *W2 : W;
  switch (W.fmt) {
    case kFp8: launch_tile_fmt<kFp8, false>(split, grid, s, X, M, Y, W, Y2, w2, groups, cps); break;
    case kInt4:
      if (W.scales_bf16()) launch_tile_fmt<kInt4, true>(split, grid, s, X, M, Y, W, Y2, w2, groups, cps);
      else launch_tile_fmt<kInt4, false>(split, grid, s, X, M, Y, W, Y2, w2, groups, cps);
      break;
    default: launch_tile_fmt<kBf16, false>(split, grid, s, X, M, Y, W, Y2, w2, groups, cps); break;
  }
}
// The warpgroup-MMA variant of the tile kernel (same bits). R: rows per block (the wgmma's N).
struct WgMaps {
  CUtensorMap x, w, w2;
};
template <int FMT, int R, bool SPLIT, bool SB, int BPS = 1>
void launch_wg(dim3 grid, cudaStream_t s, const WgMaps& X, int M, float* Y, const DLin& W, float* Y2, const DLin& W2,
               const Groups& gr, int cps) {
  const void* k = reinterpret_cast<const void*>(k_gemm_wg<FMT, R, SPLIT, SB, BPS>);
  allow_smem(k, int(wg_smem<FMT, R, BPS>()));
  launch_k(k_gemm_wg<FMT, R, SPLIT, SB, BPS>, grid, kWgThreads, wg_smem<FMT, R, BPS>(), s, X.x, X.w, X.w2, M, Y, W, Y2, W2, gr,
           cps);
}
template <int FMT, bool SB = false>
void launch_wg_rows(int R, bool split, dim3 grid, cudaStream_t s, const WgMaps& X, int M, float* Y, const DLin& W,
                    float* Y2, const DLin& W2, const Groups& gr, int cps) {
  if (split) {  // (at most 128 rows: the split total doubles the accumulators)
    if (R == 64) launch_wg<FMT, 64, true, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
    else launch_wg<FMT, 128, true, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  } else if (R == 64) {
    if (gr.row_off) launch_wg<FMT, 64, false, SB, 2>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
    else launch_wg<FMT, 64, false, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  } else if (R == 128) {
    launch_wg<FMT, 128, false, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  } else {
    launch_wg<FMT, 256, false, SB>(grid, s, X, M, Y, W, Y2, W2, gr, cps);
  }
}
// Rows per block: dense launches 256 (128 with K split: the split total doubles the accumulators) or fewer for
// few rows; grouped ones by the average rows per group (a block covers one group's rows).
int wg_rows(int M, const Groups& gr, bool split) {
  int r = g_wg_rows;
  if (r == 0) {
    const int avg = gr.row_off ? M / std::max(1, gr.G) : M;
    r = avg <= 64 ? 64 : avg <= 128 || gr.row_off ? 128 : 256;
  }
  if (split) r = std::min(r, 128);
  return r <= 64 ? 64 : r <= 128 ? 128 : 256;
}
void gemm_wg(const bf16* X, int M, float* Y, const DLin& W, const Groups& groups, int row_tiles, int ksplit,
             cudaStream_t s, float* Y2, const DLin* W2) {
  const bool split = ksplit > 1;
  const int R = wg_rows(M, groups, split);
  const int nst = W.K / few_stage_k(W), sps = (nst + ksplit - 1) / ksplit;
  const int cw = W.fmt == kBf16 ? tile_cw<kBf16>() : W.fmt == kFp8 ? tile_cw<kFp8>() : tile_cw<kInt4>();
  const int cps = sps * (few_stage_k(W) / cw);
  const int64_t cts = cdiv(W.N, kWgFeat);
  const dim3 grid = groups.row_off ? dim3(static_cast<unsigned>(cts), static_cast<unsigned>(row_tiles), W2 ? 2u : 1u)
                                   : dim3(static_cast<unsigned>(cts * cdiv(M, R)), 1u, W2 ? 2u : 1u);
  const DLin& w2 = W2 ? *W2 : W;
  // X in the streamed kernel's k-slot order, in a workspace from the stream's pool (M·K bf16), and its tensor map
  bf16* xp = nullptr;
  const int64_t n = static_cast<int64_t>(M) * W.K;
  if (cudaMallocAsync(reinterpret_cast<void**>(&xp), sizeof(bf16) * n, s) != cudaSuccess) {
    cudaGetLastError();
    cuda_fail(cudaErrorMemoryAllocation, "the many-row matmul's permuted input");
  }
  if (W.fmt == kInt4) launch_k(k_permute_x4, grid_for(n / 2), 256, 0, s, X, n / 2, reinterpret_cast<uint32_t*>(xp));
  else launch_k(k_permute_x, grid_for(n / 8), 256, 0, s, reinterpret_cast<const uint32_t*>(X), n / 8, cw / 8, reinterpret_cast<uint4*>(xp));
  WgMaps maps;
  // weights as bytes: [G·N rows][w_ld], boxes of 64 bytes x 128 rows, no swizzle
  auto wmap = [&](CUtensorMap* m, const DLin& w) {
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(w.w_ld), static_cast<cuuint64_t>(w.N) * std::max(1, groups.G)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(w.w_ld)};
    const cuuint32_t box[2] = {64, kWgFeat}, es[2] = {1, 1};
    return tma_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(w.w), dims, strides, box, es,
                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  if (!encode_map(&maps.x, xp, static_cast<uint64_t>(W.K), static_cast<uint64_t>(M), static_cast<uint64_t>(W.K), static_cast<uint32_t>(R)) ||
      !wmap(&maps.w, W) || !wmap(&maps.w2, w2))
    cuda_fail(cudaErrorInvalidValue, "tensor maps of the many-row matmul");
  if (W.fmt == kFp8) launch_wg_rows<kFp8>(R, split, grid, s, maps, M, Y, W, Y2, w2, groups, cps);
  else if (W.fmt == kInt4 && W.scales_bf16()) launch_wg_rows<kInt4, true>(R, split, grid, s, maps, M, Y, W, Y2, w2, groups, cps);
  else if (W.fmt == kInt4) launch_wg_rows<kInt4, false>(R, split, grid, s, maps, M, Y, W, Y2, w2, groups, cps);
  else launch_wg_rows<kBf16>(R, split, grid, s, maps, M, Y, W, Y2, w2, groups, cps);
  cudaFreeAsync(xp, s);
}
// shapes of the streamed kernel the tile kernel takes too: FP8 with blocks of rows that hold a warp's 64 features
bool tile_ok(const DLin& W) { return W.fmt != kFp8 || W.bo % 64 == 0; }
// Defaults: dense from 48 rows; grouped from 8 rows per group on average on the warpgroup kernel (a block
// streams its expert's weights once for up to 64 rows, where the streamed kernel's 32-row tiles run at a fraction
// of the bandwidth: bench/NOTES.md 39), INT4 from 16 (its streamed launches by tile size in 8-warp blocks: MoE 512
// tokens, 12 rows per group, 3995-4043 -> 3730-3772 us; NOTES 71), bf16 from 0.35 (its experts wait on memory,
// and the warpgroup kernel streams each touched expert once: MoE 64 / 128 / 256 tokens 4806 / 5796 / 6666 -> 4285 /
// 5173 / 5834 us from 1 row; 16 / 32 tokens 2364 / 3430 -> 2229 / 3066 us from 0.35, fewer rows than experts
// tested bit for bit since 77;
// FP8 there was slower, 2876 / 3524 -> 3375 / 3832: NOTES 75, 77), 24 on the mma.sync tile kernel. -1: the default.
constexpr int kTileDenseRows = 48, kTileGroupRows = 24, kWgGroupRows = 8, kWgGroupRowsInt4 = 16;
constexpr double kWgGroupRowsBf16 = 0.35;
int g_tile_dense_rows = kTileDenseRows;
double g_tile_group_rows = -1;
double tile_group_rows(int fmt) {
  if (g_tile_group_rows >= 0) return g_tile_group_rows;
  return !g_wg_gemm ? kTileGroupRows : fmt == kInt4 ? kWgGroupRowsInt4 : fmt == kBf16 ? kWgGroupRowsBf16 : kWgGroupRows;
}

}  // namespace

void release_split_counters(cudaStream_t s) {
  SplitCounters& c = split_counter_map();
  std::lock_guard<std::mutex> lk(c.mu);
  auto it = c.per_stream.find(s);
  if (it == c.per_stream.end()) return;
  if (it->second.first) {
    cudaStreamSynchronize(s);  // no launch of the stream still counts on them
    cudaFree(it->second.first);
  }
  c.per_stream.erase(it);
}
size_t split_counter_streams() {
  SplitCounters& c = split_counter_map();
  std::lock_guard<std::mutex> lk(c.mu);
  return c.per_stream.size();
}

void set_f32_tile(bool on) { g_f32_tile = on; }
void set_wg_gemm(bool on, int rows) {
  g_wg_gemm = on;
  g_wg_rows = rows;
}
void set_tile_rows(int dense_rows, double group_rows) {
  g_tile_dense_rows = dense_rows < 0 ? kTileDenseRows : dense_rows;
  g_tile_group_rows = group_rows < 0 ? -1 : group_rows;
}

bool few_rows_ok(const DLin& W) {
  if (!g_few_rows || g_simple_gemm) return false;
  return W.K % few_stage_k(W) == 0 && (W.fmt != kFp8 || (W.bi > 0 && W.bi % 16 == 0 && W.bo > 0)) && (W.fmt != kInt4 || (W.g > 0 && W.g % 32 == 0)) &&
         W.w_ld % 16 == 0;
}
void set_few_rows(bool on) { g_few_rows = on; }
void set_few_by_rows(bool on) { g_few_by_rows = on; }
void set_few_late(bool on) { g_few_late = on; }
void set_route_block(bool on) { g_route_block = on; }
void set_few_piece(int rows) { g_few_piece = rows == 8 || rows == 16 || rows == 32 ? rows : -1; }
void set_few_wide(int classes) { g_few_wide = classes < 0 ? -1 : classes & 6; }
int few_wide() { return g_few_wide; }
// Calls of up to 32 tokens list 8-row tiles: their only tiles of more than 8 rows are mostly the stacked shared
// expert's (one per token), whose 9-16 or 17-32-row launch was a fraction of a wave of blocks, each waiting on
// memory once per stage (FP8 16 tokens: 59 us for the gate+up of 2 tiles at 11% of the DRAM bandwidth, beside 553
// us for every other expert at 82%); as 8-row tiles they join the one launch. FP8 16 / 32 tokens 976-996 / 1386-1395
// -> 938-944 / 1343-1366 us (H200); from 64 tokens slower (1970 -> 2052, 256: 3290 -> 4424): NOTES 79.
constexpr int kFewPiece8Tokens = 32;
int few_piece(int64_t tokens) { return g_few_piece > 0 ? g_few_piece : tokens <= kFewPiece8Tokens ? 8 : kBM; }

void gemm(const bf16* X, int M, float* Y, const DLin& W, const Groups& groups, int max_row_tiles, cudaStream_t s,
          float* Y2, const DLin* W2, int max_rows) {
  if (M == 0 || max_row_tiles == 0) return;
  if (W2 && !same_shape(*W2, W)) {
    gemm(X, M, Y, W, groups, max_row_tiles, s, nullptr, nullptr, max_rows);  // not a matching pair: two launches
    gemm(X, M, Y2, *W2, groups, max_row_tiles, s, nullptr, nullptr, max_rows);
    return;
  }
  if (few_rows_ok(W)) {
    if (groups.row_off) {  // grouped (MoE experts): one launch over the row tiles, K whole
      const double group_rows = tile_group_rows(W.fmt);
      if (tile_ok(W) && group_rows > 0 && M >= group_rows * groups.G) {
        gemm_tile(X, M, Y, W, groups, max_row_tiles, 1, s, Y2, W2);
        return;
      }
      gemm_few(X, M, Y, W, groups, max_row_tiles, std::min(max_rows, kBM), 1, s, Y2, W2);
      return;
    }
    // one dense matrix: K split until about four blocks per multiprocessor, by shape alone; rows in launches whose
    // partial sums stay within 64 MiB (both leave every output bit as it is)
    const int col_tiles = static_cast<int>(cdiv(W.N, kFewCols)) * (W2 ? 2 : 1);
    const int nst = W.K / few_stage_k(W);
    int ksplit = std::min(nst, std::max(1, (4 * sm_count() + col_tiles - 1) / col_tiles));
    const int per = (nst + ksplit - 1) / ksplit;
    ksplit = (nst + per - 1) / per;
    if (tile_ok(W) && g_tile_dense_rows > 0 && M >= g_tile_dense_rows) {  // many rows: the tile kernel, splits summed in registers
      gemm_tile(X, M, Y, W, groups, 0, ksplit, s, Y2, W2);
      return;
    }
    int64_t chunk = M;
    if (ksplit > 1)
      chunk = std::max<int64_t>(kBM, (int64_t(64) << 20) / (int64_t(4) * W.N * ksplit * (W2 ? 2 : 1)) / kBM * kBM);
    for (int64_t r = 0; r < M; r += chunk) {
      const int m = static_cast<int>(std::min<int64_t>(chunk, M - r));
      gemm_few(X + r * W.K, m, Y + r * W.N, W, groups, static_cast<int>(cdiv(m, kBM)), std::min(m, kBM), ksplit, s,
               Y2 ? Y2 + r * W.N : nullptr, W2);
    }
    return;
  }
  const dim3 grid(static_cast<unsigned>(cdiv(W.N, kBN)), static_cast<unsigned>(max_row_tiles), W2 ? 2u : 1u);
  const bool aligned = W.K % kBK == 0 && (W.fmt != kFp8 || (W.bo % kBN == 0 && W.bi % kBK == 0)) &&
                       (W.fmt != kInt4 || W.g % 32 == 0);
  if (aligned && !g_simple_gemm) {
    allow_smem(reinterpret_cast<const void*>(k_gemm_pipe<kBf16>), int(pipe_smem<kBf16>()));
    allow_smem(reinterpret_cast<const void*>(k_gemm_pipe<kFp8>), int(pipe_smem<kFp8>()));
    allow_smem(reinterpret_cast<const void*>(k_gemm_pipe<kInt4>), int(pipe_smem<kInt4>()));
    const DLin& w2 = W2 ? *W2 : W;
    switch (W.fmt) {
      case kFp8: launch_k(k_gemm_pipe<kFp8>, grid, 128, pipe_smem<kFp8>(), s, X, M, Y, W, Y2, w2, groups); break;
      case kInt4: launch_k(k_gemm_pipe<kInt4>, grid, 128, pipe_smem<kInt4>(), s, X, M, Y, W, Y2, w2, groups); break;
      default: launch_k(k_gemm_pipe<kBf16>, grid, 128, pipe_smem<kBf16>(), s, X, M, Y, W, Y2, w2, groups); break;
    }
    return;
  }
  if (W2) {  // the single-stage kernel runs the pair as two launches
    gemm(X, M, Y, W, groups, max_row_tiles, s);
    gemm(X, M, Y2, *W2, groups, max_row_tiles, s);
    return;
  }
  switch (W.fmt) {
    case kFp8: launch_k(k_gemm<kFp8>, grid, 128, 0, s, X, M, Y, W, groups); break;
    case kInt4: launch_k(k_gemm<kInt4>, grid, 128, 0, s, X, M, Y, W, groups); break;
    default: launch_k(k_gemm<kBf16>, grid, 128, 0, s, X, M, Y, W, groups); break;
  }
}
void set_simple_gemm(bool on) { g_simple_gemm = on; }
bool g_simple_attention = false, g_mla_mma_sync = false;
void set_mla_mma_sync(bool on) { g_mla_mma_sync = on; }
void set_simple_attention(bool on) { g_simple_attention = on; }
bool simple_attention() { return g_simple_attention; }
void gemm_f32(const float* X, int M, float* Y, const DLin& W, cudaStream_t s) {
  if (M == 0) return;
  if (W.fmt == kBf16 && W.K % 64 == 0) {
    if (g_f32_tile && M >= 8) {  // (the same bits; fewer rows: the split kernel wastes fewer loads)
      launch_k(k_gemm_f32_tile<8, 8>, dim3(static_cast<unsigned>(cdiv(W.N, 8)), static_cast<unsigned>(cdiv(M, 8))), 256, 0, s, X, M, Y, W);
      return;
    }
    launch_k(k_gemm_f32_split, dim3(static_cast<unsigned>(W.N), static_cast<unsigned>(cdiv(M, 4))), 256, 0, s, X, M, Y, W);
    return;
  }
  launch_k(k_gemm_f32, dim3(static_cast<unsigned>(cdiv(W.N, 4)), static_cast<unsigned>(cdiv(M, 4))), 128, 0, s, X, M, Y, W);
}
void f32_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t s) {
  if (n) launch_k(k_f32_to_bf16, grid_for(n), 256, 0, s, x, y, n);
}
void fill(float* p, float v, int64_t n, cudaStream_t s) {
  if (n) launch_k(k_fill, grid_for(n), 256, 0, s, p, v, n);
}
void add(float* y, const float* x, int64_t n, cudaStream_t s) {
  if (n) launch_k(k_add, grid_for(n), 256, 0, s, y, x, n);
}
void embed(const bf16* table, int64_t V, int64_t H, const int32_t* ids, int64_t n, float* out, cudaStream_t s) {
  if (n) launch_k(k_embed, dim3(static_cast<unsigned>(n), static_cast<unsigned>(cdiv(H, 1024))), 256, 0, s, table, H, ids, out);
}
// one block per row: a thread per four columns, 32 to 1024 of them
static int rmsnorm_block(int64_t d) { return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, cdiv(cdiv(d, 4), 32) * 32))); }
void rmsnorm(const float* x, int64_t ld, const float* w, int64_t n, int64_t d, float eps, float* out, bf16* out16,
             cudaStream_t s) {
  if (n == 0) return;
  const bool in_smem = d * 4 <= 48 * 1024;
  launch_k(k_rmsnorm_row<false>, static_cast<unsigned>(n), rmsnorm_block(d), in_smem ? d * sizeof(float) : 0, s, x, ld,
           nullptr, nullptr, w, d, eps, out, out16, in_smem);
}
void add_rmsnorm(float* h, const float* y, const float* w, int64_t n, int64_t d, float eps, float* out, bf16* out16,
                 cudaStream_t s) {
  if (n == 0) return;
  const bool in_smem = d * 4 <= 48 * 1024;
  launch_k(k_rmsnorm_row<true>, static_cast<unsigned>(n), rmsnorm_block(d), in_smem ? d * sizeof(float) : 0, s, h, d, y, h,
           w, d, eps, out, out16, in_smem);
}
void rope(float* x, int64_t n, int64_t n_heads, int64_t row_stride, int64_t head_stride, int64_t offset, int64_t dim,
          const int64_t* pos, const float* inv_freq, float attn_factor, bool interleaved, cudaStream_t s) {
  if (n == 0 || n_heads == 0) return;
  const int block = static_cast<int>(std::min<int64_t>(128, std::max<int64_t>(32, cdiv(dim / 2, 32) * 32)));
  launch_k(k_rope, dim3(static_cast<unsigned>(n), static_cast<unsigned>(n_heads)), block, 0, s, 
      x, row_stride, head_stride, offset, static_cast<int>(dim), pos, inv_freq, attn_factor, interleaved);
}
void gather_rows(const float* src, const int64_t* rows, int64_t n, int64_t width, float* dst, cudaStream_t s) {
  if (n && width) launch_k(k_gather_rows, dim3(static_cast<unsigned>(n), static_cast<unsigned>(cdiv(width, 1024))), 256, 0, s, src, rows, width, dst);
}
void silu_mul(const float* g, const float* u, int64_t n, bf16* out, cudaStream_t s) {
  if (n) launch_k(k_silu_mul, grid_for(n), 256, 0, s, g, u, n, out);
}
void route(const RouteArgs& a, const float* logits, const float* bias, int64_t n, int32_t* idx, float* weight,
           cudaStream_t s) {
  if (n == 0) return;
  if (g_route_block && a.E <= kRouteBlockCap && a.G <= 64) {
    launch_k(k_route_block, static_cast<unsigned>(n), static_cast<unsigned>(cdiv(a.E, 32) * 32), 0, s, a, logits, bias,
             idx, weight);
    return;
  }
  const size_t smem = static_cast<size_t>(kRouteWarps) * route_warp_floats(a.E) * sizeof(float);
  if (smem > 48 * 1024) allow_smem(reinterpret_cast<const void*>(k_route), static_cast<int>(smem));
  launch_k(k_route, static_cast<unsigned>(cdiv(n, kRouteWarps)), kRouteWarps * 32, smem, s, a, logits, bias, n, idx, weight);
}
void moe_permute(const Slots& sl, int64_t n_slots, int E, int* counts, int* row_off, int* tile_off, int* cursor,
                 int* perm, int* slot_pos, int* cls_count, int2* cls_tiles, int cls_cap, int piece, cudaStream_t s) {
  if (n_slots <= kPermuteSmallSlots && E <= kPermuteSmallExperts) {
    launch_k(k_moe_permute_small, 1, kScanThreads, 0, s, sl, static_cast<int>(n_slots), E, row_off, tile_off, perm, slot_pos,
             cls_count, cls_tiles, cls_cap, piece);
    return;
  }
  cudaMemsetAsync(counts, 0, E * sizeof(int), s);
  if (n_slots) launch_k(k_moe_count, grid_for(n_slots), 256, 0, s, sl, n_slots, counts);
  launch_k(k_moe_scan, 1, kScanThreads, 0, s, counts, E, row_off, tile_off, cursor, cls_count, cls_tiles, cls_cap, piece);
  if (n_slots) launch_k(k_moe_scatter, grid_for(n_slots), 256, 0, s, sl, n_slots, cursor, perm, slot_pos);
}
void moe_gather(const float* x, const int* perm, int64_t n_slots, int k, int64_t H, bf16* xp, cudaStream_t s) {
  if (n_slots) launch_k(k_moe_gather, dim3(static_cast<unsigned>(n_slots), static_cast<unsigned>(cdiv(H, 1024))), 256, 0, s, x, perm, k, H, xp);
}
void moe_combine(const float* D, const int* slot_pos, const Slots& sl, int64_t n, int64_t H, float* out, cudaStream_t s) {
  if (n) launch_k(k_moe_combine, dim3(static_cast<unsigned>(n), static_cast<unsigned>(cdiv(H, 1024))), 256, 0, s, D, slot_pos, sl, H, out);
}
void kv_append(const float* latent, const float* ckv, int64_t row0, int64_t n, int64_t C, int64_t dr, bf16* lat_dst,
               bf16* rope_dst, cudaStream_t s) {
  if (n) launch_k(k_kv_append, grid_for(n * (C + dr)), 256, 0, s, latent, ckv, row0, n, C, dr, lat_dst, rope_dst);
}
bool flash_expanded_ok(const AttnDims& d) {
  return !g_simple_attention && d.dn + d.dr == 192 && d.dv == 128 && d.dn % 8 == 0 && d.dr % 8 == 0;
}
bool g_flash_wg = true;
void set_flash_wg(bool on) { g_flash_wg = on; }
void set_pdl(bool on) { g_pdl = on; }
bool flash_wg_ok(const AttnDims& d) { return g_flash_wg && flash_expanded_ok(d) && d.dn == 128 && d.dr == 64; }
int flash_tile_rows(const AttnDims& d) { return flash_wg_ok(d) ? kFwRows : kFlashTileRows; }
void kvx_to_bf16(float* kvx, int64_t n, cudaStream_t s) {
  if (n) launch_k(k_kvx_bf16, static_cast<unsigned>(cdiv(n, 8)), 256, 0, s, kvx, n);
}
void attention_expanded_tiles(const AttnDims& d, const float* q, const AttnRow* rows, const AttnTile* tiles, int n_tiles,
                              float* out, cudaStream_t s) {
  if (n_tiles == 0) return;
  if (flash_wg_ok(d)) {
    allow_smem(reinterpret_cast<const void*>(k_flash_wg), int(flash_wg_smem()));
    launch_k(k_flash_wg, dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(d.nh)), 256, flash_wg_smem(), s, d, q, rows, tiles, out);
    return;
  }
  allow_smem(reinterpret_cast<const void*>(k_flash_expanded<192, 128>), int(flash_smem<192, 128>()));
  launch_k(k_flash_expanded<192, 128>, dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(d.nh)), 128,
                               flash_smem<192, 128>(), s, d, q, rows, tiles, out);
}
void attention_expanded(const AttnDims& d, const float* q, const AttnRow* rows, int n_rows, float* out, cudaStream_t s) {
  if (n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(d.nh));
  const int w = std::max(d.dn, d.dv);
  if (w <= 64) launch_k(k_attn_expanded<2>, grid, 128, 0, s, d, q, rows, out);
  else if (w <= 128) launch_k(k_attn_expanded<4>, grid, 128, 0, s, d, q, rows, out);
  else launch_k(k_attn_expanded<8>, grid, 128, 0, s, d, q, rows, out);
}
dim3 groups8(int n_rows, int nh) { return dim3(static_cast<unsigned>(n_rows), static_cast<unsigned>((nh + 7) / 8)); }
bool mla_fast_path(const AttnDims& d) {
  return d.C % 32 == 0 && d.C <= 512 && d.dr % 16 == 0 && d.dr <= 128 && d.dr <= d.C && d.dn <= 256;
}
int mla_splits(const AttnDims& d, int n_rows, int max_len, int sms) {
  // one wave: as many splits as fit the multiprocessors whole (a partial second wave would leave most of them idle)
  const int hgroups = (d.nh + kMlaH - 1) / kMlaH;
  const int fit = sms / (n_rows * hgroups);
  // and at least 4 tiles per split: each block also loads the 64 heads' queries (twice a tile's bytes)
  return std::max(1, std::min(std::min(fit, kMlaMaxSplits), (max_len + 4 * kMlaT - 1) / (4 * kMlaT)));
}
int mla_row_chunk(int len) {
  const int splits = std::max(1, std::min(kMlaMaxSplits, (len + kMlaRowChunk - 1) / kMlaRowChunk));
  return ((len + splits - 1) / splits + kMlaT - 1) / kMlaT * kMlaT;
}
namespace {
bool g_mla_tma = true;
int g_mla_ws = 1;  // set_mla_specialized
std::atomic<int64_t> g_mla_ws_launches{0};
PFN_cuTensorMapEncodeTiled_v12000 tma_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}
// [rows][cols] bf16 (row stride ld elements), boxes of 64 columns (128 bytes, swizzled) × box_rows rows
bool encode_map(CUtensorMap* m, const void* base, uint64_t cols, uint64_t rows, uint64_t ld, uint32_t box_rows) {
  const cuuint64_t dims[2] = {cols, rows}, strides[1] = {ld * 2};
  const cuuint32_t box[2] = {64, box_rows}, es[2] = {1, 1};
  return tma_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, es,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
// (only where the tensor-core decode kernel runs at all, so no maps are encoded for a path that ignores them)
bool mla_tma_ok(const AttnDims& d) {
  return g_mla_tma && !g_mla_mma_sync && !g_simple_attention && mla_fast_path(d) && mla_wg_ok(d) && d.dr == 64 && tma_encoder();
}
}  // namespace

static_assert(sizeof(CUtensorMap) == kMlaMapBytes);
std::atomic<int64_t> g_mla_tma_launches{0};
void set_mla_tma(bool on) { g_mla_tma = on; }
void set_mla_specialized(int mode) { g_mla_ws = mode; }
int64_t mla_specialized_launches() { return g_mla_ws_launches.load(); }
int64_t mla_tma_launches() { return g_mla_tma_launches.load(); }
bool mla_tma_maps(const AttnDims& d, const AttnRow* rows, int n_rows, void* out) {
  if (!mla_tma_ok(d)) return false;
  auto* m = static_cast<CUtensorMap*>(out);
  for (int i = 0; i < n_rows; ++i)
    if (!encode_map(&m[2 * i], rows[i].latent, d.C, rows[i].len, d.C, kMlaT) ||
        !encode_map(&m[2 * i + 1], rows[i].k_rope, d.dr, rows[i].len, d.dr, kMlaT))
      return false;
  return true;
}

void attention_absorbed(const AttnDims& d, const float* q, const bf16* w_uk, const bf16* w_uvt, const AttnRow* rows,
                        int n_rows, int max_len, int splits, float* qlat, float* olat, float* part, float* out, cudaStream_t s,
                        const void* kv_maps, bool row_chunks) {
  if (n_rows == 0) return;
  const unsigned rchunks = static_cast<unsigned>((n_rows + kRB - 1) / kRB);
  const bool fast = mla_fast_path(d) && part;
  bf16* qcat = fast ? reinterpret_cast<bf16*>(olat) : nullptr;  // olat is free until the combine: q_lat || q_rope in bf16
  // the absorption matmuls on tensor cores where the tensor-core attention runs (bf16 inputs, as its Q is)
  const bool hm = fast && head_mm_ok(d) && !g_mla_mma_sync;
  const dim3 hm_grid(static_cast<unsigned>((n_rows + kHmRows - 1) / kHmRows), static_cast<unsigned>(d.nh), 0);
  if (hm) {
    dim3 g = hm_grid;
    g.z = static_cast<unsigned>((d.C + kHmCols - 1) / kHmCols);
    launch_k(k_head_mm<true, false, 2, kHmRows>, g, 128, 0, s, d, q, w_uk, rows, n_rows, nullptr, qcat);
  } else {
    const size_t smem = rows16_smem(d.dn);
    const dim3 grid(rchunks, static_cast<unsigned>(d.nh), static_cast<unsigned>((d.C + kCB - 1) / kCB));
    auto launch = [&](auto kernel) {
      allow_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(rows16_smem(1024)));
      launch_k(kernel, grid, 256, smem, s, d, q, w_uk, rows, n_rows, qlat, qcat);
    };
    if (n_rows <= 4) launch(k_qlat16<4>);
    else launch(k_qlat16<16>);
  }
  if (fast) {
    const int D = d.C + d.dr;
    const size_t smem = mla_smem_bytes(D);
    const int chunk = ((max_len + splits - 1) / splits + kMlaT - 1) / kMlaT * kMlaT;
    const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(splits), static_cast<unsigned>((d.nh + kMlaH - 1) / kMlaH));
    auto launch = [&](auto kernel) {
      allow_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(mla_smem_bytes(512 + 128)));
      launch_k(kernel, grid, 256, smem, s, d, qcat, rows, chunk, part);
    };
    if (!g_mla_mma_sync && mla_wg_ok(d)) {
      CUtensorMap qmap{};
      const bool tma = kv_maps && mla_tma_ok(d) && encode_map(&qmap, qcat, D, static_cast<uint64_t>(n_rows) * d.nh, D, kMlaH);
      const auto* maps = static_cast<const CUtensorMap*>(kv_maps);
      auto launch_wg = [&](auto kernel) {
        allow_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(mla_wg_smem(512 + 128)));
        launch_k(kernel, grid, 256, mla_wg_smem(D), s, d, qcat, rows, chunk, part, qmap, maps);
      };
      const bool two = d.dr == 64;  // (C + dr) / 32 rounded up: C / 32 + 1, or + 2 with rope 64
      // (splits of whole 64-token tiles where the split is not per row)
      const int ws_chunk = ((max_len + splits - 1) / splits + kWsT - 1) / kWsT * kWsT;
      auto launch_ws = [&](auto kernel) {
        allow_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(mla_ws_smem(512 + 64)));
        launch_k(kernel, grid, 256, mla_ws_smem(D), s, d, rows, ws_chunk, part, qmap, maps);
      };
      // the specialized kernel for long splits (its two 64-token stages and Q take ~216 KB before the first tile's
      // work, so splits of a few tiles run better on k_mla_wg: bench/NOTES.md 53); with per-row splits always (the
      // kernel must not depend on the batch)
      if (tma && (g_mla_ws == 2 || (g_mla_ws == 1 && (row_chunks || ws_chunk >= kMlaWsMinChunk)))) {
        ++g_mla_tma_launches;
        ++g_mla_ws_launches;
        if (d.C == 128) launch_ws(k_mla_ws<64, 3>);
        else if (d.C == 256) launch_ws(k_mla_ws<128, 5>);
        else launch_ws(k_mla_ws<256, 9>);
      } else if (tma) {
        ++g_mla_tma_launches;
        if (d.C == 128) launch_wg(k_mla_wg<64, 6, true>);
        else if (d.C == 256) launch_wg(k_mla_wg<128, 10, true>);
        else launch_wg(k_mla_wg<256, 18, true>);
      } else if (d.C == 128) {
        two ? launch_wg(k_mla_wg<64, 6, false>) : launch_wg(k_mla_wg<64, 5, false>);
      } else if (d.C == 256) {
        two ? launch_wg(k_mla_wg<128, 10, false>) : launch_wg(k_mla_wg<128, 9, false>);
      } else {
        two ? launch_wg(k_mla_wg<256, 18, false>) : launch_wg(k_mla_wg<256, 17, false>);
      }
    } else switch (d.C / 32) {
      case 1: launch(k_mla_decode<2>); break;
      case 2: launch(k_mla_decode<4>); break;
      case 3: launch(k_mla_decode<6>); break;
      case 4: launch(k_mla_decode<8>); break;
      case 8: launch(k_mla_decode<16>); break;
      case 16: launch(k_mla_decode<32>); break;
      default: goto generic;
    }
    // (for the tensor-core W_UV matmul the combine writes o_lat in bf16, into the same buffer: q_cat is consumed)
    launch_k(k_mla_combine, dim3(static_cast<unsigned>(n_rows), static_cast<unsigned>(d.nh)), 128, 0, s, d, splits, part, olat,
             hm ? qcat : nullptr);
  } else {
  generic:
    constexpr int HG = 16;
    const dim3 groups(static_cast<unsigned>(n_rows), static_cast<unsigned>((d.nh + HG - 1) / HG));
    if (d.C <= 128) launch_k(k_attn_latent<4, HG>, groups, HG * 32, 0, s, d, q, qlat, rows, olat);
    else if (d.C <= 512) launch_k(k_attn_latent<16, HG>, groups, HG * 32, 0, s, d, q, qlat, rows, olat);
    else launch_k(k_attn_latent<32, 8>, groups8(n_rows, d.nh), 8 * 32, 0, s, d, q, qlat, rows, olat);
  }
  if (hm) {
    // W_UV (dv = 128: two column blocks per head) at 16 rows per block up to 64 rows: at 64 rows per block it is one
    // block of 4 warps per multiprocessor, latency-bound (13.6 instead of 17.0 µs at 64 rows; q_lat, with 8 column
    // blocks per head, went the other way, 17.0 → 20.1 µs: bench/NOTES.md 53)
    dim3 g = hm_grid;
    g.z = static_cast<unsigned>((d.dv + kHmCols - 1) / kHmCols);
    if (n_rows <= 64) {
      g.x = static_cast<unsigned>((n_rows + 15) / 16);
      launch_k(k_head_mm<false, true, 4, 16>, g, 128, 0, s, d, qcat, w_uvt, rows, n_rows, out, nullptr);
    } else {
      launch_k(k_head_mm<false, true, 4, kHmRows>, g, 128, 0, s, d, qcat, w_uvt, rows, n_rows, out, nullptr);
    }
    return;
  }
  const dim3 grid(rchunks, static_cast<unsigned>(d.nh), static_cast<unsigned>((d.dv + kCB - 1) / kCB));
  auto launch_uv = [&](auto kernel) {
    allow_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(rows16_smem(1024)));
    launch_k(kernel, grid, 256, rows16_smem(d.C), s, d, w_uvt, rows, n_rows, olat, out);
  };
  if (n_rows <= 4) launch_uv(k_uv16<4>);
  else launch_uv(k_uv16<16>);
}

size_t logits_top_scratch(int64_t R, int64_t V, int M) {
  const int64_t nch = cdiv(V, kTopChunk);
  return static_cast<size_t>(R * nch) * (M * (sizeof(float) + sizeof(int)) + sizeof(float) + sizeof(double)) + 64;
}
void logits_top(const float* lg, int64_t R, int64_t V, int M, float* max, double* log_sum, float* top_v, int32_t* top_i,
                void* scratch, cudaStream_t s) {
  if (R == 0) return;
  const int nch = static_cast<int>(cdiv(V, kTopChunk));
  auto* psum = static_cast<double*>(scratch);  // doubles first: aligned
  auto* cmax = reinterpret_cast<float*>(psum + R * nch);
  auto* cand_v = cmax + R * nch;
  auto* cand_i = reinterpret_cast<int*>(cand_v + R * nch * M);
  const dim3 grid(static_cast<unsigned>(nch), static_cast<unsigned>(R));
  launch_k(k_top, grid, kTopThreads, 0, s, lg, V, M, cand_v, cand_i, cmax, psum, split_counters(s, static_cast<size_t>(R)),
           max, log_sum, top_v, top_i);
}
void sample_rows(const float* lg, int64_t V, const int64_t* rows, const RowDrawD* draws, int n, double* scratch,
                 int32_t* tok, float* logit, cudaStream_t s) {
  if (n) launch_k(k_sample_rows, static_cast<unsigned>(n), 256, 0, s, lg, V, rows, draws, scratch, tok, logit);
}
void apply_row_ops(float* data, int64_t width, const int64_t* rows, const int* seg, int n_rows, const DRowOp* ops,
                   const float* vecs, cudaStream_t s) {
  if (n_rows) launch_k(k_row_ops, static_cast<unsigned>(n_rows), 256, 0, s, data, width, rows, seg, ops, vecs);
}

}  // namespace kscope::cuda
