// Pre-tokenizers written as scanners over code points (no regex engine on the hot path). Each reproduces a
// regex's find-all with leftmost-first alternation and the backtracking that pattern needs; text between
// matches becomes pieces too (HF's "Isolated" split).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kscope {

enum class PreTokenizer {
  o200k,        // tiktoken o200k_base
  cl100k,       // tiktoken cl100k_base
  kimi,         // Kimi-K2: o200k with Han split out ([\p{Han}]+ first, Han excluded from letter runs), [\r\n]* tail
  deepseek_v3,  // DeepSeek-V3 tokenizer.json: Split \p{N}{1,3}, Split CJK ranges, Split main regex (all Isolated)
};

const char* pretokenizer_name(PreTokenizer p);

struct Piece {
  uint32_t begin, end;  // code point indices
};

// Splits cps[0, n) into pieces covering it exactly, in order. `ws` is the property mask for \s
// (uni::kWs for Rust/Oniguruma semantics, the default; uni::kJsWs for ECMAScript).
void pretokenize(PreTokenizer p, const char32_t* cps, uint32_t n, std::vector<Piece>& out, uint16_t ws = 0);

}  // namespace kscope
