#include "corpus.hpp"

#include <unicode/uchar.h>

#include <random>

#include "tokenizer/unicode.hpp"

namespace kscope::test {

namespace {

struct Gen {
  std::mt19937 rng;
  int uni(int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); }
  template <typename T>
  const T& pick(const std::vector<T>& v) { return v[uni(0, static_cast<int>(v.size()) - 1)]; }
  std::string cp(char32_t c) {
    std::string s;
    uni::append_utf8(s, c);
    return s;
  }
  std::string range(char32_t a, char32_t b, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += cp(static_cast<char32_t>(uni(a, b)));
    return s;
  }
};

const std::vector<std::string> kWords = {
    "the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with",
    "his", "they", "I", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what",
    "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how",
    "their", "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her",
    "would", "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number",
    "no", "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now",
    "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "Transformer", "attention", "MoE",
    "expert", "routing", "gradient", "steering", "vector", "residual", "stream", "Kimi", "DeepSeek", "tokenizer",
    "interpretability", "activation", "McDonald", "iPhone", "NASA", "HTTP", "JSON", "naïve", "café", "résumé",
    "Zürich", "straße", "coöperate", "façade", "piñata", "señor", "Ångström", "œuvre", "fiancée", "déjà"};
const std::vector<std::string> kPunct = {",", ".", "!", "?", ";", ":", " -", " —", "...", "'", "\"", "(", ")", "[", "]", "/", "&", "%", "$", "#", "@", "*"};
const std::vector<std::string> kCode = {
    "int main(int argc, char** argv) {\n  return 0;\n}\n",
    "def f(x):\n    return x ** 2 + 1  # square\n",
    "for (size_t i = 0; i < n; ++i) y[i] += a * x[i];",
    "{\"model_type\": \"kimi_k2\", \"hidden_size\": 7168, \"rope_scaling\": {\"factor\": 32.0}}",
    "https://example.org/path/to/file.safetensors?rev=main#L10",
    "/usr/local/cuda/bin/nvcc -gencode=arch=compute_90a,code=sm_90a -O3 kernel.cu",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
    "if (a && b || !c) { x <<= 2; y >>= 1; z ^= 0xFF; }",
    "const f = async (x) => { await fetch(`/api/${x}`); };",
    "$ git commit -m 'fix: off-by-one in rope' && git push origin main",
    "E = mc^2; ∫_0^∞ e^{-x²} dx = √π/2; ∑_{i=1}^{n} i = n(n+1)/2",
    "<div class=\"row\"><span>Hello</span></div>",
    "\tfn main() {\n\t\tprintln!(\"{:?}\", v);\n\t}\n",
    "std::vector<std::pair<int, float>> v{{1, 2.5f}, {3, -0.125f}};",
    "x_{t+1} = x_t - η ∇L(x_t)   // SGD",
    "#include <cstdio>\r\n#define N 1024\r\n",
};
const std::vector<std::string> kSpecials = {
    "<|endoftext|>", "<|endofprompt|>", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
    "<|im_middle|>", "[BOS]", "[EOS]", "[EOT]", "<think>", "</think>", "<|reserved_token_163840|>",
    "<|reserved_token_200100|>", "<|tool_call_begin|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
    "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜fim▁hole｜>", "<|im_end", "im_end|>", "<|endoftext",
    "<||>", "<|", "|>", "<｜", "｜>", "<| im_end |>", "<|IM_END|>", "<｜place▁holder▁no▁7｜>"};
const std::vector<std::string> kContractions = {"'s", "'S", "'t", "'T", "'re", "'Re", "'rE", "'RE", "'ve", "'VE", "'Ve",
                                                "'m", "'M", "'ll", "'LL", "'lL", "'Ll", "'d", "'D", "'ſ", "'x", "'",
                                                "’s", "'ll've", "''s"};

std::string sentence(Gen& g, int words) {
  std::string s;
  for (int i = 0; i < words; ++i) {
    std::string w = g.pick(kWords);
    const int r = g.uni(0, 19);
    if (r == 0) w[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(w[0])));
    if (r == 1)
      for (auto& c : w) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    s += (i ? " " : "") + w;
    if (g.uni(0, 6) == 0) s += g.pick(kPunct);
  }
  return s + (g.uni(0, 1) ? "." : "");
}

char32_t random_assigned(Gen& g) {
  for (;;) {
    const int plane = g.uni(0, 9);
    char32_t c = plane < 6 ? g.uni(0x20, 0xFFFF) : plane < 8 ? g.uni(0x10000, 0x1FFFF) : g.uni(0x20000, 0x3134F);
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    if (u_charType(c) == U_UNASSIGNED) continue;
    UVersionInfo age;
    u_charAge(c, age);
    if (age[0] > 14) continue;  // the references' Unicode versions (15.x, 16) agree on everything up to 14.0
    if (c == 0x85 || c == 0xFEFF) continue;
    return c;
  }
}

}  // namespace

std::vector<CorpusEntry> tokenizer_corpus(size_t target, unsigned seed) {
  Gen g{std::mt19937(seed)};
  std::vector<CorpusEntry> out;
  auto add = [&](std::string s, const char* cat, bool jsws = false) { out.push_back({std::move(s), cat, jsws}); };
  const size_t per = target / 12 + 1;
  for (size_t i = 0; i < per; ++i) add(sentence(g, g.uni(1, 40)), "english");
  for (size_t i = 0; i < per; ++i) {
    std::string s = g.pick(kCode);
    if (g.uni(0, 1)) s += g.pick(kCode);
    if (g.uni(0, 2) == 0) s = std::string(g.uni(1, 8), ' ') + s;
    add(s + std::to_string(i), "code");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 6);
    for (int k = 0; k < n; ++k) {
      switch (g.uni(0, 5)) {
        case 0: s += g.range(0x4E00, 0x9FA5, g.uni(1, 12)); break;   // CJK unified
        case 1: s += g.range(0x3041, 0x3096, g.uni(1, 8)); break;    // hiragana
        case 2: s += g.range(0x30A1, 0x30FA, g.uni(1, 8)); break;    // katakana
        case 3: s += g.range(0xAC00, 0xD7A3, g.uni(1, 6)); break;    // hangul
        case 4: s += g.pick(std::vector<std::string>{"，", "。", "、", "「", "」", "！", "？", "：", "（", "）"}); break;
        case 5: s += g.range(0x3400, 0x4DB5, g.uni(1, 3)); break;    // extension A (Han, outside DeepSeek's range)
      }
    }
    add(s, "cjk");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(2, 8);
    for (int k = 0; k < n; ++k) {
      const int r = g.uni(0, 4);
      if (r == 0) s += g.range(0x4E00, 0x9FA5, g.uni(1, 5));
      else if (r == 1) s += g.pick(kWords);
      else if (r == 2) s += std::to_string(g.uni(0, 99999));
      else if (r == 3) s += " ";
      else s += g.pick(kPunct);
    }
    add(s, "han+latin");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 8);
    for (int k = 0; k < n; ++k) {
      switch (g.uni(0, 7)) {
        case 0: s += g.range(0x0410, 0x044F, g.uni(2, 10)); break;  // Cyrillic
        case 1: s += g.range(0x0621, 0x064A, g.uni(2, 8)) + (g.uni(0, 1) ? g.range(0x064B, 0x0652, 1) : ""); break;  // Arabic + harakat
        case 2: s += g.range(0x0915, 0x0939, 1) + g.range(0x093E, 0x094C, 1) + g.range(0x0915, 0x0939, 2) + (g.uni(0, 1) ? "्" : ""); break;  // Devanagari
        case 3: s += g.range(0x05D0, 0x05EA, g.uni(2, 6)); break;  // Hebrew
        case 4: s += g.range(0x0391, 0x03C9, g.uni(2, 8)); break;  // Greek
        case 5: s += g.range(0x0E01, 0x0E30, g.uni(2, 6)) + g.range(0x0E31, 0x0E3A, 1); break;  // Thai + marks
        case 6: s += "e" + g.range(0x0300, 0x036F, g.uni(1, 3)); break;  // combining diacritics
        case 7: s += " "; break;
      }
    }
    add(s, "scripts");
  }
  const std::vector<std::string> emoji = {"😀", "👍", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣", "❤️", "🧑🏿‍🚀", "🤖", "✨", "©", "™", "🫠"};
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 8);
    for (int k = 0; k < n; ++k) s += (g.uni(0, 2) == 0 ? g.pick(kWords) + " " : "") + g.pick(emoji);
    add(s, "emoji");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    switch (g.uni(0, 5)) {
      case 0: s = std::to_string(g.uni(0, 2000000000)); break;
      case 1: s = std::to_string(g.uni(0, 99999)) + "." + std::to_string(g.uni(0, 99999)); break;
      case 2: s = std::to_string(g.uni(1, 999)) + "," + std::to_string(g.uni(100, 999)) + "," + std::to_string(g.uni(100, 999)); break;
      case 3: s = "1e-" + std::to_string(g.uni(1, 30)) + " x " + std::to_string(g.uni(-500, 500)); break;
      case 4: s = "٣٤٥ ४५६ ১২৩ ½ ² Ⅻ " + std::to_string(g.uni(0, 9999)); break;  // other-script digits, No, Nl
      case 5: s = std::string(g.uni(1, 20), static_cast<char>('0' + g.uni(0, 9))); break;
    }
    add(s, "numbers");
  }
  const std::vector<std::string> ws = {" ", "  ", "\t", "\n", "\r\n", "\n\n", "\r", " \n", "\u00a0", "\u3000", "\u2028", "\u2009", "\v", "\f"};
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 10);
    for (int k = 0; k < n; ++k) s += g.uni(0, 1) ? g.pick(ws) : g.pick(kWords);
    add(s, "whitespace");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string w = g.pick(kWords);
    const int r = g.uni(0, 3);
    if (r == 1)
      for (auto& c : w) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    std::string s = (g.uni(0, 1) ? "" : " ") + w + g.pick(kContractions);
    if (g.uni(0, 1)) s += " " + g.pick(kWords) + g.pick(kContractions) + (g.uni(0, 1) ? "." : "");
    add(s, "contractions");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 4);
    for (int k = 0; k < n; ++k) s += (g.uni(0, 1) ? sentence(g, g.uni(0, 3)) : std::string()) + g.pick(kSpecials);
    add(s, "specials");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 30);
    for (int k = 0; k < n; ++k) s += g.cp(random_assigned(g));
    add(s, "random-unicode");
  }
  for (size_t i = 0; i < per; ++i) {
    std::string s;
    const int n = g.uni(1, 40);
    for (int k = 0; k < n; ++k) s += static_cast<char>(g.uni(1, 127));
    add(s, "random-ascii");
  }
  // U+0085 and U+FEFF: whitespace to Rust's regex (tiktoken, tokenizers), not to ECMAScript's
  for (int i = 0; i < 200; ++i) {
    std::string s = g.pick(kWords) + (g.uni(0, 1) ? "\u0085" : "\ufeff") + (g.uni(0, 1) ? " " : "") + g.pick(kWords);
    if (g.uni(0, 1)) s += "\u0085\n";
    add(s, "nel-bom", true);
  }
  return out;
}

}  // namespace kscope::test
