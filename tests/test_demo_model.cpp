// The embedded demo model (models/demo, trained by scripts/demo-model): kscope matches HF transformers on it in
// BF16, and in FP8 and INT4 made by `kscope quantize`; its tokenizer agrees with HF's (Rust) tokenizer; and
// steering with a French-minus-English vector turns its output French.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "interp/capture.hpp"
#include "interp/intervention.hpp"
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
      // the golden keeps the rows from the last prompt position on (those that predict the greedy tokens)
      const int64_t T = static_cast<int64_t>(test::read_i32(golden.get(p + ".prompt")).size()), V = model->config().vocab_size;
      const std::vector<float> rows(logits[0].begin() + (T - 1) * V, logits[0].end());
      EXPECT_LE(test::rel_err(rows, to_f32(golden.get(p + ".logits"))), tol) << p;
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

namespace {

std::vector<std::string> lines_field(const std::string& path, const char* field) {
  std::vector<std::string> out;
  std::istringstream in(test::read_file(path));
  std::string l;
  while (std::getline(in, l))
    if (!l.empty()) out.push_back(nlohmann::json::parse(l)[field].get<std::string>());
  return out;
}

// Mean over positions of each text's state at `site` (a mean-reduced capture).
std::vector<std::vector<float>> mean_states(Model& m, const Tokenizer& tok, const std::vector<std::string>& texts, const Site& site) {
  std::vector<CaptureRequest> reqs;
  for (auto& t : texts) {
    CaptureRequest r;
    r.prompt = tok.encode(t);
    reqs.push_back(r);
  }
  CaptureSpec spec;
  spec.sites = {site};
  spec.reduction = Reduction::mean;
  std::vector<std::vector<float>> out;
  for (auto& c : run_capture(m, reqs, spec)) out.push_back(c.rows.at(site.str()));
  return out;
}

TEST(DemoSteering, a_french_vector_turns_english_french_until_too_large_a_coefficient_breaks_the_text) {
  const std::string ex = std::string(KSCOPE_SOURCE_DIR) + "/examples/french";
  auto model = Model::load(kDemo);
  auto tok = Tokenizer::load(kDemo);
  const Site site{SiteKind::resid_post, 2};
  const auto en = lines_field(ex + "/pairs.jsonl", "en"), fr = lines_field(ex + "/pairs.jsonl", "fr");
  // extract on the first 32 pairs, hold out the last 16
  const std::vector<std::string> en_tr(en.begin(), en.begin() + 32), fr_tr(fr.begin(), fr.begin() + 32);
  const auto pe = mean_states(*model, *tok, en_tr, site), pf = mean_states(*model, *tok, fr_tr, site);
  const int64_t H = model->config().hidden_size;
  std::vector<float> v(H, 0.0f);
  double mean_norm = 0;
  for (size_t i = 0; i < pe.size(); ++i)
    for (int64_t d = 0; d < H; ++d) v[d] += (pf[i][d] - pe[i][d]) / pe.size();
  for (auto* side : {&pe, &pf})
    for (auto& h : *side) {
      double n = 0;
      for (float x : h) n += x * x;
      mean_norm += std::sqrt(n) / (2.0 * pe.size());
    }
  double vn = 0;
  for (float x : v) vn += x * x;
  vn = std::sqrt(vn);

  // held-out French projects higher than its English twin
  const std::vector<std::string> en_te(en.begin() + 32, en.end()), fr_te(fr.begin() + 32, fr.end());
  const auto te = mean_states(*model, *tok, en_te, site), tf = mean_states(*model, *tok, fr_te, site);
  int ordered = 0;
  for (size_t i = 0; i < te.size(); ++i) {
    double a = 0, b = 0;
    for (int64_t d = 0; d < H; ++d) {
      a += te[i][d] * v[d] / vn;
      b += tf[i][d] * v[d] / vn;
    }
    ordered += b > a;
  }
  EXPECT_EQ(ordered, static_cast<int>(te.size())) << "held-out pairs where French projects higher";

  // steer the English questions: French fraction and coherence (mean log-likelihood under the unsteered model)
  const auto questions = lines_field(ex + "/questions.jsonl", "text");
  std::vector<double> french, loglik;
  for (double c : {0.0, 0.25, 0.5, 1.0, 4.0}) {
    std::vector<GenerateRequest> reqs;
    std::vector<std::vector<Intervention>> ivs;
    std::vector<SeqLayout> layouts;
    for (auto& q : questions) {
      GenerateRequest r;
      r.prompt = tok->encode(q);
      r.max_new_tokens = 24;
      r.ignore_eos = true;
      reqs.push_back(r);
      Intervention iv;
      iv.site = site;
      iv.vector = v;
      iv.coef = c;
      iv.relative = true;
      iv.mean_norm = mean_norm;
      iv.positions = PositionSpec::parse("response");
      ivs.push_back({iv});
      layouts.push_back({static_cast<int64_t>(r.prompt.size())});
    }
    SteeringHook steer(ivs, layouts);
    GenerateOptions o;
    o.observer = &steer;
    const auto res = generate(*model, reqs, o);
    double f = 0, ll = 0;
    int64_t nll = 0;
    for (size_t i = 0; i < res.size(); ++i) {
      f += french_fraction(tok->decode(res[i].tokens)) / res.size();
      std::vector<int32_t> ids = reqs[i].prompt;
      ids.insert(ids.end(), res[i].tokens.begin(), res[i].tokens.end());
      KvCache cache = model->new_cache();
      std::vector<ForwardItem> items{{&cache, ids.data(), static_cast<int64_t>(ids.size()), true}};
      std::vector<std::vector<float>> lg;
      model->forward(items, lg);
      const int64_t V = model->config().vocab_size, T = reqs[i].prompt.size();
      for (size_t j = 0; j < res[i].tokens.size(); ++j) {
        ll += log_softmax_at(lg[0].data() + (T - 1 + j) * V, V, res[i].tokens[j]);
        ++nll;
      }
    }
    french.push_back(f);
    loglik.push_back(ll / nll);
    std::printf("    coefficient %.2f x mean norm: French fraction %.3f, log-likelihood %.2f per token\n", c, f, ll / nll);
  }
  for (size_t i = 1; i < 4; ++i) EXPECT_GT(french[i], french[i - 1]) << "French fraction must rise with the coefficient";
  EXPECT_LT(french[0], 0.1);   // unsteered: English
  EXPECT_GT(french[3], 0.3);   // steered: mostly French function words
  EXPECT_LT(loglik[4], loglik[2] - 1.0);  // too large a coefficient: text the model itself finds unlikely
}

}  // namespace
