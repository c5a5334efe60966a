// Backend consistency: every CUDA op against the CPU reference on random, non-zero inputs, odd sizes included,
// in every stored weight format. Outputs are poisoned with NaN before each op, so an element the kernel forgets
// to write fails the comparison.
//
// Tolerances, from the precision. The CPU reference computes in fp32 from exactly dequantized weights. The CUDA
// matmuls round both inputs (activations, dequantized weights) to bf16 (relative error <= 2^-9 each) and
// accumulate in fp32: one matmul's output then differs by about 2^-9·√2 ≈ 2.8e-3 relative (norm-wise, random
// signs), which we bound by two bf16 ulps at 1.0, 2·2^-8 = 7.8e-3. A chain of three matmuls (MLP, experts) with
// SiLU between them: twice that, 1.6e-2. Ops that stay in fp32 (norms, rope, router scores, adds, gathers): 1e-5,
// fp32 rounding with a different summation order and libm. Router choices must be identical.
//
// Without a CUDA device these tests skip; scripts/gpu/check.sh sets KSCOPE_REQUIRE_CUDA=1 so that on the GPU
// machine a missing device fails instead.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cstdlib>
#include <deque>
#include <random>

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/device.hpp"
#include "model/quantize.hpp"
#include "testutil.hpp"
#include "util/numeric.hpp"

using namespace kscope;

namespace {

constexpr double kMatmulTol = 2.0 / 256;  // two bf16 ulps
constexpr double kChainTol = 4.0 / 256;
constexpr double kF32Tol = 1e-5;

// A linear layer with its bytes held here, in one stored format.
struct HostLinear {
  std::vector<uint8_t> w, s;
  TensorInfo wt, st;
  Linear lin;
};

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_devices().empty()) {
      if (std::getenv("KSCOPE_REQUIRE_CUDA")) FAIL() << "KSCOPE_REQUIRE_CUDA is set but no CUDA device is visible";
      GTEST_SKIP() << "no CUDA device";
    }
    gpu_ = std::make_shared<CudaBackend>(0);
  }

  std::vector<float> randn(int64_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng_);
    return v;
  }

  // Random W [out, in] ~ N(0, 1/in) stored as `fmt` (bf16; fp8 128x128 blocks; int4 groups of 32).
  const Linear& make_linear(WeightFormat fmt, int64_t out, int64_t in, const std::string& name = "w") {
    auto& h = linears_.emplace_back();
    const auto w = randn(out * in, 1.0f / std::sqrt(static_cast<float>(in)));
    h.lin.name = name;
    h.lin.out = out;
    h.lin.in = in;
    h.lin.format = fmt;
    h.wt.name = name + ".weight";
    h.wt.file = "test";
    if (fmt == WeightFormat::dense) {
      h.w.resize(out * in * 2);
      for (int64_t i = 0; i < out * in; ++i) {
        const uint16_t b = f32_to_bf16(w[i]);
        std::memcpy(h.w.data() + 2 * i, &b, 2);
      }
      h.wt.dtype = DType::BF16;
      h.wt.shape = {out, in};
    } else if (fmt == WeightFormat::fp8_block) {
      std::vector<float> sc;
      quantize_fp8_block(w.data(), out, in, 128, 128, h.w, sc);
      h.s.resize(sc.size() * 4);
      std::memcpy(h.s.data(), sc.data(), h.s.size());
      h.wt.dtype = DType::F8_E4M3;
      h.wt.shape = {out, in};
      h.st.dtype = DType::F32;
      h.st.shape = {(out + 127) / 128, (in + 127) / 128};
      h.lin.block_out = h.lin.block_in = 128;
    } else {
      std::vector<int32_t> packed;
      std::vector<uint16_t> sc;
      quantize_int4_group(w.data(), out, in, 32, packed, sc);
      h.w.resize(packed.size() * 4);
      std::memcpy(h.w.data(), packed.data(), h.w.size());
      h.s.resize(sc.size() * 2);
      std::memcpy(h.s.data(), sc.data(), h.s.size());
      h.wt.dtype = DType::I32;
      h.wt.shape = {out, (in + 7) / 8};
      h.st.dtype = DType::BF16;
      h.st.shape = {out, (in + 31) / 32};
      h.lin.group = 32;
    }
    h.wt.data = h.w.data();
    h.wt.nbytes = h.w.size();
    h.lin.weight = &h.wt;
    if (!h.s.empty()) {
      h.st.name = name + ".scale";
      h.st.file = "test";
      h.st.data = h.s.data();
      h.st.nbytes = h.s.size();
      h.lin.scale = &h.st;
    }
    return h.lin;
  }

  // host -> device, NaN-poisoned device output of n floats, device -> host
  Buf<float> dev(const std::vector<float>& v) { return Buf<float>(*gpu_, v); }
  Buf<float> poisoned(int64_t n) {
    Buf<float> b(*gpu_, n);
    gpu_->fill(b.data(), NAN, n);
    return b;
  }

  void expect_close(const std::vector<float>& got, const std::vector<float>& want, double tol, const std::string& what) {
    const double e = test::rel_err(got, want);
    EXPECT_LE(e, tol) << what;
    std::printf("    %-48s rel err %.2e (tol %.1e)\n", what.c_str(), e, tol);
  }

  std::mt19937 rng_{1234};
  CpuBackend cpu_;
  std::shared_ptr<CudaBackend> gpu_;
  std::deque<HostLinear> linears_;
};

const WeightFormat kFormats[] = {WeightFormat::dense, WeightFormat::fp8_block, WeightFormat::int4_group};

TEST_F(CudaOps, linear_in_every_format_and_odd_shape) {
  struct Shape { int64_t out, in; };
  for (auto wf : kFormats)
    for (Shape sh : {Shape{97, 203}, Shape{256, 512}, Shape{130, 264}, Shape{1, 40}})
      for (int64_t n : {1, 5, 67}) {
        const Linear& l = make_linear(wf, sh.out, sh.in);
        gpu_->prepare_linear(l);
        const auto x = randn(n * sh.in);
        std::vector<float> want(n * sh.out);
        cpu_.linear(l, x.data(), n, want.data());
        auto xd = dev(x);
        auto yd = poisoned(n * sh.out);
        gpu_->linear(l, xd.data(), n, yd.data());
        expect_close(yd.host(), want, kMatmulTol,
                     fmt::format("linear {} {}x{} n={}", format_name(wf), sh.out, sh.in, n));
      }
}

TEST_F(CudaOps, rmsnorm_rope_add_gather_embed) {
  const int64_t n = 7, d = 203;
  const auto x = randn(n * (d + 5)), w = randn(d);
  for (int64_t ld : {d, d + 5}) {
    std::vector<float> want(n * d);
    cpu_.rmsnorm(x.data(), w, n, d, 1e-6f, want.data(), ld);
    auto xd = dev(x);
    auto od = poisoned(n * d);
    gpu_->rmsnorm(xd.data(), w, n, d, 1e-6f, od.data(), ld);
    expect_close(od.host(), want, kF32Tol, fmt::format("rmsnorm ld={}", ld));
  }
  // rope on 3 heads of stride 40 (rope part at offset 24, 16 dims), positions up to 5000
  std::vector<double> inv_freq(8);
  for (int i = 0; i < 8; ++i) inv_freq[i] = std::pow(50000.0, -2.0 * i / 16.0);
  const std::vector<int64_t> pos = {0, 1, 17, 333, 4999};
  for (bool inter : {true, false}) {
    auto v = randn(5 * 3 * 40);
    auto want = v;
    cpu_.rope(want.data(), 5, 3, 120, 40, 24, 16, pos.data(), inv_freq, 1.3, inter);
    auto vd = dev(v);
    Buf<int64_t> pd(*gpu_, pos);
    gpu_->rope(vd.data(), 5, 3, 120, 40, 24, 16, pd.data(), inv_freq, 1.3, inter);
    expect_close(vd.host(), want, kF32Tol, fmt::format("rope interleaved={}", inter));
  }
  {
    auto y = randn(1001), a = randn(1001);
    auto want = y;
    cpu_.add(want.data(), a.data(), 1001);
    auto yd = dev(y), ad = dev(a);
    gpu_->add(yd.data(), ad.data(), 1001);
    EXPECT_EQ(yd.host(), want);
  }
  {
    const auto src = randn(9 * 13);
    const std::vector<int64_t> rows = {8, 0, 3, 3};
    std::vector<float> want(4 * 13);
    cpu_.gather_rows(src.data(), rows.data(), 4, 13, want.data());
    auto sd = dev(src);
    Buf<int64_t> rd(*gpu_, rows);
    auto od = poisoned(4 * 13);
    gpu_->gather_rows(sd.data(), rd.data(), 4, 13, od.data());
    EXPECT_EQ(od.host(), want);
  }
  {
    const Linear& table = make_linear(WeightFormat::dense, 50, 37, "embed");
    gpu_->prepare_embed(*table.weight);
    const std::vector<int32_t> ids = {49, 0, 7, 7, 31};
    std::vector<float> want(5 * 37);
    cpu_.embed(*table.weight, ids.data(), 5, want.data());
    Buf<int32_t> idd(*gpu_, ids);
    auto od = poisoned(5 * 37);
    gpu_->embed(*table.weight, idd.data(), 5, od.data());
    EXPECT_EQ(od.host(), want);  // bf16 table: exact
  }
}

ModelConfig router_config(ScoringFunc f, TopkMethod m, int64_t E, int64_t K, int64_t G, int64_t TG) {
  ModelConfig c;
  c.n_routed_experts = E;
  c.num_experts_per_tok = K;
  c.n_group = G;
  c.topk_group = TG;
  c.scoring_func = f;
  c.topk_method = m;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.827;
  return c;
}

TEST_F(CudaOps, router_choices_are_identical_and_weights_match) {
  struct Case { ScoringFunc f; TopkMethod m; int64_t E, K, G, TG; };
  for (Case c : {Case{ScoringFunc::sigmoid, TopkMethod::noaux_tc, 384, 8, 1, 1},
                 Case{ScoringFunc::sigmoid, TopkMethod::noaux_tc, 256, 8, 8, 4},
                 Case{ScoringFunc::softmax, TopkMethod::greedy, 64, 6, 1, 1},
                 Case{ScoringFunc::softmax, TopkMethod::group_limited_greedy, 160, 6, 8, 3}}) {
    const auto cfg = router_config(c.f, c.m, c.E, c.K, c.G, c.TG);
    const int64_t n = 133;
    const auto logits = randn(n * c.E, 2.0f);
    const auto bias = c.m == TopkMethod::noaux_tc ? randn(c.E, 0.1f) : std::vector<float>{};
    std::vector<int32_t> idx(n * c.K);
    std::vector<float> wt(n * c.K);
    cpu_.route(cfg, logits.data(), bias, n, idx.data(), wt.data());
    auto ld = dev(logits);
    Buf<int32_t> id(*gpu_, n * c.K);
    auto wd = poisoned(n * c.K);
    gpu_->route(cfg, ld.data(), bias, n, id.data(), wd.data());
    EXPECT_EQ(id.host(), idx) << "E=" << c.E << " G=" << c.G;
    expect_close(wd.host(), wt, kF32Tol, fmt::format("route E={} K={} G={}", c.E, c.K, c.G));
  }
}

TEST_F(CudaOps, mlp_and_grouped_moe_experts_in_every_format) {
  const int64_t H = 136, I = 72, E = 16, K = 4;
  for (auto wf : kFormats) {
    MlpWeights mlp{make_linear(wf, I, H), make_linear(wf, I, H), make_linear(wf, H, I)};
    gpu_->prepare_linear(mlp.gate);
    gpu_->prepare_linear(mlp.up);
    gpu_->prepare_linear(mlp.down);
    MoeWeights moe;
    moe.router = make_linear(WeightFormat::dense, E, H, "router");
    for (int64_t e = 0; e < E; ++e) moe.experts.push_back({make_linear(wf, I, H), make_linear(wf, I, H), make_linear(wf, H, I)});
    gpu_->prepare_moe(moe);
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    for (int64_t n : {1, 3, 70}) {
      const auto x = randn(n * H);
      std::vector<float> want(n * H);
      cpu_.mlp(mlp, x.data(), n, want.data());
      auto xd = dev(x);
      auto od = poisoned(n * H);
      gpu_->mlp(mlp, xd.data(), n, od.data());
      expect_close(od.host(), want, kChainTol, fmt::format("mlp {} n={}", format_name(wf), n));

      // the router's logits in fp32 (as the reference computes them), then experts
      std::vector<float> rl(n * E);
      cpu_.linear(moe.router, x.data(), n, rl.data());
      auto rd = poisoned(n * E);
      gpu_->linear(moe.router, xd.data(), n, rd.data());
      expect_close(rd.host(), rl, kF32Tol, fmt::format("router logits (fp32) n={}", n));
      std::vector<int32_t> idx(n * K);
      std::vector<float> wt(n * K);
      cpu_.route(cfg, rl.data(), {}, n, idx.data(), wt.data());
      std::vector<float> want_moe(n * H);
      cpu_.moe_experts(moe, x.data(), n, K, idx.data(), wt.data(), want_moe.data());
      Buf<int32_t> id(*gpu_, idx);
      auto wd = dev(wt);
      auto md = poisoned(n * H);
      gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), md.data());
      expect_close(md.host(), want_moe, kChainTol, fmt::format("moe {} n={}", format_name(wf), n));
    }
  }
}

TEST_F(CudaOps, mla_attention_expanded_and_absorbed_over_the_latent_cache) {
  ModelConfig cfg;
  cfg.num_attention_heads = 3;
  cfg.qk_nope_head_dim = 32;
  cfg.qk_rope_head_dim = 16;
  cfg.v_head_dim = 24;
  cfg.kv_lora_rank = 72;
  cfg.num_hidden_layers = 2;
  const int64_t nh = 3, dq = 48, dv = 24, C = 72, dr = 16;
  for (auto wf : kFormats) {
    AttentionWeights a;
    a.kv_a_proj = make_linear(wf, C + dr, 40);
    a.kv_b_proj = make_linear(wf, nh * (32 + dv), C);
    a.o_proj = make_linear(wf, 40, nh * dv);
    a.q_proj = make_linear(wf, nh * dq, 40);
    gpu_->prepare_attention(cfg, a);
    auto append = [&](KvState& ck, KvState& gk, int64_t n) {
      const auto ckv = randn(n * (C + dr));
      std::vector<float> lat(n * C);
      for (int64_t t = 0; t < n; ++t) std::copy(ckv.begin() + t * (C + dr), ckv.begin() + t * (C + dr) + C, lat.begin() + t * C);
      // the device cache holds bf16: give both sides bf16-representable values so only the math differs
      std::vector<float> ckv_r = ckv, lat_r = lat;
      for (auto& v : ckv_r) v = bf16_to_f32(f32_to_bf16(v));
      for (auto& v : lat_r) v = bf16_to_f32(f32_to_bf16(v));
      cpu_.kv_append(ck, 1, lat_r.data(), ckv_r.data(), 0, n, C, dr);
      auto cd = dev(ckv_r), ld = dev(lat_r);
      gpu_->kv_append(gk, 1, ld.data(), cd.data(), 0, n, C, dr);
    };
    for (bool absorbed : {false, true}) {
      // new tokens: 3 for seq 0 (after 5 cached), 4 for seq 1 — appended then attended
      auto c0 = cpu_.new_kv(cfg), c1 = cpu_.new_kv(cfg);
      auto g0 = gpu_->new_kv(cfg), g1 = gpu_->new_kv(cfg);
      rng_.seed(99);
      append(*c0, *g0, 5);
      append(*c0, *g0, 3);
      append(*c1, *g1, 4);
      const int64_t N = 7;
      const auto q = randn(N * nh * dq);
      std::vector<AttnSeq> cs = {{0, 3, 5, c0.get(), 1, absorbed}, {3, 4, 0, c1.get(), 1, absorbed}};
      std::vector<AttnSeq> gs = {{0, 3, 5, g0.get(), 1, absorbed}, {3, 4, 0, g1.get(), 1, absorbed}};
      std::vector<float> want(N * nh * dv);
      cpu_.mla_attention(cfg, a, q.data(), cs, 0.17f, want.data());
      auto qd = dev(q);
      auto od = poisoned(N * nh * dv);
      gpu_->mla_attention(cfg, a, qd.data(), gs, 0.17f, od.data());
      // kv_b_proj rounded to bf16 on the device, contracted with the cache: one matmul's tolerance, twice
      expect_close(od.host(), want, kChainTol, fmt::format("mla {} {}", format_name(wf), absorbed ? "absorbed" : "expanded"));
    }
  }
}

}  // namespace
