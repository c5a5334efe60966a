// Quantizers into the stored formats the loader reads (make-model now, `kscope quantize` later).
#pragma once
#include <cstdint>
#include <vector>

namespace kscope {

// DeepSeek-V3 FP8: per [bo, bi] block s = amax / 448, q = e4m3(w / s); stores q and weight_scale_inv = s (fp32).
void quantize_fp8_block(const float* w, int64_t out, int64_t in, int bo, int bi, std::vector<uint8_t>& q,
                        std::vector<float>& scale_inv);

// compressed-tensors pack-quantized int4, symmetric, groups of `group` along the input dim:
// s = bf16(amax / 7.5), q = clamp(round(w / s), -8, 7), stored as q + 8 nibbles, 8 per int32, element i in bits 4i.
void quantize_int4_group(const float* w, int64_t out, int64_t in, int group, std::vector<int32_t>& packed,
                         std::vector<uint16_t>& scale_bf16);

}  // namespace kscope
