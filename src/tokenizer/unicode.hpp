// UTF-8 and the Unicode properties the pre-tokenizers need, from ICU (one table, built once).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kscope::uni {

// Property bits of one code point.
enum : uint16_t {
  kLu = 1 << 0, kLl = 1 << 1, kLt = 1 << 2, kLm = 1 << 3, kLo = 1 << 4,
  kM = 1 << 5,   // Mn | Mc | Me
  kN = 1 << 6,   // Nd | Nl | No
  kP = 1 << 7,   // Pc | Pd | Ps | Pe | Pi | Pf | Po
  kS = 1 << 8,   // Sm | Sc | Sk | So
  kWs = 1 << 9,  // Unicode White_Space (regex \s in Rust, Python, Oniguruma)
  kJsWs = 1 << 10,  // ECMAScript \s (WhiteSpace + LineTerminator: adds U+FEFF, lacks U+0085)
  kHan = 1 << 11,   // Script=Han
  kL = kLu | kLl | kLt | kLm | kLo,
};

// Properties of code point cp (0 for values past U+10FFFF).
uint16_t props(char32_t cp);

// Decodes UTF-8 into code points with the byte offset of each (offsets.size() == cps.size() + 1).
// Invalid sequences decode as U+FFFD per maximal subpart, as WHATWG/ICU do; `replaced` counts them.
void decode_utf8(std::string_view s, std::vector<char32_t>& cps, std::vector<uint32_t>& offsets, size_t* replaced = nullptr);
bool valid_utf8(std::string_view s);
void append_utf8(std::string& out, char32_t cp);
// Length of the longest prefix of s that is complete UTF-8 (for streaming decode).
size_t complete_utf8_prefix(std::string_view s);

}  // namespace kscope::uni
