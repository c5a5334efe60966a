// How fast can one block per multiprocessor stream a cache through a cp.async ring? The decode attention kernel's
// load structure alone (k_mla_wg: 256 threads, 16-byte pieces, 8 rows x 64 bytes per warp instruction, tiles of T
// tokens x 1152 bytes, S stages, S - 1 tiles in flight), without its arithmetic, over B rows x L tokens of a bf16
// [tokens][576] cache split in blocks as the kernel splits it. Prints GB/s and the fraction of a device copy.
// Build and run on the device: nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a scripts/gpu/ring_probe.cu
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

__device__ __forceinline__ void cp16(void* s, const void* g) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(s))), "l"(g));
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

constexpr int CH = 72;  // 16-byte pieces per token (576 bf16)

template <int T, int S>
__global__ void __launch_bounds__(256, 1) k_ring(const uint8_t* cache, int tokens_per_block, int extra_smem, float* sink) {
  extern __shared__ __align__(128) uint8_t sm[];
  const uint8_t* base = cache + static_cast<int64_t>(blockIdx.x) * tokens_per_block * CH * 16;
  const int ntiles = tokens_per_block / T;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int RG = T / 8, STEP = 4 * (8 / RG);
  const int row = (warp % RG) * 8 + (lane & 7);
  auto load = [&](int buf, int tile) {
    uint8_t* dst = sm + extra_smem + buf * T * CH * 16;
    const uint8_t* src = base + static_cast<int64_t>(tile) * T * CH * 16 + row * CH * 16;
    for (int c = (warp / RG) * 4 + ((lane >> 3) & 3); c < CH; c += STEP) cp16(dst + (c * T + row) * 16, src + c * 16);
    commit();
  };
  for (int i = 0; i < S - 1; ++i) {
    if (i < ntiles) load(i, i);
    else commit();
  }
  float acc = 0;
  for (int it = 0; it < ntiles; ++it) {
    wait<S - 2>();
    __syncthreads();
    if (it + S - 1 < ntiles) load((it + S - 1) % S, it + S - 1);
    else commit();
    acc += reinterpret_cast<const float*>(sm + extra_smem + (it % S) * T * CH * 16)[threadIdx.x];
  }
  if (acc == 1234.5f) sink[0] = acc;
}

// The same tiles stored contiguously (36,864 bytes per 32 tokens: what a tile-ordered cache would give), each loaded
// by one thread with bulk copies (TMA, cp.async.bulk) that complete on an mbarrier per stage.
template <int T, int S>
__global__ void __launch_bounds__(256, 1) k_bulk(const uint8_t* cache, int tokens_per_block, int extra_smem, float* sink) {
  extern __shared__ __align__(128) uint8_t sm[];
  __shared__ __align__(8) uint64_t bar[S];
  constexpr int TILE = T * CH * 16, PIECES = 4, PB = TILE / PIECES;
  const uint8_t* base = cache + static_cast<int64_t>(blockIdx.x) * tokens_per_block * CH * 16;
  const int ntiles = tokens_per_block / T;
  if (threadIdx.x == 0)
    for (int i = 0; i < S; ++i)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(&bar[i]))));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  auto load = [&](int buf, int tile) {
    if (threadIdx.x != 0) return;
    const unsigned b = static_cast<unsigned>(__cvta_generic_to_shared(&bar[buf]));
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(TILE) : "memory");
    for (int p = 0; p < PIECES; ++p) {
      const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(sm + extra_smem + buf * TILE + p * PB));
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                   "l"(base + static_cast<int64_t>(tile) * TILE + p * PB), "r"(PB), "r"(b)
                   : "memory");
    }
  };
  for (int i = 0; i < S - 1 && i < ntiles; ++i) load(i, i);
  float acc = 0;
  for (int it = 0; it < ntiles; ++it) {
    const int buf = it % S;
    const unsigned b = static_cast<unsigned>(__cvta_generic_to_shared(&bar[buf]));
    const unsigned phase = (it / S) & 1;
    unsigned done = 0;
    while (!done)
      asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(done) : "r"(b), "r"(phase) : "memory");
    acc += reinterpret_cast<const float*>(sm + extra_smem + buf * TILE)[threadIdx.x];
    __syncthreads();  // everyone has read tile it before its buffer is loaded again
    if (it + S - 1 < ntiles) load((it + S - 1) % S, it + S - 1);
  }
  if (acc == 1234.5f) sink[0] = acc;
}

__global__ void k_copy(const float4* a, float4* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) b[i] = a[i];
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t bytes = int64_t(64) * 4096 * CH * 16;  // batch 64 x 4096 tokens: 302 MB
  uint8_t* cache;
  float* sink;
  cudaMalloc(&cache, bytes);
  cudaMalloc(&sink, 64);
  cudaMemset(cache, 0, bytes);
  float4* dst;
  cudaMalloc(&dst, bytes);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float ms;
  k_copy<<<sms * 8, 512>>>(reinterpret_cast<float4*>(cache), dst, bytes / 16);
  cudaEventRecord(e0);
  for (int i = 0; i < 5; ++i) k_copy<<<sms * 8, 512>>>(reinterpret_cast<float4*>(cache), dst, bytes / 16);
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  cudaEventElapsedTime(&ms, e0, e1);
  const double copy_bw = 2.0 * bytes * 5 / (ms * 1e-3);
  std::printf("device copy: %.0f GB/s (read + write)\n", copy_bw / 1e9);
  auto run = [&](auto kernel, int T, int S, int extra, int blocks, const char* name) {
    const int smem = extra + S * T * CH * 16;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
      std::printf("%-40s %3d blocks: %d bytes of shared memory refused\n", name, blocks, smem);
      cudaGetLastError();
      return;
    }
    const int tpb = static_cast<int>(bytes / (CH * 16) / blocks) / T * T;
    kernel<<<blocks, 256, smem>>>(cache, tpb, extra, sink);
    cudaEventRecord(e0);
    for (int i = 0; i < 5; ++i) kernel<<<blocks, 256, smem>>>(cache, tpb, extra, sink);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms, e0, e1);
    const double moved = double(blocks) * tpb * CH * 16 * 5;
    std::printf("%-40s %3d blocks, %6.1f KB smem: %5.0f GB/s (%3.0f%% of copy), %6.1f us per 302 MB\n", name, blocks,
                smem / 1024.0, moved / (ms * 1e-3) / 1e9, 100 * moved / (ms * 1e-3) / copy_bw, bytes / (moved / (ms * 1e-3)) * 1e6);
  };
  for (int blocks : {128, sms}) {
    run(k_ring<32, 3>, 32, 3, 73728 + 20480, blocks, "32 tokens x 3 stages (+Q, +S exchange)");
    run(k_ring<32, 3>, 32, 3, 0, blocks, "32 tokens x 3 stages");
    run(k_ring<32, 4>, 32, 4, 0, blocks, "32 tokens x 4 stages");
    run(k_ring<32, 5>, 32, 5, 0, blocks, "32 tokens x 5 stages");
    run(k_ring<32, 6>, 32, 6, 0, blocks, "32 tokens x 6 stages");
    run(k_ring<64, 2>, 64, 2, 73728, blocks, "64 tokens x 2 stages (+Q)");
    run(k_ring<64, 3>, 64, 3, 0, blocks, "64 tokens x 3 stages");
    run(k_bulk<32, 2>, 32, 2, 73728 + 20480, blocks, "bulk: 32 tokens x 2 stages (+Q, +S)");
    run(k_bulk<32, 3>, 32, 3, 73728 + 20480, blocks, "bulk: 32 tokens x 3 stages (+Q, +S)");
    run(k_bulk<32, 4>, 32, 4, 0, blocks, "bulk: 32 tokens x 4 stages");
    run(k_bulk<64, 2>, 64, 2, 73728, blocks, "bulk: 64 tokens x 2 stages (+Q)");
  }
  return 0;
}
