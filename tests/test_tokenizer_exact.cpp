// Token-exactness against the reference implementations themselves, run as a real process: tiktoken (its
// Rust core compiled to WASM) for o200k_base, cl100k_base and Kimi-K2's exact pattern; HF tokenizers.js and
// @lenml's tokenizer for DeepSeek-V3's real tokenizer.json. Zero mismatches on a corpus of > 20,000 strings.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "corpus.hpp"
#include "testutil.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace kscope;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kRefDir = std::string(KSCOPE_SOURCE_DIR) + "/tests/tokenizer-ref";

std::string escaped(const std::string& s) { return json(s).dump(); }

class Exact : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    corpus_ = test::tokenizer_corpus();
    {
      std::ofstream f(dir_->str() + "/corpus.jsonl");
      for (auto& e : corpus_) f << json(e.text).dump() << "\n";
    }
    ASSERT_TRUE(fs::exists(kRefDir + "/node_modules/tiktoken"))
        << "reference tokenizers missing: run `npm ci --prefix tests/tokenizer-ref` (make test does)";
    std::string out;
    const int rc = test::run("node " + kRefDir + "/reference.mjs " + dir_->str() + "/corpus.jsonl " + dir_->str() + "/ref", &out);
    ASSERT_EQ(rc, 0) << out.substr(0, 2000);
    std::ifstream f(dir_->str() + "/ref/reference.jsonl");
    std::string line;
    while (std::getline(f, line)) ref_.push_back(json::parse(line));
    ASSERT_EQ(ref_.size(), corpus_.size());
  }
  static void TearDownTestSuite() { delete dir_; }

  // Compares one tokenizer's encodings with a reference field; reports the first few mismatches.
  static void compare(const Tokenizer& t, const std::string& field, bool parse_special, bool skip_js_ws = false) {
    size_t bad = 0, n = 0;
    std::string report;
    for (size_t i = 0; i < corpus_.size(); ++i) {
      if (skip_js_ws && corpus_[i].js_whitespace_differs) continue;
      ++n;
      const auto got = t.encode(corpus_[i].text, parse_special);
      const auto want = ref_[i][field].get<std::vector<int32_t>>();
      if (got != want) {
        if (++bad <= 5)
          report += "\n  [" + corpus_[i].category + "] " + escaped(corpus_[i].text) + "\n    want " + json(want).dump() +
                    "\n    got  " + json(got).dump();
      }
      // and every encoding decodes back to the text
      if (t.decode(got) != corpus_[i].text && bad < 5) {
        ++bad;
        report += "\n  round trip failed: " + escaped(corpus_[i].text);
      }
    }
    EXPECT_GE(n, 20000u);
    EXPECT_EQ(bad, 0u) << field << ": " << bad << " of " << n << " strings differ" << report;
    std::printf("    %-14s %zu strings, %zu mismatches\n", field.c_str(), n, bad);
  }

  static test::TempDir* dir_;
  static std::vector<test::CorpusEntry> corpus_;
  static std::vector<json> ref_;
};
test::TempDir* Exact::dir_ = nullptr;
std::vector<test::CorpusEntry> Exact::corpus_;
std::vector<json> Exact::ref_;

TEST_F(Exact, corpus_covers_every_category_with_over_20000_strings) {
  std::map<std::string, int> n;
  for (auto& e : corpus_) ++n[e.category];
  EXPECT_GE(corpus_.size(), 20000u);
  for (auto c : {"english", "code", "cjk", "han+latin", "scripts", "emoji", "numbers", "whitespace", "contractions",
                 "specials", "random-unicode", "random-ascii", "nel-bom"})
    EXPECT_GE(n[c], 200) << c;
}

TEST_F(Exact, o200k_base_matches_tiktoken) {
  auto t = Tokenizer::from_tiktoken(dir_->str() + "/ref/o200k_base.tiktoken", PreTokenizer::o200k,
                                    {{"<|endoftext|>", 199999, true}, {"<|endofprompt|>", 200018, true}});
  compare(*t, "o200k", false);
  compare(*t, "o200k_special", true);
}

TEST_F(Exact, cl100k_base_matches_tiktoken) {
  auto t = Tokenizer::from_tiktoken(dir_->str() + "/ref/cl100k_base.tiktoken", PreTokenizer::cl100k, {});
  compare(*t, "cl100k", false);
}

TEST_F(Exact, kimi_format_tokenizer_matches_tiktoken_running_kimis_exact_pattern) {
  // A Kimi-format directory: o200k ranks as tiktoken.model + Kimi's tokenizer_config.json special names.
  const std::string kd = dir_->str() + "/kimi";
  fs::create_directories(kd);
  fs::copy_file(dir_->str() + "/ref/o200k_base.tiktoken", kd + "/tiktoken.model");
  const json names = json::parse(test::read_file(kRefDir + "/kimi_special_tokens.json"));
  json dec = json::object();
  for (auto it = names.begin(); it != names.end(); ++it)
    dec[std::to_string(199998 + std::stoi(it.key()))] = {{"content", it.value()}, {"special", true}};
  test::write_file(kd + "/tokenizer_config.json", json({{"added_tokens_decoder", dec}}).dump());
  auto t = Tokenizer::load(kd);
  EXPECT_EQ(t->pre(), PreTokenizer::kimi);
  EXPECT_EQ(t->token_id("<|im_end|>"), std::optional<int32_t>(200000));
  EXPECT_EQ(t->token_id("<|end_header_id|>"), std::optional<int32_t>(200005));
  EXPECT_EQ(t->token_id("<|reserved_token_200003|>"), std::optional<int32_t>(200003));  // unnamed slot
  compare(*t, "kimi", false);
  compare(*t, "kimi_special", true);
  // the splits alone, against the pattern as an independent ECMAScript v-flag regex
  size_t bad = 0;
  for (size_t i = 0; i < corpus_.size(); ++i) {
    const auto want = ref_[i]["kimi_pieces"].get<std::vector<std::string>>();
    if (t->pretokenize_text(corpus_[i].text) != want && ++bad <= 3)
      ADD_FAILURE() << "pieces differ for " << escaped(corpus_[i].text) << "\n want " << json(want).dump() << "\n got  "
                    << json(t->pretokenize_text(corpus_[i].text)).dump();
  }
  EXPECT_EQ(bad, 0u);
}

TEST_F(Exact, deepseek_v3_matches_hf_tokenizers_js_and_lenml) {
  auto t = Tokenizer::load(dir_->str() + "/ref/deepseek_v3");
  EXPECT_EQ(t->kind(), Tokenizer::Kind::hf_bpe);
  // The JS references use ECMAScript's \s; the Rust tokenizers DeepSeek ships with use Unicode White_Space.
  // They disagree only on U+0085 and U+FEFF, which kscope treats as Rust does (see test_tokenizer.cpp).
  compare(*t, "ds_hf", true, /*skip_js_ws=*/true);
  compare(*t, "ds_lenml", true, /*skip_js_ws=*/true);
}

}  // namespace
