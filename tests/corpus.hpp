// A deterministic corpus for tokenizer exactness: English and technical text, code, CJK, Han mixed with
// Latin, Cyrillic, Arabic, Devanagari, emoji with modifiers and ZWJ, numbers, whitespace runs, contractions in
// every case, special-token look-alikes, random Unicode.
#pragma once
#include <string>
#include <vector>

namespace kscope::test {

struct CorpusEntry {
  std::string text;
  std::string category;
  bool js_whitespace_differs = false;  // holds U+0085 or U+FEFF, where ECMAScript's \s and Unicode's disagree
};

std::vector<CorpusEntry> tokenizer_corpus(size_t target = 21000, unsigned seed = 20261123);

}  // namespace kscope::test
