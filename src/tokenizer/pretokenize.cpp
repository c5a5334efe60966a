#include "tokenizer/pretokenize.hpp"

#include "tokenizer/unicode.hpp"

namespace kscope {

using namespace uni;

const char* pretokenizer_name(PreTokenizer p) {
  switch (p) {
    case PreTokenizer::o200k: return "o200k";
    case PreTokenizer::cl100k: return "cl100k";
    case PreTokenizer::kimi: return "kimi";
    case PreTokenizer::deepseek_v3: return "deepseek_v3";
  }
  return "?";
}

namespace {

constexpr uint32_t kFail = UINT32_MAX;

struct Scanner {
  const char32_t* c;
  uint32_t n;
  uint16_t ws;
  bool no_han;  // Kimi: letter classes exclude Han

  uint16_t pr(uint32_t i) const { return props(c[i]); }
  bool is_ws(uint32_t i) const { return pr(i) & ws; }
  bool is_nl(uint32_t i) const { return c[i] == '\r' || c[i] == '\n'; }
  bool is(uint32_t i, uint16_t mask) const {
    const uint16_t p = pr(i);
    return (p & mask) && !(no_han && (p & kHan));
  }
  // [^\r\n\p{L}\p{N}]
  bool lead(uint32_t i) const { return !is_nl(i) && !(pr(i) & (kL | kN)); }

  uint32_t run(uint32_t i, uint16_t mask) const {
    while (i < n && is(i, mask)) ++i;
    return i;
  }
  uint32_t ws_run(uint32_t i) const {
    while (i < n && is_ws(i)) ++i;
    return i;
  }

  // (?i:'s|'t|'re|'ve|'m|'ll|'d)? at i; Rust's case folding also maps U+017F (long s) to s.
  uint32_t contraction(uint32_t i) const {
    if (i + 1 >= n || c[i] != '\'') return i;
    auto eq = [&](uint32_t k, char lower) {
      const char32_t ch = c[k];
      if (lower == 's' && ch == 0x17F) return true;
      return ch == static_cast<char32_t>(lower) || ch == static_cast<char32_t>(lower - 32);
    };
    if (eq(i + 1, 's') || eq(i + 1, 't') || eq(i + 1, 'm') || eq(i + 1, 'd')) return i + 2;
    if (i + 2 < n && ((eq(i + 1, 'r') && eq(i + 2, 'e')) || (eq(i + 1, 'v') && eq(i + 2, 'e')) || (eq(i + 1, 'l') && eq(i + 2, 'l'))))
      return i + 3;
    return i;
  }

  // Tries `rest` after an optional [^\r\n\p{L}\p{N}] at i, first with it (greedy), then without.
  template <typename Rest>
  uint32_t with_optional_lead(uint32_t i, Rest rest) const {
    if (i < n && lead(i))
      if (const uint32_t e = rest(i + 1); e != kFail) return e;
    return rest(i);
  }
  // [^\r\n\p{L}\p{N}]?[UP]*[LO]+(contraction)?
  uint32_t letters_lower_tail(uint32_t i, uint16_t up, uint16_t lo) const {
    return with_optional_lead(i, [&](uint32_t s) -> uint32_t {
      const uint32_t a = run(s, up);
      for (uint32_t k = a + 1; k-- > s;)  // backtrack the greedy [UP]* until [LO]+ can start
        if (k < n && is(k, lo)) return contraction(run(k, lo));
      return kFail;
    });
  }
  // [^\r\n\p{L}\p{N}]?[UP]+[LO]*(contraction)?
  uint32_t letters_upper_head(uint32_t i, uint16_t up, uint16_t lo) const {
    return with_optional_lead(i, [&](uint32_t s) -> uint32_t {
      const uint32_t a = run(s, up);
      return a > s ? contraction(run(a, lo)) : kFail;
    });
  }
  // \p{N}{1,3}
  uint32_t digits(uint32_t i) const {
    uint32_t e = i;
    while (e < n && e - i < 3 && (pr(e) & kN)) ++e;
    return e > i ? e : kFail;
  }
  // ' '?[^\s\p{L}\p{N}]+ then [\r\n]* (or [\r\n/]* for o200k)
  uint32_t punct(uint32_t i, bool slash) const {
    for (int opt = 1; opt >= 0; --opt) {
      uint32_t s = i;
      if (opt) {
        if (s < n && c[s] == ' ') ++s;
        else continue;
      }
      uint32_t e = s;
      while (e < n && !is_ws(e) && !(pr(e) & (kL | kN))) ++e;
      if (e == s) continue;
      while (e < n && (is_nl(e) || (slash && c[e] == '/'))) ++e;
      return e;
    }
    return kFail;
  }
  // \s*[\r\n]+
  uint32_t ws_newlines(uint32_t i) const {
    const uint32_t w = ws_run(i);
    for (uint32_t k = w; k-- > i;)
      if (is_nl(k)) return k + 1;
    return kFail;
  }
  // \s+(?!\S)
  uint32_t ws_not_before_text(uint32_t i) const {
    const uint32_t w = ws_run(i);
    if (w == i) return kFail;
    if (w == n) return w;
    return w - 1 > i ? w - 1 : kFail;
  }
  // \s+
  uint32_t ws_any(uint32_t i) const {
    const uint32_t w = ws_run(i);
    return w > i ? w : kFail;
  }
};

template <typename MatchAt>
void find_all(uint32_t begin, uint32_t end, MatchAt match_at, std::vector<Piece>& out) {
  uint32_t last = begin, pos = begin;
  while (pos < end) {
    const uint32_t e = match_at(pos);
    if (e == kFail || e == pos) {
      ++pos;
      continue;
    }
    if (pos > last) out.push_back({last, pos});
    out.push_back({pos, e});
    pos = last = e;
  }
  if (last < end) out.push_back({last, end});
}

void tiktoken_style(const Scanner& sc, PreTokenizer p, std::vector<Piece>& out) {
  const bool kimi = p == PreTokenizer::kimi;
  const uint16_t up = kLu | kLt | kLm | kLo | kM, lo = kLl | kLm | kLo | kM;
  find_all(0, sc.n, [&](uint32_t i) -> uint32_t {
    uint32_t e;
    if (p == PreTokenizer::cl100k) {
      if ((e = sc.contraction(i)) != i) return e;
      // [^\r\n\p{L}\p{N}]?\p{L}+
      for (int opt = 1; opt >= 0; --opt) {
        uint32_t s = i;
        if (opt) {
          if (sc.lead(s)) ++s;
          else continue;
        }
        const uint32_t a = sc.run(s, kL);
        if (a > s) return a;
      }
    } else {
      if (kimi && (sc.pr(i) & kHan)) {  // [\p{Han}]+
        e = i;
        while (e < sc.n && (sc.pr(e) & kHan)) ++e;
        return e;
      }
      if ((e = sc.letters_lower_tail(i, up, lo)) != kFail) return e;
      if ((e = sc.letters_upper_head(i, up, lo)) != kFail) return e;
    }
    if ((e = sc.digits(i)) != kFail) return e;
    if ((e = sc.punct(i, p == PreTokenizer::o200k)) != kFail) return e;
    if ((e = sc.ws_newlines(i)) != kFail) return e;
    if ((e = sc.ws_not_before_text(i)) != kFail) return e;
    return sc.ws_any(i);
  }, out);
}

bool deepseek_cjk(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x3040 && c <= 0x309F) || (c >= 0x30A0 && c <= 0x30FF);
}
bool ascii_punct(char32_t c) {
  return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') || (c >= '{' && c <= '~');
}
bool ascii_alpha(char32_t c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

void deepseek(const Scanner& sc, std::vector<Piece>& out) {
  std::vector<Piece> s1, s2;
  // 1. \p{N}{1,3}
  find_all(0, sc.n, [&](uint32_t i) { return sc.digits(i); }, s1);
  // 2. [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+
  for (const Piece& p : s1)
    find_all(p.begin, p.end, [&](uint32_t i) -> uint32_t {
      uint32_t e = i;
      while (e < p.end && deepseek_cjk(sc.c[e])) ++e;
      return e > i ? e : kFail;
    }, s2);
  // 3. the main regex, within each piece (a match never crosses a piece boundary)
  for (const Piece& p : s2) {
    Scanner s = sc;
    s.n = p.end;
    find_all(p.begin, p.end, [&](uint32_t i) -> uint32_t {
      const char32_t* c = s.c;
      // [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+
      if (ascii_punct(c[i]) && i + 1 < s.n && ascii_alpha(c[i + 1])) {
        uint32_t e = i + 1;
        while (e < s.n && ascii_alpha(c[e])) ++e;
        return e;
      }
      // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
      for (int opt = 1; opt >= 0; --opt) {
        uint32_t b = i;
        if (opt) {
          if (!s.is_nl(b) && !(s.pr(b) & (kL | kP | kS))) ++b;
          else continue;
        }
        const uint32_t e = s.run(b, kL | kM);
        if (e > b) return e;
      }
      // ' '?[\p{P}\p{S}]+[\r\n]*
      for (int opt = 1; opt >= 0; --opt) {
        uint32_t b = i;
        if (opt) {
          if (c[b] == ' ') ++b;
          else continue;
        }
        uint32_t e = b;
        while (e < s.n && (s.pr(e) & (kP | kS))) ++e;
        if (e == b) continue;
        while (e < s.n && s.is_nl(e)) ++e;
        return e;
      }
      uint32_t e;
      if ((e = s.ws_newlines(i)) != kFail) return e;
      if ((e = s.ws_not_before_text(i)) != kFail) return e;
      return s.ws_any(i);
    }, out);
  }
}

}  // namespace

void pretokenize(PreTokenizer p, const char32_t* cps, uint32_t n, std::vector<Piece>& out, uint16_t ws) {
  out.clear();
  Scanner sc{cps, n, ws ? ws : static_cast<uint16_t>(kWs), p == PreTokenizer::kimi};
  if (p == PreTokenizer::deepseek_v3) deepseek(sc, out);
  else tiktoken_style(sc, p, out);
}

}  // namespace kscope
