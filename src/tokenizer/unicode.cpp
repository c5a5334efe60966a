#include "tokenizer/unicode.hpp"

#include <unicode/uchar.h>
#include <unicode/uscript.h>

#include <mutex>

namespace kscope::uni {

namespace {
constexpr char32_t kMax = 0x110000;

const std::vector<uint16_t>& table() {
  static const std::vector<uint16_t> t = [] {
    std::vector<uint16_t> v(kMax, 0);
    for (char32_t c = 0; c < kMax; ++c) {
      uint16_t f = 0;
      switch (u_charType(c)) {
        case U_UPPERCASE_LETTER: f |= kLu; break;
        case U_LOWERCASE_LETTER: f |= kLl; break;
        case U_TITLECASE_LETTER: f |= kLt; break;
        case U_MODIFIER_LETTER: f |= kLm; break;
        case U_OTHER_LETTER: f |= kLo; break;
        case U_NON_SPACING_MARK: case U_ENCLOSING_MARK: case U_COMBINING_SPACING_MARK: f |= kM; break;
        case U_DECIMAL_DIGIT_NUMBER: case U_LETTER_NUMBER: case U_OTHER_NUMBER: f |= kN; break;
        case U_CONNECTOR_PUNCTUATION: case U_DASH_PUNCTUATION: case U_START_PUNCTUATION: case U_END_PUNCTUATION:
        case U_INITIAL_PUNCTUATION: case U_FINAL_PUNCTUATION: case U_OTHER_PUNCTUATION: f |= kP; break;
        case U_MATH_SYMBOL: case U_CURRENCY_SYMBOL: case U_MODIFIER_SYMBOL: case U_OTHER_SYMBOL: f |= kS; break;
        default: break;
      }
      if (u_hasBinaryProperty(c, UCHAR_WHITE_SPACE)) f |= kWs;
      UErrorCode err = U_ZERO_ERROR;
      if (uscript_getScript(c, &err) == USCRIPT_HAN && U_SUCCESS(err)) f |= kHan;
      v[c] = f;
    }
    // ECMAScript \s: WhiteSpace (TAB VT FF SP NBSP ZWNBSP + Zs) and LineTerminator (LF CR LS PS)
    for (char32_t c : {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0xA0, 0xFEFF, 0x2028, 0x2029}) v[c] |= kJsWs;
    for (char32_t c = 0; c < kMax; ++c)
      if (u_charType(c) == U_SPACE_SEPARATOR) v[c] |= kJsWs;
    return v;
  }();
  return t;
}
}  // namespace

uint16_t props(char32_t cp) { return cp < kMax ? table()[cp] : 0; }

void decode_utf8(std::string_view s, std::vector<char32_t>& cps, std::vector<uint32_t>& offsets, size_t* replaced) {
  cps.clear();
  offsets.clear();
  size_t bad = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    offsets.push_back(static_cast<uint32_t>(i));
    const unsigned char c = p[i];
    if (c < 0x80) {
      cps.push_back(c);
      ++i;
      continue;
    }
    int len;
    char32_t cp;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else { cps.push_back(0xFFFD); ++bad; ++i; continue; }
    size_t j = 1;
    for (; j < static_cast<size_t>(len); ++j) {
      if (i + j >= n) break;
      const unsigned char b = p[i + j];
      if (j == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) break;
      cp = (cp << 6) | (b & 0x3F);
    }
    if (j == static_cast<size_t>(len)) {
      cps.push_back(cp);
      i += len;
    } else {  // maximal subpart replaced by one U+FFFD
      cps.push_back(0xFFFD);
      ++bad;
      i += j;
    }
  }
  offsets.push_back(static_cast<uint32_t>(n));
  if (replaced) *replaced = bad;
}

bool valid_utf8(std::string_view s) {
  std::vector<char32_t> c;
  std::vector<uint32_t> o;
  size_t bad = 0;
  decode_utf8(s, c, o, &bad);
  return bad == 0;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) out.push_back(static_cast<char>(cp));
  else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t complete_utf8_prefix(std::string_view s) {
  // Walk back over at most 3 trailing bytes to see if the last sequence is cut short.
  const size_t n = s.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    size_t need = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return back < need ? n - back : n;
  }
  return n;
}

}  // namespace kscope::uni
