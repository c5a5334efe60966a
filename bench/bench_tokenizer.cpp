// Tokenizer encode throughput (not a test). Run by bench/tokenizer.sh, which times the references on the same
// corpus in the same run.
//   bench_tokenizer --write-corpus FILE            write the benchmark corpus (JSON lines)
//   bench_tokenizer CORPUS O200K_RANKS DEEPSEEK_DIR print "name MB/s" lines
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../tests/corpus.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace kscope;
using clk = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--write-corpus") {
    // the exactness corpus, plus long English prose (the common case)
    auto c = test::tokenizer_corpus(21000, 7);
    std::ofstream f(argv[2]);
    for (auto& e : c)  // (U+0085/U+FEFF strings are left out: the JS reference reads \s differently there)
      if (!e.js_whitespace_differs) f << nlohmann::json(e.text).dump() << "\n";
    auto prose = test::tokenizer_corpus(24000, 11);
    std::string doc;  // documents of ~4 KB of English and code, cut at line ends
    for (auto& e : prose) {
      if (e.category != "english" && e.category != "code") continue;
      doc += e.text + "\n";
      if (doc.size() > 4000) {
        f << nlohmann::json(doc).dump() << "\n";
        doc.clear();
      }
    }
    return 0;
  }
  if (argc != 4) {
    std::fprintf(stderr, "usage: bench_tokenizer CORPUS O200K_RANKS DEEPSEEK_DIR | --write-corpus FILE\n");
    return 2;
  }
  std::vector<std::string> corpus;
  size_t bytes = 0;
  {
    std::ifstream f(argv[1]);
    std::string line;
    while (std::getline(f, line)) {
      corpus.push_back(nlohmann::json::parse(line).get<std::string>());
      bytes += corpus.back().size();
    }
  }
  auto o200k = Tokenizer::from_tiktoken(argv[2], PreTokenizer::o200k, {});
  auto kimi = Tokenizer::from_tiktoken(argv[2], PreTokenizer::kimi, {});
  auto ds = Tokenizer::load(argv[3]);
  auto time = [&](const char* name, const Tokenizer& t, bool parse_special) {
    double best = 1e30;
    size_t n = 0;
    for (int rep = 0; rep < 3; ++rep) {
      n = 0;
      const auto t0 = clk::now();
      for (auto& s : corpus) n += t.encode(s, parse_special).size();
      best = std::min(best, std::chrono::duration<double>(clk::now() - t0).count());
    }
    std::printf("%s %.2f %zu\n", name, bytes / best / 1e6, n);
  };
  time("kscope-o200k", *o200k, false);           // as tiktoken's encode_ordinary
  time("kscope-kimi", *kimi, false);
  time("kscope-deepseek_v3", *ds, true);         // as HF's encode: added tokens in the text are parsed
  return 0;
}
