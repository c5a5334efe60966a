// Capture, steering and the activation store, each behaviour stated by its test's name.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "interp/capture.hpp"
#include "interp/steer_spec.hpp"
#include "interp/vectors.hpp"
#include "store/activation_store.hpp"
#include "testutil.hpp"
#include "util/error.hpp"

using namespace kscope;
namespace fs = std::filesystem;

namespace {

std::string fixture(const std::string& n) { return test::fixtures() + "/reference/" + n; }

class Interp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = Model::load(fixture("kimi_bf16")).release();
    golden_ = new TensorStore(TensorStore::open(fixture("kimi_bf16") + "/golden.safetensors"));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete golden_;
  }
  static std::vector<int32_t> gi(const std::string& n) { return test::read_i32(golden_->get(n)); }
  static std::vector<float> g(const std::string& n) { return to_f32(golden_->get(n)); }
  static Site site(const std::string& s) { return parse_site(s, model_->config().num_hidden_layers); }
  static Model* model_;
  static TensorStore* golden_;
};
Model* Interp::model_ = nullptr;
TensorStore* Interp::golden_ = nullptr;

GenerateRequest greedy(int64_t n) {
  GenerateRequest g;
  g.max_new_tokens = n;
  g.ignore_eos = true;
  return g;
}

TEST_F(Interp, captures_equal_hf_hidden_states_when_replaying_and_when_generating) {
  const int64_t H = 160, L = 3;
  const auto prompt = gi("seq3.prompt"), greedy_toks = gi("seq3.greedy");
  const auto hidden = g("seq3.hidden");
  const int64_t T = prompt.size() + greedy_toks.size();
  CaptureSpec spec;
  for (int64_t l = 0; l < L; ++l) spec.sites.push_back({SiteKind::resid_pre, l});
  spec.sites.push_back({SiteKind::resid_post, L - 1});
  // replay of prompt + HF's greedy continuation
  CaptureRequest replay;
  replay.prompt = prompt;
  replay.response = greedy_toks;
  // generation of the continuation, capturing only the response
  CaptureRequest gen;
  gen.prompt = prompt;
  gen.generate = true;
  gen.gen = greedy(static_cast<int64_t>(greedy_toks.size()));
  const auto caps = run_capture(*model_, {replay}, spec);
  CaptureSpec rspec = spec;
  rspec.positions = PositionSpec::parse("response");
  const auto gcap = run_capture(*model_, {gen}, rspec);
  ASSERT_EQ(caps[0].positions.size(), static_cast<size_t>(T));
  ASSERT_EQ(gcap[0].positions.size(), greedy_toks.size());  // every kept token has states
  EXPECT_EQ(gcap[0].tokens, gi("seq3.ids"));
  for (int64_t l = 0; l <= L; ++l) {
    const std::string name = l < L ? std::to_string(l) + ".resid_pre" : std::to_string(L - 1) + ".resid_post";
    const std::vector<float> want(hidden.begin() + l * T * H, hidden.begin() + (l + 1) * T * H);
    EXPECT_LE(test::rel_err(caps[0].rows.at(name), want), 1e-4) << name;
    const std::vector<float> want_resp(want.begin() + prompt.size() * H, want.end());
    EXPECT_LE(test::rel_err(gcap[0].rows.at(name), want_resp), 1e-4) << name << " (generated)";
  }
}

TEST_F(Interp, zero_coefficient_leaves_outputs_bit_identical) {
  const auto prompt = gi("seq2.prompt");
  GenerateRequest r = greedy(8);
  r.prompt = prompt;
  const auto plain = generate(*model_, {r});
  Intervention iv;
  iv.site = site("1.resid_post");
  iv.vector.assign(160, 1.0f);
  iv.coef = 0.0;
  SteeringHook steer({{iv}}, {SeqLayout{static_cast<int64_t>(prompt.size())}});
  GenerateOptions o;
  o.observer = &steer;
  const auto steered = generate(*model_, {r}, o);
  EXPECT_EQ(steered[0].tokens, plain[0].tokens);
  EXPECT_EQ(steered[0].logprobs, plain[0].logprobs);
}

TEST_F(Interp, the_unembedding_direction_at_the_last_layer_raises_its_token_monotonically) {
  const auto prompt = gi("seq1.prompt");
  const int32_t token = 77;
  std::vector<float> v(160);
  model_->weights().lm_head.dequant_row(token, v.data());
  double prev = -1e30;
  int rank_at_zero = -1, rank = -1;
  for (double c : {0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0}) {
    Intervention iv;
    iv.site = site("2.resid_post");
    iv.vector = v;
    iv.coef = c;
    iv.positions = PositionSpec::parse("prompt[-1]");
    SteeringHook steer({{iv}}, {SeqLayout{static_cast<int64_t>(prompt.size()), static_cast<int64_t>(prompt.size())}});
    KvCache cache = model_->new_cache();
    std::vector<ForwardItem> items{{&cache, prompt.data(), static_cast<int64_t>(prompt.size()), false}};
    std::vector<std::vector<float>> logits;
    model_->forward(items, logits, &steer);
    const double lp = log_softmax_at(logits[0].data(), 512, token);
    EXPECT_GT(lp, prev) << "coefficient " << c;
    prev = lp;
    rank = static_cast<int>(std::count_if(logits[0].begin(), logits[0].end(), [&](float x) { return x > logits[0][token]; }));
    if (c == 0.0) rank_at_zero = rank;
  }
  EXPECT_LT(rank, rank_at_zero);  // and it climbs the ranking
}

TEST_F(Interp, each_row_of_a_mixed_batch_equals_that_row_run_alone) {
  std::vector<float> v1(160), v2(160);
  for (int i = 0; i < 160; ++i) {
    v1[i] = std::sin(0.3f * i);
    v2[i] = std::cos(0.7f * i);
  }
  auto mk = [&](const char* s, InterventionOp op, double c, std::vector<float> v, const char* pos) {
    Intervention iv;
    iv.site = site(s);
    iv.op = op;
    iv.coef = c;
    iv.vector = std::move(v);
    iv.positions = PositionSpec::parse(pos);
    return iv;
  };
  std::vector<std::vector<Intervention>> lists = {
      {mk("0.resid_post", InterventionOp::add, 3.0, v1, "all")},
      {},
      {mk("1.attn_out", InterventionOp::add, -2.0, v2, "response"), mk("2.resid_pre", InterventionOp::ablate, 0, v1, "all")},
      {mk("1.mlp_out", InterventionOp::clamp, 1.5, v2, "prompt[-2:],response[:3]")},
  };
  std::vector<GenerateRequest> reqs;
  std::vector<SeqLayout> layouts;
  for (int i = 0; i < 4; ++i) {
    GenerateRequest r = greedy(6);
    r.prompt = gi("seq" + std::to_string(i) + ".prompt");
    r.sampling = {0.9, 0, 1.0, static_cast<uint64_t>(i)};  // sampled, so any numeric difference would show
    reqs.push_back(r);
    layouts.push_back({static_cast<int64_t>(r.prompt.size())});
  }
  SteeringHook all(lists, layouts);
  GenerateOptions o;
  o.observer = &all;
  const auto batched = generate(*model_, reqs, o);
  bool any_changed = false;
  for (int i = 0; i < 4; ++i) {
    SteeringHook one({lists[i]}, {layouts[i]});
    GenerateOptions oi;
    oi.observer = &one;
    const auto alone = generate(*model_, {reqs[i]}, oi);
    EXPECT_EQ(alone[0].tokens, batched[i].tokens) << i;
    EXPECT_EQ(alone[0].logprobs, batched[i].logprobs) << i;
    if (!lists[i].empty()) any_changed |= generate(*model_, {reqs[i]})[0].logprobs != alone[0].logprobs;
  }
  EXPECT_TRUE(any_changed) << "the interventions should change something";
}

TEST_F(Interp, ablation_leaves_zero_projection_and_clamp_sets_it) {
  std::vector<float> v(160);
  for (int i = 0; i < 160; ++i) v[i] = std::sin(1.1f * i) + 0.2f;
  double vn = 0;
  for (float x : v) vn += x * x;
  vn = std::sqrt(vn);
  for (auto [op, target] : {std::pair{InterventionOp::ablate, 0.0}, std::pair{InterventionOp::clamp, 2.5}}) {
    CaptureRequest r;
    r.prompt = gi("seq3.prompt");
    Intervention iv;
    iv.site = site("1.resid_mid");
    iv.op = op;
    iv.coef = target;
    iv.vector = v;
    r.interventions = {iv};
    CaptureSpec spec;
    spec.sites = {site("1.resid_mid")};
    const auto c = run_capture(*model_, {r}, spec);
    const auto& rows = c[0].rows.at("1.resid_mid");
    double worst = 0, norm = 0;
    for (size_t p = 0; p < c[0].positions.size(); ++p) {
      double proj = 0, hn = 0;
      for (int d = 0; d < 160; ++d) {
        proj += rows[p * 160 + d] * v[d];
        hn += rows[p * 160 + d] * rows[p * 160 + d];
      }
      worst = std::max(worst, std::fabs(proj / vn - target));
      norm = std::max(norm, std::sqrt(hn));
    }
    EXPECT_LT(worst, 1e-5 * norm) << op_name(op);  // fp32 rounding of a dot product over 160 values
  }
}

TEST_F(Interp, a_relative_coefficient_is_in_units_of_the_sites_mean_norm) {
  Intervention iv;
  iv.vector.assign(160, 0.5f);
  iv.coef = 2.0;
  iv.relative = true;
  iv.mean_norm = 7.0;
  std::vector<float> h(160, 1.0f), before = h;
  apply_intervention(iv, h.data(), 160);
  double d = 0;
  for (int i = 0; i < 160; ++i) d += (h[i] - before[i]) * (h[i] - before[i]);
  EXPECT_NEAR(std::sqrt(d), 14.0, 1e-4);
}

TEST_F(Interp, router_captures_hold_the_chosen_experts_and_their_weights) {
  CaptureRequest r;
  r.prompt = gi("seq2.prompt");
  CaptureSpec spec;
  spec.sites = {site("1.router")};
  const auto c = run_capture(*model_, {r}, spec);
  const auto& ids = c[0].router_ids.at("1.router");
  const auto& w = c[0].router_weights.at("1.router");
  ASSERT_EQ(ids.size(), c[0].positions.size() * 4);
  for (size_t p = 0; p < c[0].positions.size(); ++p) {
    double s = 0;
    for (int k = 0; k < 4; ++k) {
      if (k) EXPECT_LT(ids[p * 4 + k - 1], ids[p * 4 + k]);
      EXPECT_GE(ids[p * 4 + k], 0);
      EXPECT_LT(ids[p * 4 + k], 16);
      s += w[p * 4 + k];
    }
    EXPECT_NEAR(s, 2.827, 1e-4);  // normalized top-k weights times routed_scaling_factor
  }
  spec.sites = {site("0.router")};  // layer 0 is dense
  EXPECT_THROW(run_capture(*model_, {r}, spec), Error);
}

TEST_F(Interp, mean_reduction_is_the_mean_of_the_selected_rows) {
  CaptureRequest r;
  r.prompt = gi("seq2.prompt");
  CaptureSpec none, mean;
  none.sites = mean.sites = {site("2.mlp_out")};
  none.positions = mean.positions = PositionSpec::parse("prompt[1:4]");
  mean.reduction = Reduction::mean;
  const auto a = run_capture(*model_, {r}, none)[0].rows.at("2.mlp_out");
  const auto b = run_capture(*model_, {r}, mean)[0].rows.at("2.mlp_out");
  ASSERT_EQ(a.size(), 3u * 160);
  ASSERT_EQ(b.size(), 160u);
  for (int d = 0; d < 160; ++d) EXPECT_NEAR(b[d], (a[d] + a[160 + d] + a[320 + d]) / 3.0, 1e-6);
}

TEST(CaptureFiling, counts_the_activation_bytes_it_filed) {
  CaptureSpec spec;
  spec.sites = {Site{SiteKind::resid_post, 0}, Site{SiteKind::final_norm, -1}};
  CaptureHook cap(spec, 2);
  EXPECT_EQ(cap.filing().bytes, 0.0);
  std::vector<float> rows(3 * 16, 0.5f);
  cap.on(spec.sites[0], 0, rows.data(), 3, 16, 0);
  cap.on(spec.sites[1], 1, rows.data(), 2, 16, 5);
  const auto f = cap.filing();
  EXPECT_EQ(f.bytes, 5.0 * 16 * sizeof(float));
  EXPECT_GE(f.seconds, 0.0);
  std::vector<int32_t> idx = {3, 1};
  std::vector<float> w = {0.25f, 0.75f};
  cap.on_router(0, 0, nullptr, idx.data(), w.data(), 1, 4, 2, 0);  // router rows are not activation rows
  EXPECT_EQ(cap.filing().bytes, f.bytes);
}

TEST(Positions, the_language_selects_what_it_says) {
  SeqLayout l;
  l.prompt_len = 10;
  l.total_len = 16;
  Turn u{"user", 1, 6, 3, 6};
  Turn a{"assistant", 6, 10, 8, 10, 7, 8};
  l.turns = {u, a};
  auto r = [&](const char* s) { return PositionSpec::parse(s).resolve(l); };
  EXPECT_EQ(r("prompt[-1]"), (std::vector<int64_t>{9}));
  EXPECT_EQ(r("response[:2]"), (std::vector<int64_t>{10, 11}));
  EXPECT_EQ(r("response[-2:]"), (std::vector<int64_t>{14, 15}));
  EXPECT_EQ(r("turn[user]"), (std::vector<int64_t>{3, 4, 5}));
  EXPECT_EQ(r("turn[user][-1]"), (std::vector<int64_t>{5}));
  EXPECT_EQ(r("think"), (std::vector<int64_t>{7}));
  EXPECT_EQ(r("[2:4],response[0]"), (std::vector<int64_t>{2, 3, 10}));
  EXPECT_EQ(r("[-1]"), (std::vector<int64_t>{15}));
  EXPECT_EQ(r("all").size(), 16u);
  EXPECT_EQ(r("prompt[3:100]").size(), 7u);
  EXPECT_TRUE(PositionSpec::parse("response[-1]").needs_total());
  EXPECT_FALSE(PositionSpec::parse("response[:5],prompt[-1]").needs_total());
  for (const char* bad : {"", "promt", "prompt[", "prompt[a]", "turn[bot]", "prompt,", "prompt;response", "[1:x]"})
    EXPECT_THROW(PositionSpec::parse(bad), Error) << bad;
  SeqLayout live = l;
  live.total_len = -1;  // generating
  EXPECT_THROW(PositionSpec::parse("response[-1]").contains(12, live), Error);
  EXPECT_TRUE(PositionSpec::parse("response[:5]").contains(12, live));
}

TEST_F(Interp, sites_are_named_and_checked) {
  EXPECT_EQ(site("2.resid_post").str(), "2.resid_post");
  EXPECT_EQ(site("final_norm").str(), "final_norm");
  for (const char* bad : {"20", "3.resid_post", "x.resid_post", "1.residual", "final_norm.1", "1.embed", "resid_post"})
    EXPECT_THROW(site(bad), Error) << bad;
}

TEST_F(Interp, an_interrupted_capture_resumes_to_byte_identical_shards) {
  test::TempDir d;
  std::vector<CaptureRequest> reqs;
  for (int i = 0; i < 23; ++i) {
    CaptureRequest r;
    const auto p = gi("seq" + std::to_string(i % 4) + ".prompt");
    r.prompt = p;
    r.prompt.push_back(3 + i);  // distinct sequences
    if (i % 3 == 0) {
      r.generate = true;
      r.gen = greedy(3);
    }
    reqs.push_back(r);
  }
  CaptureSpec spec;
  spec.sites = {site("1.resid_post"), site("2.router")};
  spec.positions = PositionSpec::parse("prompt[-2:],response");
  StoreConfig cfg;
  cfg.model_identity = model_->config().identity_hash();
  cfg.sites = {"1.resid_post", "2.router"};
  cfg.positions = spec.positions.text();
  cfg.d_model = 160;
  cfg.shard_sequences = 4;
  {
    StoreWriter w(d.str() + "/full", cfg);
    capture_to_store(*model_, reqs, spec, w, 5);
  }
  {
    StoreWriter w(d.str() + "/cut", cfg);
    EXPECT_THROW(capture_to_store(*model_, reqs, spec, w, 3, [](int64_t done, int64_t) {
                   if (done >= 12) throw std::runtime_error("killed");
                 }),
                 std::runtime_error);
  }
  // debris a crash can leave: a half-written shard and a shard the manifest never recorded
  test::write_file(d.str() + "/cut/shard-00003.safetensors.tmp", "partial");
  fs::copy_file(d.str() + "/full/shard-00005.safetensors", d.str() + "/cut/shard-00005.safetensors");
  {
    StoreWriter w(d.str() + "/cut", cfg);
    EXPECT_EQ(w.next_sequence(), 12);
    capture_to_store(*model_, reqs, spec, w, 7);
  }
  const auto full = ActivationStore::open(d.str() + "/full"), cut = ActivationStore::open(d.str() + "/cut");
  ASSERT_EQ(full.n_shards(), 6);
  ASSERT_EQ(cut.n_shards(), 6);
  for (int s = 0; s < 6; ++s) {
    const std::string n = fmt::format("/shard-{:05d}.safetensors", s);
    EXPECT_EQ(test::read_file(d.str() + "/full" + n), test::read_file(d.str() + "/cut" + n)) << n;
  }
  EXPECT_EQ(full.manifest()["sequences"], cut.manifest()["sequences"]);
  EXPECT_FALSE(fs::exists(d.str() + "/cut/shard-00003.safetensors.tmp"));
  int64_t w = 0;
  const auto rows = full.sequence_rows("1.resid_post", 7, &w);
  EXPECT_EQ(w, 160);
  EXPECT_EQ(rows.size() / 160, full.manifest()["sequences"][7]["positions"].size());
  // a different setting is refused rather than mixed into the store
  cfg.positions = "all";
  EXPECT_THROW(StoreWriter(d.str() + "/full", cfg), Error);
  // a corrupted shard is caught by its checksum
  {
    std::fstream f(d.str() + "/full/shard-00002.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  EXPECT_THROW(ActivationStore::open(d.str() + "/full"), Error);
}

TEST_F(Interp, a_vector_for_another_model_or_site_is_refused) {
  test::TempDir d;
  VectorFile v;
  v.vectors["1.resid_post"] = std::vector<float>(160, 0.5f);
  v.vectors["2.resid_post"] = std::vector<float>(160, -0.25f);
  v.meta["model_identity"] = model_->config().identity_hash();
  v.meta["method"] = "test";
  v.norms["1.resid_post"] = 11.0;
  v.save(d.str() + "/v.safetensors");
  VectorCache vc(model_->config());
  const auto iv = parse_intervention_arg(d.str() + "/v.safetensors@1.resid_post*0.5n:response[:3]", model_->config(), vc);
  EXPECT_EQ(iv.site.str(), "1.resid_post");
  EXPECT_TRUE(iv.relative);
  EXPECT_EQ(iv.mean_norm, 11.0);
  auto expect = [&](const std::string& arg, const std::string& frag) {
    try {
      VectorCache c(model_->config());
      parse_intervention_arg(arg, model_->config(), c);
      FAIL() << arg;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
    }
  };
  expect(d.str() + "/v.safetensors@0.resid_post*1", "no vector for site '0.resid_post'");
  expect(d.str() + "/v.safetensors@1.resid_post", "missing *COEF");
  expect(d.str() + "/v.safetensors@1.resid_post*x", "'x' is not a number");
  expect(d.str() + "/v.safetensors@1.resid_post!zap", "!ablate");
  expect(d.str() + "/v.safetensors@1.resid_post*1:reply", "not a region");
  auto other = Model::load(fixture("dsv3_bf16"));
  EXPECT_THROW(v.check_model(other->config(), "v"), Error);
  VectorFile conv = v;
  conv.meta["site_convention"] = "hf hidden_states index";
  EXPECT_THROW(conv.check_model(model_->config(), "v"), Error);
  // a GGUF control vector round-trips with direction.N <-> N.resid_post
  export_control_vector_gguf(v, d.str() + "/v.gguf", "kimi_bf16");
  const auto back = import_control_vector_gguf(d.str() + "/v.gguf", model_->config());
  EXPECT_EQ(back.vectors, v.vectors);
  EXPECT_THROW(import_control_vector_gguf(d.str() + "/v.gguf", other->config()), Error);  // hidden 192 != 160
  VectorFile mlp = v;
  mlp.vectors["1.mlp_out"] = std::vector<float>(160, 1.0f);
  EXPECT_THROW(export_control_vector_gguf(mlp, d.str() + "/x.gguf", "m"), Error);
  // the GGUF layout llama.cpp reads: header, kv, tensor "direction.1" [160] F32
  const std::string raw = test::read_file(d.str() + "/v.gguf");
  EXPECT_EQ(raw.substr(0, 4), "GGUF");
  EXPECT_NE(raw.find("controlvector.layer_count"), std::string::npos);
  EXPECT_NE(raw.find("direction.2"), std::string::npos);
}

}  // namespace
