#include "util/numeric.hpp"


namespace kscope {

const std::array<float, 256>& fp8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = fp8_e4m3_to_f32(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

uint8_t f32_to_fp8_e4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate to the largest finite value
  // Codes 0..0x7e are increasing in value: binary search the first code >= a, then pick the nearer
  // neighbour, ties to the even code (even mantissa), as round-to-nearest-even does.
  const auto& t = fp8_e4m3_table();
  int lo = 0, hi = 0x7e;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (t[mid] < a) lo = mid + 1; else hi = mid;
  }
  int best = lo;
  if (lo > 0) {
    const float up = t[lo] - a, down = a - t[lo - 1];
    if (down < up || (down == up && ((lo - 1) & 1) == 0)) best = lo - 1;
  }
  return sign | static_cast<uint8_t>(best);
}

}  // namespace kscope
