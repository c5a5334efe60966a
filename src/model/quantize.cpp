#include "model/quantize.hpp"

#include <algorithm>
#include <cmath>

#include "util/numeric.hpp"

namespace kscope {

void quantize_fp8_block(const float* w, int64_t out, int64_t in, int bo, int bi, std::vector<uint8_t>& q,
                        std::vector<float>& scale_inv) {
  const int64_t nbo = (out + bo - 1) / bo, nbi = (in + bi - 1) / bi;
  q.resize(out * in);
  scale_inv.resize(nbo * nbi);
  for (int64_t b0 = 0; b0 < nbo; ++b0)
    for (int64_t b1 = 0; b1 < nbi; ++b1) {
      const int64_t r1 = std::min(out, (b0 + 1) * bo), c1 = std::min(in, (b1 + 1) * bi);
      float amax = 0;
      for (int64_t r = b0 * bo; r < r1; ++r)
        for (int64_t c = b1 * bi; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * in + c]));
      const float s = std::max(amax, 1e-12f) / 448.0f;
      scale_inv[b0 * nbi + b1] = s;
      for (int64_t r = b0 * bo; r < r1; ++r)
        for (int64_t c = b1 * bi; c < c1; ++c) q[r * in + c] = f32_to_fp8_e4m3(w[r * in + c] / s);
    }
}

void quantize_int4_group(const float* w, int64_t out, int64_t in, int group, std::vector<int32_t>& packed,
                         std::vector<uint16_t>& scale_bf16) {
  const int64_t ng = (in + group - 1) / group, ncols = (in + 7) / 8;
  packed.assign(out * ncols, 0);
  scale_bf16.resize(out * ng);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * group, c1 = std::min(in, c0 + group);
      float amax = 0;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * in + c]));
      const uint16_t sb = f32_to_bf16(std::max(amax / 7.5f, 1e-8f));
      scale_bf16[r * ng + g] = sb;
      const float s = bf16_to_f32(sb);
      for (int64_t c = c0; c < c1; ++c) {
        const float qf = std::clamp(std::nearbyint(w[r * in + c] / s), -8.0f, 7.0f);
        const uint32_t nib = static_cast<uint32_t>(static_cast<int>(qf) + 8);
        auto& word = reinterpret_cast<uint32_t&>(packed[r * ncols + c / 8]);
        word |= nib << (4 * (c % 8));
      }
    }
}

}  // namespace kscope
