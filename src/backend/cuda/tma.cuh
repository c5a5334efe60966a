// Hopper tensor copies (TMA: cp.async.bulk.tensor) into shared memory, the mbarriers they complete on, and the
// wgmma descriptors of operands they leave in 128-byte-swizzled slabs (rows of 64 bf16, 16-byte chunks XOR-ed by the
// row index mod 8). Checked on the device by scripts/gpu/tma_probe.sh (bench/NOTES.md 34).
#pragma once
#include <cuda.h>

#include <cstdint>

#include "backend/cuda/wgmma.cuh"

namespace kscope::cuda::tma {

__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
// The first 1024-byte-aligned address (in the shared window) at or after p: swizzled slabs need it.
__device__ __forceinline__ unsigned char* align1024(unsigned char* p) { return p + ((1024 - (smem_u32(p) & 1023)) & 1023); }
// An mbarrier for `count` arrivals a phase (by default one: the thread that issues the copies and announces their
// bytes).
__device__ __forceinline__ void bar_init(uint64_t* b, int count = 1) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
// After the initializing thread's bar_init calls, before the block's barrier that publishes them.
__device__ __forceinline__ void bar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Arrive on b, expecting `bytes` of copies to complete the phase.
__device__ __forceinline__ void expect(uint64_t* b, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
// Wait until b's phase `phase` (0, 1, 0, ...) has completed.
__device__ __forceinline__ void wait(uint64_t* b, unsigned phase) {
  unsigned done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(smem_u32(b)), "r"(phase)
                 : "memory");
}
// The box of a 2-D tensor map at (x = column, y = row) into shared memory, completing on mbarrier b. Rows and
// columns past the tensor's extent arrive as zeros.
__device__ __forceinline__ void load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* b) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
                   smem_u32(dst)),
               "l"(map), "r"(x), "r"(y), "r"(smem_u32(b))
               : "memory");
}
// wgmma descriptor of a 128-byte-swizzled operand: K-major (rows of 64 k; lbo unused, sbo = bytes per 8 rows; a
// k-step of 16 advances the start by 32 bytes) or MN-major (lbo = bytes per 64-element slab along M/N, sbo = bytes
// per 8 k-rows).
__device__ __forceinline__ uint64_t sw128_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  return wg::smem_desc(p, lbo, sbo) | (uint64_t(1) << 62);
}

}  // namespace kscope::cuda::tma
