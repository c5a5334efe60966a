// Probe of Hopper's warpgroup MMA (wgmma) as wrapped in src/backend/cuda/wgmma.cuh, before kernels depend on it:
//  1. which shared-memory descriptor fields (lbo/sbo) address the no-swizzle layouts, K-major and MN-major;
//  2. A from registers;
//  3. whether wgmma's fp32 result is bit for bit that of a chain of mma.sync m16n8k16 over the same k order (the
//     question batch invariance hangs on if the many-row matmul kernel moved to wgmma while decode stays on mma.sync);
//  4. the instruction's throughput from shared memory at the shapes attention would use.
// Build and run on the device: nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a scripts/gpu/wgmma_probe.cu
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../src/backend/cuda/wgmma.cuh"
#include "probe.cuh"

using bf16 = __nv_bfloat16;
using namespace kscope::cuda;


// byte offsets in the no-swizzle layouts
__device__ __host__ inline int off_kmajor(int r, int k, int rows) { return (k / 8) * (rows * 16) + r * 16 + (k % 8) * 2; }
__device__ __host__ inline int off_mnmajor(int k, int n, int K) { return (n / 8) * (K * 16) + k * 16 + (n % 8) * 2; }

__device__ inline uint32_t pack(bf16 lo, bf16 hi) {
  __nv_bfloat162 v(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// D[64][N] = A[64][K] · Bt[N][K]ᵀ with one warpgroup. TB: B K-major (0) or MN-major (1). RS: A from registers.
// aswap/bswap: exchange lbo and sbo in the descriptor (to find which is which).
template <int N, int TB, bool RS>
__global__ void __launch_bounds__(128) k_wg(const bf16* A, const bf16* Bt, int K, int aswap, int bswap, float* D) {
  extern __shared__ __align__(128) unsigned char sm[];
  unsigned char* as = sm;
  unsigned char* bs = sm + 64 * K * 2;
  for (int i = threadIdx.x; i < 64 * K; i += 128) {
    const int r = i / K, k = i % K;
    *reinterpret_cast<bf16*>(as + off_kmajor(r, k, 64)) = A[i];
  }
  for (int i = threadIdx.x; i < N * K; i += 128) {
    const int n = i / K, k = i % K;
    *reinterpret_cast<bf16*>(bs + (TB ? off_mnmajor(k, n, K) : off_kmajor(n, k, N))) = Bt[i];
  }
  wg::fence_smem();
  __syncthreads();
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t alb = 64 * 16, asb = 128;  // K-major A: next 8 k at 64 rows x 16 bytes, next 8 rows at 128 bytes
  if (aswap) { const uint32_t t_ = alb; alb = asb; asb = t_; }
  uint32_t blb = TB ? 128 : N * 16, bsb = TB ? K * 16 : 128;
  if (bswap) { const uint32_t t_ = blb; blb = bsb; bsb = t_; }
  wg::fence();
  for (int s = 0; s < K / 16; ++s) {
    const uint64_t db = wg::smem_desc(bs + (TB ? s * 256 : s * 2 * N * 16), blb, bsb);
    if constexpr (RS) {
      const bf16* a0 = A + (16 * warp + g) * K + 16 * s + 2 * t;
      const bf16* a1 = a0 + 8 * K;
      const uint32_t a[4] = {pack(a0[0], a0[1]), pack(a1[0], a1[1]), pack(a0[8], a0[9]), pack(a1[8], a1[9])};
      wg::mma_rs<N, TB>(d, a, db, 1);
    } else {
      const uint64_t da = wg::smem_desc(as + s * 2 * 64 * 16, alb, asb);
      wg::mma_ss<N, 0, TB>(d, da, db, 1);
    }
    wg::commit();
    wg::wait<0>();
    wg::fence();
  }
  for (int j = 0; j < N / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * warp + g + 8 * (e >> 1), c = 8 * j + 2 * t + (e & 1);
      D[r * N + c] = d[4 * j + e];
    }
}

// The same product as a chain of mma.sync m16n8k16 from zero over k-steps 0, 1, ...
__global__ void __launch_bounds__(128) k_mma(const bf16* A, const bf16* Bt, int K, int N, float* D) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < N / 8; ++j) {
    float c[4] = {0, 0, 0, 0};
    for (int s = 0; s < K / 16; ++s) {
      const bf16* a0 = A + (16 * warp + g) * K + 16 * s + 2 * t;
      const bf16* a1 = a0 + 8 * K;
      const bf16* b = Bt + (8 * j + g) * K + 16 * s + 2 * t;
      const uint32_t a[4] = {pack(a0[0], a0[1]), pack(a1[0], a1[1]), pack(a0[8], a0[9]), pack(a1[8], a1[9])};
      const uint32_t b0 = pack(b[0], b[1]), b1 = pack(b[8], b[9]);
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    for (int e = 0; e < 4; ++e) D[(16 * warp + g + 8 * (e >> 1)) * N + 8 * j + 2 * t + (e & 1)] = c[e];
  }
}

// Throughput: each warpgroup repeats 4 k-steps of m64nNk16 over operands resident in shared memory.
template <int N, bool RS, int WG>
__global__ void __launch_bounds__(128 * WG) k_rate(int iters, float* sink) {
  extern __shared__ __align__(128) unsigned char sm[];
  for (int i = threadIdx.x; i < (64 + N) * 64 * 2 / 4; i += blockDim.x) reinterpret_cast<uint32_t*>(sm)[i] = 0x3c003c00u * (i & 1);
  wg::fence_smem();
  __syncthreads();
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
  const uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};
  wg::fence();
  for (int it = 0; it < iters; ++it) {
    wg::fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint64_t db = wg::smem_desc(sm + 64 * 64 * 2 + s * 2 * N * 16, N * 16, 128);
      if constexpr (RS) wg::mma_rs<N, 0>(d, a, db, 1);
      else wg::mma_ss<N, 0, 0>(d, wg::smem_desc(sm + s * 2 * 64 * 16, 64 * 16, 128), db, 1);
    }
    wg::commit();
    wg::wait<1>();
  }
  wg::wait<0>();
  float acc = 0;
  for (int i = 0; i < N / 2; ++i) acc += d[i];
  if (acc == 12345.0f) sink[threadIdx.x] = acc;
}

static float bfr(float x) { return __bfloat162float(__float2bfloat16(x)); }

int main(int argc, char** argv) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-6, 6);
  const int K = 256, NMAX = 256;
  std::vector<bf16> hA(64 * K), hB(NMAX * K);
  std::vector<float> fA(64 * K), fB(NMAX * K);
  for (int i = 0; i < 64 * K; ++i) { fA[i] = bfr(std::ldexp(nd(rng), ex(rng))); hA[i] = __float2bfloat16(fA[i]); }
  for (int i = 0; i < NMAX * K; ++i) { fB[i] = bfr(std::ldexp(nd(rng), ex(rng))); hB[i] = __float2bfloat16(fB[i]); }
  bf16 *dA, *dB;
  float *dD, *dR;
  CK(cudaMalloc(&dA, hA.size() * 2));
  CK(cudaMalloc(&dB, hB.size() * 2));
  CK(cudaMalloc(&dD, 64 * NMAX * 4));
  CK(cudaMalloc(&dR, 64 * NMAX * 4));
  CK(cudaMemcpy(dA, hA.data(), hA.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dB, hB.data(), hB.size() * 2, cudaMemcpyHostToDevice));
  auto cpu_err = [&](int N, int k, const std::vector<float>& D) {  // max |D - exact| / Σ|a·b| per element
    double worst = 0;
    for (int r = 0; r < 64; ++r)
      for (int n = 0; n < N; ++n) {
        double s = 0, m = 0;
        for (int i = 0; i < k; ++i) {
          s += double(fA[r * K + i]) * fB[n * K + i];
          m += std::fabs(double(fA[r * K + i]) * fB[n * K + i]);
        }
        worst = std::max(worst, std::fabs(D[r * N + n] - s) / (m + 1e-30));
      }
    return worst;
  };
  // A and B are given to the kernels with row stride K; the layout probes use the first k columns only by
  // passing k as the row length, so copy contiguous [rows][k] slices for them.
  auto slice = [&](const std::vector<bf16>& src, int rows, int k) {
    std::vector<bf16> out(rows * k);
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < k; ++i) out[r * k + i] = src[r * K + i];
    return out;
  };
  auto run = [&](auto kernel, int N, int k, int aswap, int bswap, std::vector<float>& D) {
    const auto a = slice(hA, 64, k), b = slice(hB, N, k);
    bf16 *ta, *tb;
    CK(cudaMalloc(&ta, a.size() * 2));
    CK(cudaMalloc(&tb, b.size() * 2));
    CK(cudaMemcpy(ta, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(tb, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    const int smem = (64 + N) * k * 2;
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    CK(cudaMemset(dD, 0, 64 * NMAX * 4));
    kernel<<<1, 128, smem>>>(ta, tb, k, aswap, bswap, dD);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    D.resize(64 * N);
    CK(cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost));
    if (N == 32 || N == 256) {  // the mma.sync chain on the same slices
      k_mma<<<1, 128>>>(ta, tb, k, N, dR);
      CK(cudaDeviceSynchronize());
    }
    cudaFree(ta);
    cudaFree(tb);
  };
  auto bits = [&](int N, const std::vector<float>& D) {
    std::vector<float> R(64 * N);
    CK(cudaMemcpy(R.data(), dR, R.size() * 4, cudaMemcpyDeviceToHost));
    int diff = 0;
    double worst = 0;
    for (int i = 0; i < 64 * N; ++i)
      if (std::memcmp(&R[i], &D[i], 4) != 0) {
        ++diff;
        worst = std::max(worst, double(std::fabs(R[i] - D[i]) / (std::fabs(R[i]) + 1e-30)));
      }
    std::printf("      vs mma.sync m16n8k16 chain: %d of %d elements differ in bits (max rel diff %.3g)\n", diff, 64 * N, worst);
  };
  std::vector<float> D;
  const std::string part = argc > 1 ? argv[1] : "";
  // A wrong lbo/sbo guess can address past the tile and kill the context, so each guess runs in its own process.
  if (part == "1") {
    const int as = std::atoi(argv[2]), bs = std::atoi(argv[3]);
    run(k_wg<32, 0, false>, 32, 64, as, bs, D);
    std::printf("   m64n32k16, A and B K-major, A %s, B %s: error %.3g\n", as ? "lbo=M-dir" : "lbo=K-dir",
                bs ? "lbo=N-dir" : "lbo=K-dir", cpu_err(32, 64, D));
    return 0;
  }
  if (part == "2") {
    const int bs = std::atoi(argv[2]);
    run(k_wg<256, 1, false>, 256, 64, 0, bs, D);
    std::printf("   m64n256k16, B MN-major %s: error %.3g\n", bs ? "lbo=N-dir" : "lbo=K-dir", cpu_err(256, 64, D));
    run(k_wg<256, 1, true>, 256, 64, 0, bs, D);
    std::printf("   m64n256k16, A from registers, B MN-major %s: error %.3g\n", bs ? "lbo=N-dir" : "lbo=K-dir",
                cpu_err(256, 64, D));
    return 0;
  }
  std::printf("== 3. A from registers, B K-major (m64n32k16, K = 64)\n");
  run(k_wg<32, 0, true>, 32, 64, 0, 0, D);
  std::printf("   error %.3g\n", cpu_err(32, 64, D));
  std::printf("== 4. bits against mma.sync, K = 256 (16 k-steps), inputs spanning 2^-6..2^6\n");
  run(k_wg<32, 0, false>, 32, K, 0, 0, D);
  std::printf("   m64n32k16 SS, error %.3g\n", cpu_err(32, K, D));
  bits(32, D);
  run(k_wg<256, 0, false>, 256, K, 0, 0, D);
  std::printf("   m64n256k16 SS B K-major, error %.3g\n", cpu_err(256, K, D));
  bits(256, D);
  run(k_wg<256, 1, true>, 256, K, 0, 0, D);
  std::printf("   m64n256k16 RS B MN-major, error %.3g\n", cpu_err(256, K, D));
  bits(256, D);

  std::printf("== 5. throughput, operands resident in shared memory, 4 k-steps per commit (TFLOP/s)\n");
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  float* sink;
  CK(cudaMalloc(&sink, 4096));
  auto rate = [&](auto kernel, int N, int wgs, const char* name) {
    const int smem = (64 + N) * 64 * 2, iters = 4000;
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    for (int blocks_per_sm : {1, 2}) {
      cudaEvent_t e0, e1;
      cudaEventCreate(&e0);
      cudaEventCreate(&e1);
      kernel<<<sms * blocks_per_sm, 128 * wgs, smem>>>(10, sink);
      cudaEventRecord(e0);
      kernel<<<sms * blocks_per_sm, 128 * wgs, smem>>>(iters, sink);
      cudaEventRecord(e1);
      CK(cudaEventSynchronize(e1));
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      const double fl = double(sms) * blocks_per_sm * wgs * iters * 4 * 64.0 * N * 16 * 2;
      std::printf("   %-28s %d block(s)/SM: %.0f\n", name, blocks_per_sm, fl / (ms * 1e-3) / 1e12);
    }
  };
  rate(k_rate<256, false, 1>, 256, 1, "m64n256k16 SS, 1 WG/block");
  rate(k_rate<256, false, 2>, 256, 2, "m64n256k16 SS, 2 WG/block");
  rate(k_rate<256, true, 2>, 256, 2, "m64n256k16 RS, 2 WG/block");
  rate(k_rate<64, false, 2>, 64, 2, "m64n64k16 SS, 2 WG/block");
  rate(k_rate<32, false, 2>, 32, 2, "m64n32k16 SS, 2 WG/block");
  rate(k_rate<32, true, 2>, 32, 2, "m64n32k16 RS, 2 WG/block");
  return 0;
}
