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

#include <cmath>
#include <cstdlib>
#include <deque>
#include <limits>
#include <condition_variable>
#include <mutex>
#include <random>
#include <set>

#include "backend/cpu/cpu_backend.hpp"
#include "interp/capture.hpp"
#include "interp/intervention.hpp"
#include "runtime/engine.hpp"
#include "runtime/generate.hpp"
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
  // With f32_scales, INT4 scales are stored as F32 values off the bf16 grid (the few-row matmul's fp32 path).
  const Linear& make_linear(WeightFormat fmt, int64_t out, int64_t in, const std::string& name = "w",
                            bool f32_scales = false) {
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
      if (f32_scales) {
        h.s.resize(sc.size() * 4);
        for (size_t i = 0; i < sc.size(); ++i) {
          const float f = bf16_to_f32(sc[i]) * (1.0f + 1.0f / 4096);
          std::memcpy(h.s.data() + 4 * i, &f, 4);
        }
      } else {
        h.s.resize(sc.size() * 2);
        std::memcpy(h.s.data(), sc.data(), h.s.size());
      }
      h.wt.dtype = DType::I32;
      h.wt.shape = {out, (in + 7) / 8};
      h.st.dtype = f32_scales ? DType::F32 : DType::BF16;
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

  // E experts [I, H] in one format and a dense router, prepared on the device where they lie (the backend knows
  // them by address)
  void make_moe(MoeWeights& moe, WeightFormat wf, int64_t H, int64_t I, int64_t E) {
    moe.router = make_linear(WeightFormat::dense, E, H, "router");
    for (int64_t e = 0; e < E; ++e) moe.experts.push_back({make_linear(wf, I, H), make_linear(wf, I, H), make_linear(wf, H, I)});
    gpu_->prepare_moe(moe);
  }

  // gate/up [I, H] and down [H, I] in one format, prepared on the device where they lie (known by address)
  void make_mlp(MlpWeights& mlp, WeightFormat wf, int64_t H, int64_t I) {
    mlp = MlpWeights{make_linear(wf, I, H), make_linear(wf, I, H), make_linear(wf, H, I)};
    gpu_->prepare_linear(mlp.gate);
    gpu_->prepare_linear(mlp.up);
    gpu_->prepare_linear(mlp.down);
  }

  // host -> device, NaN-poisoned device output of n floats, device -> host
  Buf<float> dev(const std::vector<float>& v) { return Buf<float>(*gpu_, v); }
  Buf<float> poisoned(int64_t n) {
    Buf<float> b(*gpu_, n);
    gpu_->fill(b.data(), NAN, n);
    return b;
  }

  // MLA attention weights of cfg's shapes in one format (hidden size `hidden`), prepared on the device where they
  // lie (the backend knows them by address)
  void make_attention(AttentionWeights& a, const ModelConfig& cfg, WeightFormat wf, int64_t hidden) {
    const int64_t nh = cfg.num_attention_heads, dn = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim;
    const int64_t dv = cfg.v_head_dim, C = cfg.kv_lora_rank;
    a.kv_a_proj = make_linear(wf, C + dr, hidden);
    a.kv_b_proj = make_linear(wf, nh * (dn + dv), C);
    a.o_proj = make_linear(wf, hidden, nh * dv);
    a.q_proj = make_linear(wf, nh * (dn + dr), hidden);
    gpu_->prepare_attention(cfg, a);
  }

  // n random cache rows (latent C + rope dr) appended to a CPU and a device cache at `layer`, in bf16-representable
  // values (the device cache holds bf16), so only the attention math differs
  void append_latents(KvState& ck, KvState& gk, int64_t layer, int64_t n, int64_t C, int64_t dr) {
    auto ckv = randn(n * (C + dr));
    for (auto& v : ckv) v = bf16_to_f32(f32_to_bf16(v));
    std::vector<float> lat(n * C);
    for (int64_t t = 0; t < n; ++t) std::copy(ckv.begin() + t * (C + dr), ckv.begin() + t * (C + dr) + C, lat.begin() + t * C);
    cpu_.kv_append(ck, layer, lat.data(), ckv.data(), 0, n, C, dr);
    auto cd = dev(ckv), ld = dev(lat);
    gpu_->kv_append(gk, layer, ld.data(), cd.data(), 0, n, C, dr);
  }

  // Two sequences for an attention call: sequence 0 with `past` cached tokens then n0 new ones (query rows
  // [0, n0)), sequence 1 with n1 new ones and no past (rows [n0, n0 + n1)); the same random latents in the CPU's
  // caches and the device's, at `layer`
  struct TwoSeqs {
    std::unique_ptr<KvState> c0, c1, g0, g1;
    std::vector<AttnSeq> cs, gs;
  };
  TwoSeqs two_sequences(const ModelConfig& cfg, int64_t layer, int64_t past, int64_t n0, int64_t n1, bool absorbed,
                        uint32_t seed) {
    const int64_t C = cfg.kv_lora_rank, dr = cfg.qk_rope_head_dim;
    TwoSeqs t{cpu_.new_kv(cfg), cpu_.new_kv(cfg), gpu_->new_kv(cfg), gpu_->new_kv(cfg), {}, {}};
    rng_.seed(seed);
    append_latents(*t.c0, *t.g0, layer, past, C, dr);
    append_latents(*t.c0, *t.g0, layer, n0, C, dr);
    append_latents(*t.c1, *t.g1, layer, n1, C, dr);
    t.cs = {{0, n0, past, t.c0.get(), layer, absorbed}, {n0, n1, 0, t.c1.get(), layer, absorbed}};
    t.gs = {{0, n0, past, t.g0.get(), layer, absorbed}, {n0, n1, 0, t.g1.get(), layer, absorbed}};
    return t;
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
ModelConfig router_config(ScoringFunc f, TopkMethod m, int64_t E, int64_t K, int64_t G, int64_t TG);

// Routing of n tokens skewed so that expert 0 takes every token (the others share the rest) and, by skewed_moe,
// the CPU's MoE output for it
struct SkewedMoe {
  std::vector<int32_t> idx;
  std::vector<float> wt, want;
};
SkewedMoe skewed_routing(CpuBackend& cpu, const MoeWeights& moe, const ModelConfig& cfg, const std::vector<float>& x, int64_t n) {
  const int64_t E = cfg.n_routed_experts, K = cfg.num_experts_per_tok;
  SkewedMoe r{std::vector<int32_t>(n * K), std::vector<float>(n * K), {}};
  std::vector<float> rl(n * E);
  cpu.linear(moe.router, x.data(), n, rl.data());
  for (int64_t t = 0; t < n; ++t) rl[t * E] += 4.0f;
  cpu.route(cfg, rl.data(), {}, n, r.idx.data(), r.wt.data());
  return r;
}
SkewedMoe skewed_moe(CpuBackend& cpu, const MoeWeights& moe, const ModelConfig& cfg, const std::vector<float>& x, int64_t n) {
  SkewedMoe r = skewed_routing(cpu, moe, cfg, x, n);
  r.want.resize(n * moe.router.in);
  cpu.moe_experts(moe, x.data(), n, cfg.num_experts_per_tok, r.idx.data(), r.wt.data(), r.want.data());
  return r;
}

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

// The pipelined matmul (aligned shapes) runs the same chain of tensor-core operations per output element as the
// single-stage one: the same bits, whatever the format, batch or grouping.
TEST_F(CudaOps, pipelined_matmul_gives_the_bits_of_the_single_stage_one) {
  struct Shape { int64_t out, in; };
  for (auto wf : kFormats)
    for (Shape sh : {Shape{200, 512}, Shape{64, 1024}, Shape{130, 256}})
      for (int64_t n : {1, 5, 67}) {
        const Linear& l = make_linear(wf, sh.out, sh.in);
        gpu_->prepare_linear(l);
        auto xd = dev(randn(n * sh.in));
        auto y1 = poisoned(n * sh.out), y2 = poisoned(n * sh.out);
        CudaBackend::force_simple_gemm(true);
        gpu_->linear(l, xd.data(), n, y1.data());
        CudaBackend::force_simple_gemm(false);
        CudaBackend::force_few_rows(false);  // the tile kernels, also for few rows
        gpu_->linear(l, xd.data(), n, y2.data());
        CudaBackend::force_few_rows(true);
        EXPECT_EQ(y1.host(), y2.host()) << format_name(wf) << " " << sh.out << "x" << sh.in << " n=" << n;
      }
  const int64_t H = 256, I = 128, E = 16, K = 4;
  for (auto wf : kFormats) {
    MoeWeights moe;
    make_moe(moe, wf, H, I, E);
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    for (int64_t n : {1, 9, 100}) {
      const auto x = randn(n * H);
      std::vector<float> rl(n * E), wt(n * K);
      std::vector<int32_t> idx(n * K);
      cpu_.linear(moe.router, x.data(), n, rl.data());
      cpu_.route(cfg, rl.data(), {}, n, idx.data(), wt.data());
      auto xd = dev(x), wd = dev(wt);
      Buf<int32_t> id(*gpu_, idx);
      auto m1 = poisoned(n * H), m2 = poisoned(n * H);
      CudaBackend::force_simple_gemm(true);
      gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), m1.data());
      CudaBackend::force_simple_gemm(false);
      CudaBackend::force_few_rows(false);
      gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), m2.data());
      CudaBackend::force_few_rows(true);
      EXPECT_EQ(m1.host(), m2.host()) << "moe " << format_name(wf) << " n=" << n;
    }
  }
}

// The streamed-weight matmul (every shape whose K is a multiple of its stage: weights straight into mma fragments,
// dequantized in registers) against the CPU reference in every format, with output counts that are not a multiple
// of its 16-feature tiles, K split over blocks for narrow matrices, INT4 scales on and off the bf16 grid, and 1 to
// 67 rows (1-3 row tiles of 32). A row's result is the same bits whatever other rows come with it, in a dense matmul
// and in the MoE experts (where the rows of an expert come from other tokens).
TEST_F(CudaOps, streamed_matmul_matches_the_cpu_and_does_not_depend_on_the_other_rows) {
  struct Shape { int64_t out, in; bool f32_scales; };
  for (auto wf : kFormats)
    for (Shape sh : {Shape{200, 512, false}, Shape{13, 4096, false}, Shape{130, 1536, false}, Shape{77, 1024, true}}) {
      if (sh.f32_scales && wf != WeightFormat::int4_group) continue;
      const Linear& l = make_linear(wf, sh.out, sh.in, "w", sh.f32_scales);
      gpu_->prepare_linear(l);
      const auto x = randn(67 * sh.in);
      auto xd = dev(x);
      std::vector<float> first;
      for (int64_t n : {1, 3, 8, 9, 17, 32, 33, 67}) {
        std::vector<float> want(n * sh.out);
        cpu_.linear(l, x.data(), n, want.data());
        auto yd = poisoned(n * sh.out);
        gpu_->linear(l, xd.data(), n, yd.data());
        const auto got = yd.host();
        expect_close(got, want, kMatmulTol,
                     fmt::format("streamed {} {}x{}{} n={}", format_name(wf), sh.out, sh.in, sh.f32_scales ? " f32 scales" : "", n));
        const std::vector<float> row0(got.begin(), got.begin() + sh.out);
        if (first.empty()) first = row0;
        EXPECT_EQ(row0, first) << "row 0 changed with " << n << " rows";
      }
    }
  // MLP (gate and up in one launch, K split) and MoE experts at aligned shapes, with routing skewed so that expert 0
  // takes every token (up to 300 rows: 10 streamed row tiles, 3 of the tile kernel) while the others share the
  // rest (tiles of every size: 1-8, 9-16 and 17-32 rows); on the streamed kernel alone (one launch per tile size,
  // and as one launch), and (from 40 tokens) on the many-row tile kernel, which must give its bits. 1100 tokens take
  // moe_permute's many-slot path (count, scan, scatter launches), whose tile lists must be as complete
  struct Restore {
    ~Restore() { CudaBackend::set_tile_rows(-1, -1); }
  } restore;
  const int64_t H = 512, I = 256, E = 16, K = 4;
  for (auto wf : kFormats) {
    MlpWeights mlp;
    make_mlp(mlp, wf, H, I);
    MoeWeights moe;
    make_moe(moe, wf, H, I, E);
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    for (int64_t n : {1, 5, 40, 120, 300, 1100}) {  // 1100 x 4 slots: the permutation's many-slot path (over 4096)
      CudaBackend::set_tile_rows(0, 0);
      const auto x = randn(n * H);
      auto xd = dev(x);
      std::vector<float> want(n * H);
      cpu_.mlp(mlp, x.data(), n, want.data());
      auto od = poisoned(n * H);
      gpu_->mlp(mlp, xd.data(), n, od.data());
      const auto mlp_got = od.host();
      expect_close(mlp_got, want, kChainTol, fmt::format("streamed mlp {} n={}", format_name(wf), n));
      if (n >= 40) {
        auto ot = poisoned(n * H);
        CudaBackend::set_tile_rows(1, 1);
        gpu_->mlp(mlp, xd.data(), n, ot.data());
        CudaBackend::set_tile_rows(0, 0);
        EXPECT_EQ(ot.host(), mlp_got) << "tile mlp " << format_name(wf) << " n=" << n;
      }
      const auto [idx, wt, want_moe] = skewed_moe(cpu_, moe, cfg, x, n);
      Buf<int32_t> id(*gpu_, idx);
      auto wd = dev(wt);
      auto md = poisoned(n * H);
      gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), md.data());
      const auto got = md.host();
      expect_close(got, want_moe, kChainTol, fmt::format("streamed moe {} n={}", format_name(wf), n));
      {  // one launch sized for the most rows instead of one per tile size, and tiles of at most 16 rows: the same bits
        auto mo = poisoned(n * H);
        CudaBackend::set_few_by_rows(false);
        gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), mo.data());
        CudaBackend::set_few_by_rows(true);
        EXPECT_EQ(mo.host(), got) << "moe " << format_name(wf) << " n=" << n << ": one streamed launch vs one per tile size";
        {  // the launches per tile size each after the one before it, not (the default) after the first beside the
           // ones before it (the same bits; a missing wait in the default would show as rows read or combined too early)
          auto ml = poisoned(n * H);
          CudaBackend::set_few_late(false);
          gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), ml.data());
          CudaBackend::set_few_late(true);
          EXPECT_EQ(ml.host(), got) << "moe " << format_name(wf) << " n=" << n << ": tile-size launches beside each other or not";
        }
        for (int piece : {32, 16, 8}) {  // tiles of at most 32 rows, 16 (no 32-row launch), or 8 (one launch)
          auto mp = poisoned(n * H);
          CudaBackend::set_few_piece(piece);
          gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), mp.data());
          CudaBackend::set_few_piece(-1);
          EXPECT_EQ(mp.host(), got) << "moe " << format_name(wf) << " n=" << n << ": tiles of " << piece << " rows vs the default";
        }
        const int wide0 = CudaBackend::few_wide();
        for (int wide : {0, 6}) {  // the 9-32-row launches in 8-warp blocks of 128 features, or 4-warp ones of 64
          auto mw = poisoned(n * H);
          CudaBackend::set_few_wide(wide);
          gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), mw.data());
          CudaBackend::set_few_wide(wide0);
          EXPECT_EQ(mw.host(), got) << "moe " << format_name(wf) << " n=" << n << ": wide blocks " << wide;
        }
      }
      if (n >= 40) {
        auto mt = poisoned(n * H);
        CudaBackend::set_tile_rows(1, 1);
        gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), mt.data());
        CudaBackend::set_tile_rows(0, 0);
        EXPECT_EQ(mt.host(), got) << "tile moe " << format_name(wf) << " n=" << n;
      }
      // the last token alone, with its routing: the same bits as in the batch
      auto x1 = dev(std::vector<float>(x.end() - H, x.end()));
      Buf<int32_t> id1(*gpu_, std::vector<int32_t>(idx.end() - K, idx.end()));
      auto wd1 = dev(std::vector<float>(wt.end() - K, wt.end()));
      auto m1 = poisoned(H);
      gpu_->moe_experts(moe, x1.data(), 1, K, id1.data(), wd1.data(), m1.data());
      EXPECT_EQ(m1.host(), std::vector<float>(got.end() - H, got.end())) << "moe " << format_name(wf) << ": token alone vs in " << n;
    }
  }
}

// The expert launches of 9-16 and 17-32 rows per tile in 8-warp blocks of 128 output features (set_few_wide) give
// the bits of 4-warp blocks of 64 and match the CPU, also where an expert's width (192) leaves a half-filled 128-feature
// tile; expert 0 takes every token (tiles of 32 rows and a partial one), the others 8-60 rows each
TEST_F(CudaOps, wide_expert_blocks_give_the_narrow_ones_bits_at_partial_feature_tiles) {
  const int wide0 = CudaBackend::few_wide();
  struct Restore {
    int w;
    ~Restore() {
      CudaBackend::set_few_wide(w);
      CudaBackend::set_tile_rows(-1, -1);
    }
  } restore{wide0};
  CudaBackend::set_tile_rows(0, 0);  // the streamed kernel for every row count
  const int64_t H = 512, I = 192, E = 16, K = 4;
  for (auto wf : {WeightFormat::fp8_block, WeightFormat::int4_group}) {
    MoeWeights moe;
    make_moe(moe, wf, H, I, E);
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    for (int64_t n : {40, 300}) {
      const auto x = randn(n * H);
      auto xd = dev(x);
      const auto [idx, wt, want] = skewed_moe(cpu_, moe, cfg, x, n);
      Buf<int32_t> id(*gpu_, idx);
      auto wd = dev(wt);
      std::vector<float> got[2];
      for (int w : {0, 1}) {
        CudaBackend::set_few_wide(w ? 6 : 0);
        auto md = poisoned(n * H);
        gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), md.data());
        got[w] = md.host();
      }
      expect_close(got[1], want, kChainTol, fmt::format("wide moe {} n={}", format_name(wf), n));
      EXPECT_EQ(got[1], got[0]) << "moe " << format_name(wf) << " n=" << n << ": 8-warp blocks vs 4-warp";
    }
  }
}

// The many-row matmul runs the streamed kernel's chain of operations per output element, on the mma.sync tile
// kernel (k_gemm_tile) and on the warpgroup-MMA one (k_gemm_wg: 64/128/256 rows per block, X staged
// in the k order of the streamed kernel's fragments). Made to take everything it can (set_tile_rows(1, 1)) each must
// give the streamed kernel's bits (set_tile_rows(0, 0)) in every format: dense matrices with K split (13 and 130
// wide: 16 and 6 parts; 300x7168: 5 uneven parts) and whole, widths that leave partial 128-feature and 16-feature
// tiles, INT4 scales off the bf16 grid, row counts that leave partial 64/128/256-row tiles; and match the CPU. Then
// the gate/up pair and the MoE experts (a group spanning several row tiles, the others a few rows each) on each.
// A K-split launch (13 outputs x 4096 inputs: the streamed kernel splits K over blocks) takes tile counters for its
// stream; a destroyed backend frees its stream's, and a new backend's split launches count from zero again
TEST_F(CudaOps, a_destroyed_backend_frees_its_split_counters) {
  const Linear& l = make_linear(WeightFormat::dense, 13, 4096);
  const auto x = randn(4096);
  std::vector<float> want(13);
  cpu_.linear(l, x.data(), 1, want.data());
  const size_t before = CudaBackend::split_counter_streams();
  for (int round = 0; round < 2; ++round) {
    {
      auto be = std::make_shared<CudaBackend>(0);
      be->prepare_linear(l);
      Buf<float> xd(*be, x), yd(*be, 13);
      be->linear(l, xd.data(), 1, yd.data());
      expect_close(yd.host(), want, kMatmulTol, fmt::format("split matmul on a new backend, round {}", round));
      EXPECT_EQ(CudaBackend::split_counter_streams(), before + 1) << "the split launch took no counters of its own";
    }
    EXPECT_EQ(CudaBackend::split_counter_streams(), before) << "a destroyed backend kept its stream's counters";
  }
}

TEST_F(CudaOps, tile_matmul_gives_the_bits_of_the_streamed_one) {
  struct Restore {
    ~Restore() {
      CudaBackend::set_tile_rows(-1, -1);
      CudaBackend::set_wg_gemm(true, 0);
    }
  } restore;
  struct Kernel { bool wg; int rows; const char* name; };
  const Kernel kernels[] = {{false, 0, "mma.sync tile"}, {true, 0, "wgmma"}, {true, 64, "wgmma 64 rows"},
                            {true, 128, "wgmma 128 rows"}, {true, 256, "wgmma 256 rows"}};
  struct Shape { int64_t out, in; bool f32_scales; };
  for (auto wf : kFormats)
    for (Shape sh : {Shape{200, 512, false}, Shape{13, 4096, false}, Shape{130, 1536, false}, Shape{77, 1024, true},
                     Shape{300, 7168, false}}) {
      if (sh.f32_scales && wf != WeightFormat::int4_group) continue;
      const Linear& l = make_linear(wf, sh.out, sh.in, "w", sh.f32_scales);
      gpu_->prepare_linear(l);
      const auto x = randn(300 * sh.in);
      auto xd = dev(x);
      for (int64_t n : {1, 9, 130, 300}) {
        auto y1 = poisoned(n * sh.out);
        CudaBackend::set_tile_rows(0, 0);
        gpu_->linear(l, xd.data(), n, y1.data());
        const auto streamed = y1.host();
        for (const Kernel& k : kernels) {
          const std::string what = fmt::format("{} {} {}x{}{} n={}", k.name, format_name(wf), sh.out, sh.in,
                                               sh.f32_scales ? " f32 scales" : "", n);
          auto y2 = poisoned(n * sh.out);
          CudaBackend::set_wg_gemm(k.wg, k.rows);
          CudaBackend::set_tile_rows(1, 1);
          gpu_->linear(l, xd.data(), n, y2.data());
          CudaBackend::set_tile_rows(0, 0);
          const auto got = y2.host();
          EXPECT_EQ(got, streamed) << what;
          if (sh.in <= 1536 && !k.wg) {
            std::vector<float> want(n * sh.out);
            cpu_.linear(l, x.data(), n, want.data());
            expect_close(got, want, kMatmulTol, what);
          }
        }
      }
    }
  const int64_t H = 512, I = 256, E = 16, K = 4;
  for (auto wf : kFormats) {
    MlpWeights mlp;
    make_mlp(mlp, wf, H, I);
    MoeWeights moe;
    make_moe(moe, wf, H, I, E);
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    for (int64_t n : {3, 70, 300}) {  // 3 tokens: 12 routed rows over 16 experts, most groups empty
      const auto x = randn(n * H);
      auto xd = dev(x);
      const auto [idx, wt, unused] = skewed_routing(cpu_, moe, cfg, x, n);
      Buf<int32_t> id(*gpu_, idx);
      auto wd = dev(wt);
      CudaBackend::set_tile_rows(0, 0);
      auto od = poisoned(n * H), md = poisoned(n * H);
      gpu_->mlp(mlp, xd.data(), n, od.data());
      gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), md.data());
      const auto mlp_streamed = od.host(), moe_streamed = md.host();
      for (const Kernel& k : kernels) {
        auto ot = poisoned(n * H), mt = poisoned(n * H);
        CudaBackend::set_wg_gemm(k.wg, k.rows);
        CudaBackend::set_tile_rows(1, 0.01);  // grouped: from 0.01 rows per expert, i.e. always
        gpu_->mlp(mlp, xd.data(), n, ot.data());
        gpu_->moe_experts(moe, xd.data(), n, K, id.data(), wd.data(), mt.data());
        CudaBackend::set_tile_rows(0, 0);
        EXPECT_EQ(ot.host(), mlp_streamed) << k.name << " mlp " << format_name(wf) << " n=" << n;
        EXPECT_EQ(mt.host(), moe_streamed) << k.name << " moe " << format_name(wf) << " n=" << n;
      }
    }
  }
}

// The norms' bf16 copy (rmsnorm_bf16) is exactly bf16 of their fp32 output, and the matmuls fed with it
// (linear_bf16, mlp_bf16) give the bits of the same matmuls converting their fp32 input themselves.
TEST_F(CudaOps, the_norms_bf16_copy_feeds_the_matmuls_the_bits_of_their_own_conversion) {
  ASSERT_TRUE(gpu_->bf16_inputs());
  struct Norm { int64_t n, d, ld; };
  for (Norm c : {Norm{1, 512, 512}, Norm{5, 512, 576}, Norm{40, 256, 256}, Norm{3, 7168, 7168}}) {
    const auto x = randn(c.n * c.ld), w = randn(c.d);
    auto xd = dev(x);
    auto o1 = poisoned(c.n * c.d), o2 = poisoned(c.n * c.d);
    Buf<uint16_t> o16(*gpu_, c.n * c.d);
    gpu_->rmsnorm(xd.data(), w, c.n, c.d, 1e-6f, o1.data(), c.ld);
    gpu_->rmsnorm_bf16(xd.data(), w, c.n, c.d, 1e-6f, o2.data(), o16.data(), c.ld);
    const auto f = o1.host();
    EXPECT_EQ(o2.host(), f) << "rmsnorm_bf16's fp32 output, d=" << c.d;
    std::vector<uint16_t> want(f.size());
    for (size_t i = 0; i < f.size(); ++i) want[i] = f32_to_bf16(f[i]);
    EXPECT_EQ(o16.host(), want) << "rmsnorm_bf16's bf16 copy, d=" << c.d << " ld=" << c.ld;
    if (c.d == 7168) continue;
    for (auto wf : kFormats) {
      const Linear& l = make_linear(wf, 200, c.d);
      gpu_->prepare_linear(l);
      auto y1 = poisoned(c.n * 200), y2 = poisoned(c.n * 200);
      gpu_->linear(l, o1.data(), c.n, y1.data());
      gpu_->linear_bf16(l, o1.data(), o16.data(), c.n, y2.data());
      EXPECT_EQ(y1.host(), y2.host()) << "linear_bf16 " << format_name(wf) << " d=" << c.d << " n=" << c.n;
      MlpWeights mlp;
      make_mlp(mlp, wf, c.d, 256);
      auto m1 = poisoned(c.n * c.d), m2 = poisoned(c.n * c.d);
      gpu_->mlp(mlp, o1.data(), c.n, m1.data());
      gpu_->mlp_bf16(mlp, o1.data(), o16.data(), c.n, m2.data());
      EXPECT_EQ(m1.host(), m2.host()) << "mlp_bf16 " << format_name(wf) << " d=" << c.d << " n=" << c.n;
    }
  }
}

// The residual add with the norm after it in one launch: the bits of add() then rmsnorm_bf16(), the summed rows
// written back, at K2's width (row in shared memory), an odd width and rows too wide for shared memory and for the
// weights the kernel holds in registers (13001 > 8 × 1024), with and without the bf16 copy; and the CPU's add then
// norm beside it.
TEST_F(CudaOps, the_residual_add_fused_with_the_norm_gives_the_bits_of_the_two_apart) {
  struct Norm { int64_t n, d; };
  for (Norm c : {Norm{1, 7168}, Norm{9, 7168}, Norm{7, 203}, Norm{40, 512}, Norm{2, 13001}}) {
    const auto h = randn(c.n * c.d), y = randn(c.n * c.d, 2.0f), w = randn(c.d);
    for (bool with16 : {true, false}) {
      auto h1 = dev(h), h2 = dev(h), yd = dev(y);
      auto o1 = poisoned(c.n * c.d), o2 = poisoned(c.n * c.d);
      Buf<uint16_t> b1(*gpu_, c.n * c.d), b2(*gpu_, c.n * c.d);
      gpu_->add(h1.data(), yd.data(), c.n * c.d);
      gpu_->rmsnorm_bf16(h1.data(), w, c.n, c.d, 1e-6f, o1.data(), with16 ? b1.data() : nullptr);
      gpu_->add_rmsnorm_bf16(h2.data(), yd.data(), w, c.n, c.d, 1e-6f, o2.data(), with16 ? b2.data() : nullptr);
      const std::string what = fmt::format("n={} d={} bf16 copy {}", c.n, c.d, with16);
      EXPECT_EQ(h2.host(), h1.host()) << "the summed residual, " << what;
      EXPECT_EQ(o2.host(), o1.host()) << "the norm, " << what;
      if (with16) {
        EXPECT_EQ(b2.host(), b1.host()) << "the bf16 copy, " << what;
      }
      auto hc = h;
      std::vector<float> oc(c.n * c.d);
      cpu_.add_rmsnorm_bf16(hc.data(), y.data(), w, c.n, c.d, 1e-6f, oc.data(), nullptr);
      EXPECT_EQ(h2.host(), hc) << "the summed residual against the CPU, " << what;
      expect_close(o2.host(), oc, kF32Tol, "the norm against the CPU, " + what);
    }
  }
}

TEST_F(CudaOps, rmsnorm_rope_add_gather_embed) {
  // RMSNorm at an odd width (strided rows too), Kimi-K2's hidden width, its kv_a rows (512 of 576) and a row too
  // wide for shared memory (read twice from global memory)
  struct Norm { int64_t n, d, ld; };
  for (Norm c : {Norm{7, 203, 203}, Norm{7, 203, 208}, Norm{3, 7168, 7168}, Norm{4, 512, 576}, Norm{2, 13001, 13001}}) {
    const auto x = randn(c.n * c.ld), w = randn(c.d);
    std::vector<float> want(c.n * c.d);
    cpu_.rmsnorm(x.data(), w, c.n, c.d, 1e-6f, want.data(), c.ld);
    auto xd = dev(x);
    auto od = poisoned(c.n * c.d);
    gpu_->rmsnorm(xd.data(), w, c.n, c.d, 1e-6f, od.data(), c.ld);
    expect_close(od.host(), want, kF32Tol, fmt::format("rmsnorm d={} ld={}", c.d, c.ld));
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
  for (int64_t wd : {13, 64, 2052}) {  // odd widths copy by element, multiples of 4 by 16 bytes
    const auto src = randn(9 * wd);
    const std::vector<int64_t> rows = {8, 0, 3, 3};
    std::vector<float> want(4 * wd);
    cpu_.gather_rows(src.data(), rows.data(), 4, wd, want.data());
    auto sd = dev(src);
    Buf<int64_t> rd(*gpu_, rows);
    auto od = poisoned(4 * wd);
    gpu_->gather_rows(sd.data(), rd.data(), 4, wd, od.data());
    EXPECT_EQ(od.host(), want) << "gather width " << wd;
  }
  for (int64_t H : {37, 64, 2052}) {
    const Linear& table = make_linear(WeightFormat::dense, 50, H, "embed");
    gpu_->prepare_embed(*table.weight);
    const std::vector<int32_t> ids = {49, 0, 7, 7, 31};
    std::vector<float> want(5 * H);
    cpu_.embed(*table.weight, ids.data(), 5, want.data());
    Buf<int32_t> idd(*gpu_, ids);
    auto od = poisoned(5 * H);
    gpu_->embed(*table.weight, idd.data(), 5, od.data());
    EXPECT_EQ(od.host(), want) << "embed width " << H;  // bf16 table: exact
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

// The router in its four methods, and with more experts than a warp holds in registers; by one block per token (the
// default) and by one warp per token, which must give the same bits; then the router's fp32 matmul at 384 experts
// (8 warps per expert) and at a K that is not a multiple of 64 (the 4-row kernel).
TEST_F(CudaOps, router_choices_are_identical_and_weights_match) {
  struct RestoreRoute {
    ~RestoreRoute() { CudaBackend::set_route_block(true); }
  } restore_route;
  struct Case { ScoringFunc f; TopkMethod m; int64_t E, K, G, TG; bool ties = false; };
  for (Case c : {Case{ScoringFunc::sigmoid, TopkMethod::noaux_tc, 384, 8, 1, 1},
                 Case{ScoringFunc::sigmoid, TopkMethod::noaux_tc, 256, 8, 8, 4},
                 Case{ScoringFunc::softmax, TopkMethod::greedy, 64, 6, 1, 1},
                 Case{ScoringFunc::softmax, TopkMethod::group_limited_greedy, 160, 6, 8, 3},
                 Case{ScoringFunc::sigmoid, TopkMethod::noaux_tc, 600, 8, 1, 1},  // 600: past the registers' 512
                 Case{ScoringFunc::sigmoid, TopkMethod::greedy, 40, 8, 1, 1},     // a part-filled warp
                 Case{ScoringFunc::softmax, TopkMethod::greedy, 100, 40, 1, 1},   // K past a warp's 32 offers
                 Case{ScoringFunc::sigmoid, TopkMethod::greedy, 384, 8, 1, 1, true},  // many equal values
                 Case{ScoringFunc::sigmoid, TopkMethod::noaux_tc, 1100, 8, 1, 1}}) {  // past the block's 1024
    const auto cfg = router_config(c.f, c.m, c.E, c.K, c.G, c.TG);
    for (int64_t n : {int64_t{1}, int64_t{133}}) {
      auto logits = randn(n * c.E, 2.0f);
      if (c.ties)  // integers: equal choices, whose order is the lower index first
        for (auto& v : logits) v = std::round(v);
      const auto bias = c.m == TopkMethod::noaux_tc ? randn(c.E, 0.1f) : std::vector<float>{};
      std::vector<int32_t> idx(n * c.K);
      std::vector<float> wt(n * c.K);
      cpu_.route(cfg, logits.data(), bias, n, idx.data(), wt.data());
      auto ld = dev(logits);
      const auto what = fmt::format("route E={} K={} G={} n={}", c.E, c.K, c.G, n);
      Buf<int32_t> id(*gpu_, n * c.K), iw(*gpu_, n * c.K);
      auto wd = poisoned(n * c.K), ww = poisoned(n * c.K);
      gpu_->route(cfg, ld.data(), bias, n, id.data(), wd.data());
      EXPECT_EQ(id.host(), idx) << what;
      expect_close(wd.host(), wt, kF32Tol, what);
      CudaBackend::set_route_block(false);
      gpu_->route(cfg, ld.data(), bias, n, iw.data(), ww.data());
      CudaBackend::set_route_block(true);
      EXPECT_EQ(iw.host(), idx) << what << ", one warp per token";
      EXPECT_EQ(ww.host(), wd.host()) << what << ": one block vs one warp per token";
    }
  }
  {  // NaN logits (a broken input): the block router still picks K distinct experts, the numbers first
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, 384, 8, 1, 1);
    auto logits = randn(384, 2.0f);
    for (int e = 0; e < 384; e += 2) logits[e] = std::numeric_limits<float>::quiet_NaN();
    auto ld = dev(logits);
    Buf<int32_t> id(*gpu_, 8);
    auto wd = poisoned(8);
    gpu_->route(cfg, ld.data(), randn(384, 0.1f), 1, id.data(), wd.data());
    const auto got = id.host();
    EXPECT_EQ(std::set<int32_t>(got.begin(), got.end()).size(), 8u);
    for (int32_t e : got) EXPECT_TRUE(e >= 0 && e < 384 && e % 2 == 1) << "expert " << e;
  }
  // router logits (fp32 inputs): from 8 rows the tiled kernel, which must give the split kernel's bits (K 512:
  // the split kernel's path; 200: the generic one), rows that leave partial 8-row tiles, features past 384 / 8
  struct Restore {
    ~Restore() { CudaBackend::set_f32_tile(true); }
  } restore;
  for (int64_t H : {512, 200}) {
    MoeWeights moe;
    make_moe(moe, WeightFormat::dense, H, 16, 384);
    for (int64_t n : {1, 5, 9, 67, 133}) {
      const auto x = randn(n * H);
      std::vector<float> want(n * 384);
      cpu_.linear(moe.router, x.data(), n, want.data());
      auto xd = dev(x);
      auto od = poisoned(n * 384), os = poisoned(n * 384);
      gpu_->linear(moe.router, xd.data(), n, od.data());
      const auto got = od.host();
      expect_close(got, want, kF32Tol, fmt::format("router logits 384x{} n={}", H, n));
      CudaBackend::set_f32_tile(false);
      gpu_->linear(moe.router, xd.data(), n, os.data());
      CudaBackend::set_f32_tile(true);
      EXPECT_EQ(got, os.host()) << "router logits, tiled vs split kernel, 384x" << H << " n=" << n;
      // one row alone: the bits it has in the batch
      auto x1 = dev(std::vector<float>(x.end() - H, x.end()));
      auto o1 = poisoned(384);
      gpu_->linear(moe.router, x1.data(), 1, o1.data());
      EXPECT_EQ(o1.host(), std::vector<float>(got.end() - 384, got.end())) << "router logits, last row alone vs in " << n;
    }
  }
}

TEST_F(CudaOps, mlp_and_grouped_moe_experts_in_every_format) {
  const int64_t H = 136, I = 72, E = 16, K = 4;
  for (auto wf : kFormats) {
    MlpWeights mlp;
    make_mlp(mlp, wf, H, I);
    MoeWeights moe;
    make_moe(moe, wf, H, I, E);
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    // 1100 tokens: 4400 routed slots, past the one-block permutation (4096)
    for (int64_t n : {1, 3, 70, 1100}) {
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

// A shared expert of the routed experts' format and shape runs inside the expert launches (stacked as one more
// expert, added after the routed sum); one in another format (INT4 checkpoints keep it bf16) is left to mlp().
// Either way the block equals the CPU's routed experts + shared MLP, and a token alone gets its batched bits.
TEST_F(CudaOps, shared_expert_in_the_expert_launches_or_beside_them) {
  const int64_t H = 512, I = 256, E = 12, K = 3;
  struct Case { WeightFormat routed, shared; bool stacked; };
  for (Case c : {Case{WeightFormat::dense, WeightFormat::dense, true}, Case{WeightFormat::fp8_block, WeightFormat::fp8_block, true},
                 Case{WeightFormat::int4_group, WeightFormat::int4_group, true}, Case{WeightFormat::int4_group, WeightFormat::dense, false}}) {
    MoeWeights moe;
    moe.router = make_linear(WeightFormat::dense, E, H, "router");
    for (int64_t e = 0; e < E; ++e) moe.experts.push_back({make_linear(c.routed, I, H), make_linear(c.routed, I, H), make_linear(c.routed, H, I)});
    moe.shared = MlpWeights{make_linear(c.shared, I, H), make_linear(c.shared, I, H), make_linear(c.shared, H, I)};
    gpu_->prepare_moe(moe);
    const std::string what = fmt::format("shared expert, routed {} shared {}", format_name(c.routed), format_name(c.shared));
    EXPECT_EQ(gpu_->moe_includes_shared(moe), c.stacked) << what;
    const auto cfg = router_config(ScoringFunc::sigmoid, TopkMethod::noaux_tc, E, K, 1, 1);
    // 37 tokens: the one-block permutation; 1100: 4400 slots (4 per token with the stacked shared one), the
    // count / scan / scatter launches
    for (int64_t n : {37, 1100}) {
      const auto x = randn(n * H);
      std::vector<float> rl(n * E);
      cpu_.linear(moe.router, x.data(), n, rl.data());
      std::vector<int32_t> idx(n * K);
      std::vector<float> wt(n * K);
      cpu_.route(cfg, rl.data(), {}, n, idx.data(), wt.data());
      std::vector<float> want(n * H), sh(n * H);
      cpu_.moe_experts(moe, x.data(), n, K, idx.data(), wt.data(), want.data());
      cpu_.mlp(*moe.shared, x.data(), n, sh.data());
      for (int64_t i = 0; i < n * H; ++i) want[i] += sh[i];
      // the block on the device for tokens [t0, t0 + m): routed experts, plus the shared MLP where not stacked
      auto block = [&](int64_t t0, int64_t m) {
        auto xd = dev(std::vector<float>(x.begin() + t0 * H, x.begin() + (t0 + m) * H));
        Buf<int32_t> id(*gpu_, std::vector<int32_t>(idx.begin() + t0 * K, idx.begin() + (t0 + m) * K));
        auto wd = dev(std::vector<float>(wt.begin() + t0 * K, wt.begin() + (t0 + m) * K));
        auto yd = poisoned(m * H);
        gpu_->moe_experts(moe, xd.data(), m, K, id.data(), wd.data(), yd.data());
        if (!gpu_->moe_includes_shared(moe)) {
          auto sd = poisoned(m * H);
          gpu_->mlp(*moe.shared, xd.data(), m, sd.data());
          gpu_->add(yd.data(), sd.data(), m * H);
        }
        return yd.host();
      };
      const auto got = block(0, n);
      expect_close(got, want, kChainTol, fmt::format("{} n={}", what, n));
      EXPECT_EQ(block(n - 1, 1), std::vector<float>(got.end() - H, got.end())) << what << ": token alone vs in " << n;
    }
  }
}

// An MLA attention configuration: heads, nope, rope and v head dimensions, kv_lora rank, layers.
ModelConfig mla_config(int64_t nh, int64_t dn, int64_t dr, int64_t dv, int64_t C, int64_t layers) {
  ModelConfig cfg;
  cfg.num_attention_heads = nh;
  cfg.qk_nope_head_dim = dn;
  cfg.qk_rope_head_dim = dr;
  cfg.v_head_dim = dv;
  cfg.kv_lora_rank = C;
  cfg.num_hidden_layers = layers;
  return cfg;
}

TEST_F(CudaOps, mla_attention_expanded_and_absorbed_over_the_latent_cache) {
  const ModelConfig cfg = mla_config(3, 32, 16, 24, 72, 2);
  const int64_t nh = 3, dq = 48, dv = 24;
  for (auto wf : kFormats) {
    AttentionWeights a;
    make_attention(a, cfg, wf, 40);
    for (bool absorbed : {false, true}) {
      // new tokens: 3 for seq 0 (after 5 cached), 4 for seq 1 — appended then attended
      const TwoSeqs t = two_sequences(cfg, 1, 5, 3, 4, absorbed, 99);
      const auto& cs = t.cs;
      const auto& gs = t.gs;
      const int64_t N = 7;
      const auto q = randn(N * nh * dq);
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

// Prefill (expanded-form) attention on tensor cores at Kimi-K2's head shapes (nope 128 + rope 64, v 128): a
// sequence of new tokens after cached ones beside a second one with no past — 75 after 70 with 5 (64-row tiles of
// the mma.sync kernel: two, one partial; keys past the diagonal masked; a partial last 64-key tile), and 300 after 50
// with 130 (the warpgroup kernel's 128-row tiles: both warpgroups, one alone, a tile of 2 rows; 6 key tiles through
// its 3-stage ring) — against the CPU and the CUDA-core kernel, the warpgroup-MMA kernel (the default) against the
// mma.sync one bit for bit, and the short sequence alone against its batched bits. Tolerance: Q·Kᵀ and P·V each
// round both inputs to bf16 (one matmul's 2 bf16 ulps each) after kv_b_proj's bf16 matmul: three chained matmuls,
// 3 × 7.8e-3.
TEST_F(CudaOps, prefill_attention_on_tensor_cores_at_k2_head_shapes) {
  const ModelConfig cfg = mla_config(2, 128, 64, 128, 64, 1);
  const int64_t nh = 2, dq = 192, dv = 128;
  const double tol = 3 * kMatmulTol;
  AttentionWeights a;
  make_attention(a, cfg, WeightFormat::dense, 64);
  struct Case {
    int64_t past, n0, n1;
  };
  for (const Case c : {Case{70, 75, 5}, Case{50, 300, 130}}) {
    SCOPED_TRACE(fmt::format("{} new after {} cached, {} new", c.n0, c.past, c.n1));
    const TwoSeqs t = two_sequences(cfg, 0, c.past, c.n0, c.n1, false, 7);
    const int64_t N = c.n0 + c.n1;
    const auto q = randn(N * nh * dq);
    const float scale = 1.0f / std::sqrt(192.0f);
    std::vector<float> want(N * nh * dv);
    cpu_.mla_attention(cfg, a, q.data(), t.cs, scale, want.data());
    auto qd = dev(q);
    auto o1 = poisoned(N * nh * dv), o2 = poisoned(N * nh * dv), o3 = poisoned(N * nh * dv);
    gpu_->mla_attention(cfg, a, qd.data(), t.gs, scale, o1.data());
    const auto got = o1.host();
    expect_close(got, want, tol, "prefill attention, warpgroup MMA vs cpu");
    CudaBackend::set_flash_wg(false);
    gpu_->mla_attention(cfg, a, qd.data(), t.gs, scale, o2.data());
    CudaBackend::set_flash_wg(true);
    EXPECT_EQ(got, o2.host()) << "prefill attention, warpgroup MMA vs mma.sync";
    CudaBackend::force_simple_attention(true);
    gpu_->mla_attention(cfg, a, qd.data(), t.gs, scale, o3.data());
    CudaBackend::force_simple_attention(false);
    expect_close(got, o3.host(), tol, "prefill attention, tensor cores vs cuda cores");
    // the short sequence alone (its q rows first)
    auto q1 = dev(std::vector<float>(q.begin() + c.n0 * nh * dq, q.end()));
    auto o4 = poisoned(c.n1 * nh * dv);
    std::vector<AttnSeq> alone = {{0, c.n1, 0, t.g1.get(), 0, false}};
    gpu_->mla_attention(cfg, a, q1.data(), alone, scale, o4.data());
    EXPECT_EQ(o4.host(), std::vector<float>(got.begin() + c.n0 * nh * dv, got.end())) << "a sequence alone vs batched";
  }
}

// Decode attention at Kimi-K2's shapes (64 heads, kv_lora 512, rope 64) and at a head count that is not a
// multiple of 16, with an odd number of 16-wide k-steps (kv_lora 128 + rope 16) or with rope 64 (tensor copies),
// over caches long enough to split across blocks, with partial tiles and a short sequence whose later splits are
// empty: the tensor-core kernels (warpgroup MMA with tensor-copy or cp.async loads, mma.sync) against the CPU, the
// CUDA-core kernel and each other.
TEST_F(CudaOps, mla_decode_on_tensor_cores_at_k2_shapes) {
  struct Shape {
    int64_t nh, dn, dr, dv, C;
  };
  for (const Shape sh : {Shape{64, 128, 64, 128, 512}, Shape{20, 32, 16, 24, 128}, Shape{20, 32, 64, 24, 128}}) {
    const ModelConfig cfg = mla_config(sh.nh, sh.dn, sh.dr, sh.dv, sh.C, 1);
    const int64_t nh = sh.nh, dq = sh.dn + sh.dr, dv = sh.dv, C = sh.C, dr = sh.dr;
    AttentionWeights a;
    make_attention(a, cfg, WeightFormat::dense, 40);
    // cached tokens before the decoded one; five rows, so on the previous path the batch takes the 16-row
    // W_UK/W_UV kernels and a row alone the 4-row ones, and on the default path the tensor-core absorption matmuls
    // run one m-tile either way (the same bits alone and batched, checked below)
    const std::vector<int64_t> lens = {1500, 37, 3001, 5, 260};
    std::vector<std::unique_ptr<KvState>> cks, gks;
    rng_.seed(7);
    for (int64_t L : lens) {
      cks.push_back(cpu_.new_kv(cfg));
      gks.push_back(gpu_->new_kv(cfg));
      append_latents(*cks.back(), *gks.back(), 0, L + 1, C, dr);
    }
    const int64_t N = static_cast<int64_t>(lens.size());
    const auto q = randn(N * nh * dq, 2.0f);  // peaked enough that the running max matters
    std::vector<AttnSeq> cs, gs;
    for (int64_t i = 0; i < N; ++i) {
      cs.push_back({i, 1, lens[i], cks[i].get(), 0, true});
      gs.push_back({i, 1, lens[i], gks[i].get(), 0, true});
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(dq));
    std::vector<float> want(N * nh * dv);
    cpu_.mla_attention(cfg, a, q.data(), cs, scale, want.data());
    auto qd = dev(q);
    auto simple = poisoned(N * nh * dv);
    CudaBackend::force_simple_attention(true);
    gpu_->mla_attention(cfg, a, qd.data(), gs, scale, simple.data());
    CudaBackend::force_simple_attention(false);
    expect_close(simple.host(), want, kChainTol, fmt::format("mla decode nh {} C {} (cuda cores) vs cpu", nh, C));
    // row i of a batch's output `batched` (queries qs) against the row run alone, over cache c with `len` cached
    auto expect_alone_equals = [&](const std::vector<float>& qs, const std::vector<float>& batched, int64_t i, int64_t len,
                                   KvState* c, const std::string& what) {
      auto qi = dev(std::vector<float>(qs.begin() + i * nh * dq, qs.begin() + (i + 1) * nh * dq));
      auto oi = poisoned(nh * dv);
      const std::vector<AttnSeq> one = {{0, 1, len, c, 0, true}};
      gpu_->mla_attention(cfg, a, qi.data(), one, scale, oi.data());
      EXPECT_EQ(oi.host(), std::vector<float>(batched.begin() + i * nh * dv, batched.begin() + (i + 1) * nh * dv)) << what;
    };
    std::vector<float> first;
    // the kernel with specialized warpgroups (where rope is 64: tiles by tensor copies; otherwise the warpgroup-MMA
    // kernel with cp.async loads), the previous warpgroup-MMA kernel with tensor copies, the same with cp.async loads
    // (the same bits), and the mma.sync kernel
    std::vector<float> wg_bits;
    for (int path : {0, 1, 2, 3}) {
      const bool mma_sync = path == 3;
      CudaBackend::force_mla_mma_sync(mma_sync);
      CudaBackend::set_mla_tma(path <= 1);
      CudaBackend::set_mla_specialized(path == 0 ? 2 : 0);
      const std::string what = fmt::format("mla decode nh {} C {} rope {} ({})", nh, C, dr,
                                           path == 0   ? "specialized"
                                           : path == 1 ? "wgmma, tensor copies"
                                           : path == 2 ? "wgmma, cp.async"
                                                       : "mma.sync");
      auto fast = poisoned(N * nh * dv);
      const int64_t tma_before = CudaBackend::mla_tma_launches(), ws_before = CudaBackend::mla_specialized_launches();
      gpu_->mla_attention(cfg, a, qd.data(), gs, scale, fast.data());
      // tensor copies where rope is 64 (unless turned off), and with them the specialized kernel where asked for
      EXPECT_EQ(CudaBackend::mla_tma_launches() - tma_before, path <= 1 && dr == 64 ? 1 : 0) << what;
      EXPECT_EQ(CudaBackend::mla_specialized_launches() - ws_before, path == 0 && dr == 64 ? 1 : 0) << what;
      // Q and P are rounded to bf16 on the tensor cores (one more bf16 rounding than the CUDA-core kernel):
      // within the two-matmul chain tolerance of the CPU, and of the CUDA-core kernel
      const auto fh = fast.host();
      expect_close(fh, want, kChainTol, what + " vs cpu");
      expect_close(fh, simple.host(), kChainTol, what + " vs cuda cores");
      if (first.empty()) first = fh;
      else expect_close(fh, first, kChainTol, what + " vs the specialized kernel");
      // the previous warpgroup kernel's loads must not change a bit (and without rope 64 the default is that kernel)
      if (path == 1 || (path == 0 && dr != 64)) wg_bits = fh;
      if (path == 2) {
        EXPECT_EQ(fh, wg_bits) << what << ": the loads must not change a bit";
      }
      // the batch-invariant split (each row's parts from its own length): each row alone gives the bits it has in
      // the batch, where the longer rows take more parts and the absorption matmuls run 16 rows per block
      gpu_->set_batch_invariant_attention(true);
      auto inv = poisoned(N * nh * dv);
      gpu_->mla_attention(cfg, a, qd.data(), gs, scale, inv.data());
      const auto invh = inv.host();
      expect_close(invh, want, kChainTol, what + " (batch-invariant split) vs cpu");
      for (int64_t i = 0; i < N; ++i)
        expect_alone_equals(q, invh, i, lens[i], gks[i].get(),
                            fmt::format("{}: row {} ({} cached) alone vs batched", what, i, lens[i]));
      gpu_->set_batch_invariant_attention(false);
    }
    CudaBackend::force_mla_mma_sync(false);
    CudaBackend::set_mla_tma(true);
    CudaBackend::set_mla_specialized(1);
    {  // 70 rows: the W_UV matmul takes 64 rows per block above 64 rows (16 up to 64); with the batch-invariant
       // split a row's bits must not depend on that either
      gpu_->set_batch_invariant_attention(true);
      const int64_t N2 = 70;
      const auto q2 = randn(N2 * nh * dq, 2.0f);
      std::vector<AttnSeq> gs2;
      for (int64_t i = 0; i < N2; ++i) gs2.push_back({i, 1, lens[i % N], gks[i % N].get(), 0, true});
      auto qd2 = dev(q2);
      auto o2 = poisoned(N2 * nh * dv);
      gpu_->mla_attention(cfg, a, qd2.data(), gs2, scale, o2.data());
      const auto o2h = o2.host();
      for (int64_t i : {0, 2, 63, 64, 69})
        expect_alone_equals(q2, o2h, i, lens[i % N], gks[i % N].get(), fmt::format("nh {} C {}: row {} of 70 alone vs batched", nh, C, i));
      gpu_->set_batch_invariant_attention(false);
    }
  }
}

TEST_F(CudaOps, logits_top_and_normalizer_match_the_cpu_exactly) {
  const int64_t R = 5, V = 10007;
  auto l = randn(R * V, 3.0f);
  for (int64_t r = 0; r < R; ++r) {  // ties at the top: the lower id must come first
    l[r * V + 17] = l[r * V + 4000] = 20.0f + r;
    l[r * V + 9000] = 20.0f + r;
  }
  auto ld = dev(l);
  for (int64_t M : {1, 5, 64}) {
    std::vector<float> mc(R), mg(R), vc(R * M), vg(R * M);
    std::vector<double> sc(R), sg(R);
    std::vector<int32_t> ic(R * M), ig(R * M);
    cpu_.logits_top(l.data(), R, V, M, mc.data(), sc.data(), vc.data(), ic.data());
    gpu_->logits_top(ld.data(), R, V, M, mg.data(), sg.data(), vg.data(), ig.data());
    EXPECT_EQ(ig, ic) << "M=" << M;
    EXPECT_EQ(vg, vc) << "M=" << M;
    EXPECT_EQ(mg, mc);
    for (int64_t r = 0; r < R; ++r) EXPECT_NEAR(sg[r], sc[r], 1e-12) << "log-sum, row " << r;
  }
}

TEST_F(CudaOps, row_ops_add_ablate_clamp_match_the_cpu) {
  const int64_t N = 9, W = 203;
  const auto h = randn(N * W);
  const auto v1 = randn(W), v2 = randn(W);
  auto norm = [&](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += double(x) * x;
    return std::sqrt(s);
  };
  std::vector<RowOp> ops;
  ops.push_back({3, RowOp::add, v1.data(), 0.7f, 0, norm(v1)});
  ops.push_back({3, RowOp::project, v2.data(), 0, 0.0, norm(v2)});   // ablate after the add, same row
  ops.push_back({0, RowOp::project, v1.data(), 0, 2.5, norm(v1)});   // clamp
  ops.push_back({8, RowOp::add, v2.data(), -1.25f, 0, norm(v2)});
  ops.push_back({3, RowOp::add, v2.data(), 0.1f, 0, norm(v2)});      // third op on row 3, in order
  auto want = h;
  cpu_.apply_row_ops(want.data(), W, ops);
  auto hd = dev(h);
  gpu_->apply_row_ops(hd.data(), W, ops);
  expect_close(hd.host(), want, kF32Tol, "row ops");
}

// The fixture model on the device: steering applied as device row ops and captures delivered asynchronously
// give exactly what the host round trip (every site copied out, hooks run on the host, copied back) gives.
struct HostOnly : Hook {  // forwards to inner but refuses the device fast path
  Hook* inner;
  explicit HostOnly(Hook* h) : inner(h) {}
  bool wants(const Site& s) const override { return inner->wants(s); }
  bool writes(const Site& s) const override { return inner->writes(s); }
  bool reads(const Site& s) const override { return inner->reads(s); }
  void on(const Site& s, int64_t q, float* d, int64_t n, int64_t w, int64_t p) override { inner->on(s, q, d, n, w, p); }
  bool row_ops(const Site&, int64_t, int64_t, int64_t, int64_t, std::vector<RowOp>&) override { return false; }
};

TEST_F(CudaOps, device_steering_and_async_capture_equal_the_host_round_trip) {
  auto model = Model::load(test::fixtures() + "/reference/kimi_bf16", gpu_);
  const auto& cfg = model->config();
  std::vector<GenerateRequest> reqs(3);
  std::vector<std::vector<Intervention>> lists(3);
  std::vector<SeqLayout> layouts;
  for (int i = 0; i < 3; ++i) {
    for (int t = 0; t < 5 + 2 * i; ++t) reqs[i].prompt.push_back((i * 37 + t * 11 + 3) % cfg.vocab_size);
    reqs[i].max_new_tokens = 6;
    reqs[i].ignore_eos = true;
    layouts.push_back({static_cast<int64_t>(reqs[i].prompt.size()), -1, {}});
  }
  Intervention a;
  a.site = parse_site("1.resid_post", cfg.num_hidden_layers);
  a.vector = randn(cfg.hidden_size);
  a.coef = 3.0;
  a.positions = PositionSpec::parse("response");
  Intervention b = a;
  b.site = parse_site("0.resid_mid", cfg.num_hidden_layers);
  b.op = InterventionOp::ablate;
  b.positions = PositionSpec::parse("all");
  Intervention c = a;
  c.op = InterventionOp::clamp;
  c.coef = -1.5;
  lists[0] = {a};
  lists[1] = {b, c};
  CaptureSpec spec;
  for (const char* site : {"0.resid_mid", "1.resid_post", "2.resid_post", "final_norm"})
    spec.sites.push_back(parse_site(site, cfg.num_hidden_layers));
  spec.positions = PositionSpec::parse("all");
  auto run = [&](bool host_only) {
    SteeringHook steer(lists, layouts);
    CaptureHook cap(spec, 3);
    HookList both;
    both.hooks = {&steer, &cap};
    HostOnly wrapped(&both);
    GenerateOptions o;
    o.observer = host_only ? static_cast<Hook*>(&wrapped) : &both;
    o.feed_last = true;
    auto res = generate(*model, reqs, o);
    std::vector<CapturedSeq> caps;
    for (int i = 0; i < 3; ++i) {
      SeqLayout l = layouts[i];
      l.total_len = res[i].states;
      caps.push_back(cap.finish(i, l));
    }
    return std::make_pair(res, caps);
  };
  const auto fast = run(false), slow = run(true);  // fast: captures filed on the model's delivery thread
  model->set_async_reads(false);
  const auto fast_sync = run(false);  // delivered before each forward() returns
  model->set_async_reads(true);
  gpu_->set_capture_copy_stream(false);  // copied out on the compute stream, not from snapshots on the copy stream
  const auto side = run(false);
  gpu_->set_capture_copy_stream(true);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(fast.first[i].tokens, fast_sync.first[i].tokens) << "seq " << i;
    EXPECT_EQ(fast.second[i].rows, fast_sync.second[i].rows) << "seq " << i << ": the delivery thread changed a capture";
    EXPECT_EQ(fast.first[i].logprobs, side.first[i].logprobs) << "seq " << i;
    EXPECT_EQ(fast.second[i].rows, side.second[i].rows) << "seq " << i << ": the copy stream changed a capture";
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(fast.first[i].tokens, slow.first[i].tokens) << "seq " << i;
    EXPECT_EQ(fast.first[i].logprobs, slow.first[i].logprobs) << "seq " << i;
    for (auto& [site, rows] : slow.second[i].rows) {
      ASSERT_TRUE(fast.second[i].rows.count(site)) << site;
      EXPECT_LE(test::rel_err(fast.second[i].rows.at(site), rows), 1e-6) << "seq " << i << " " << site;
    }
  }
  // and the steering did something: row 0's tokens differ from an unsteered run
  const auto plain = generate(*model, reqs);
  EXPECT_NE(plain[0].tokens, fast.first[0].tokens);
}

// A hook that says it writes at the sites of `inner` and writes nothing (no row ops): the model then keeps each
// residual add apart from the norm after it at those sites.
struct WritesNothing : Hook {
  Hook* inner;
  explicit WritesNothing(Hook* h) : inner(h) {}
  bool wants(const Site& s) const override { return inner->wants(s); }
  bool writes(const Site&) const override { return true; }
  bool reads(const Site&) const override { return false; }
  void on(const Site&, int64_t, float*, int64_t, int64_t, int64_t) override {}
  bool row_ops(const Site&, int64_t, int64_t, int64_t, int64_t, std::vector<RowOp>&) override { return true; }
};

// Where hooks only read, the model runs each residual add with the norm after it (add_rmsnorm_bf16); where one
// writes, apart. Reads see the same rows either way and the tokens and log-probabilities are the same bits.
TEST_F(CudaOps, captures_and_logits_are_the_same_bits_with_the_residual_add_fused_or_apart) {
  for (const char* fixture : {"kimi_bf16", "dsv3_int4"}) {
    auto model = Model::load(test::fixtures() + "/reference/" + fixture, gpu_);
    const auto& cfg = model->config();
    const int64_t L = cfg.num_hidden_layers;
    std::vector<GenerateRequest> reqs(2);
    std::vector<SeqLayout> layouts;
    for (int i = 0; i < 2; ++i) {
      for (int t = 0; t < 6 + 3 * i; ++t) reqs[i].prompt.push_back((i * 41 + t * 13 + 5) % cfg.vocab_size);
      reqs[i].max_new_tokens = 5;
      reqs[i].ignore_eos = true;
      layouts.push_back({static_cast<int64_t>(reqs[i].prompt.size()), -1, {}});
    }
    CaptureSpec spec;
    for (int64_t l = 0; l < L; ++l)
      for (const char* k : {"resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"})
        spec.sites.push_back(parse_site(fmt::format("{}.{}", l, k), L));
    spec.sites.push_back(parse_site("final_norm", L));
    spec.positions = PositionSpec::parse("all");
    auto run = [&](bool apart) {
      CaptureHook cap(spec, 2);
      WritesNothing nop(&cap);
      HookList both;
      both.hooks = {&nop, &cap};
      GenerateOptions o;
      o.observer = apart ? static_cast<Hook*>(&both) : &cap;
      o.feed_last = true;
      auto res = generate(*model, reqs, o);
      std::vector<CapturedSeq> caps;
      for (int i = 0; i < 2; ++i) {
        SeqLayout l = layouts[i];
        l.total_len = res[i].states;
        caps.push_back(cap.finish(i, l));
      }
      return std::make_pair(res, caps);
    };
    const auto fused = run(false), apart = run(true);
    const auto plain = generate(*model, reqs);
    for (int i = 0; i < 2; ++i) {
      EXPECT_EQ(fused.first[i].tokens, apart.first[i].tokens) << fixture << " seq " << i;
      EXPECT_EQ(fused.first[i].logprobs, apart.first[i].logprobs) << fixture << " seq " << i;
      EXPECT_EQ(fused.first[i].logprobs, plain[i].logprobs) << fixture << " seq " << i << ": reads changed the run";
      EXPECT_EQ(fused.second[i].rows.size(), spec.sites.size()) << fixture;
      EXPECT_EQ(fused.second[i].rows, apart.second[i].rows) << fixture << " seq " << i;
    }
  }
}

TEST_F(CudaOps, sampling_from_device_summaries_equals_sampling_from_whole_rows) {
  auto model = Model::load(test::fixtures() + "/reference/dsv3_int4", gpu_);
  const int64_t V = model->config().vocab_size;
  for (SamplingParams sp : {SamplingParams{0.0, 0, 1.0, 1}, SamplingParams{0.8, 40, 1.0, 7}, SamplingParams{1.1, 5, 0.9, 9},
                            SamplingParams{0.9, 0, 1.0, 11}, SamplingParams{1.3, 0, 0.8, 12}, SamplingParams{0.7, 100, 0.95, 13}}) {
    std::vector<int32_t> prompt = {5, 9, 13, 200, 7};
    KvCache c1 = model->new_cache(), c2 = model->new_cache();
    std::vector<ForwardItem> i1 = {{&c1, prompt.data(), 5, false}}, i2 = {{&c2, prompt.data(), 5, false}};
    Sampler s1(sp), s2(sp);
    for (int step = 0; step < 8; ++step) {
      std::vector<std::vector<float>> full;
      std::vector<LogitSummary> sum;
      model->forward(i1, full);
      model->forward(i2, {sp.temperature > 0 && (sp.top_k == 0 || sp.top_k > kSummaryTop) ? s2.draw_for_row() : RowDraw{}}, sp.top_k > 0 ? sp.top_k : 1, sum);
      float lp1 = 0, lp2 = 0;
      const int32_t t1 = s1.sample(full[0].data(), V, &lp1), t2 = s2.sample(sum[0], V, &lp2);
      ASSERT_EQ(t1, t2) << "temperature " << sp.temperature << " step " << step;
      EXPECT_NEAR(lp1, lp2, 1e-6);
      prompt.push_back(t1);
      i1 = {{&c1, &prompt.back(), 1, false}};
      i2 = {{&c2, &prompt.back(), 1, false}};
    }
  }
}

TEST_F(CudaOps, engine_admits_requests_by_kv_budget_waits_or_fails_clearly) {
  auto model = Model::load(test::fixtures() + "/reference/kimi_bf16", gpu_);
  const auto& cfg = model->config();
  const uint64_t per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2;
  gpu_->set_kv_budget(100 * per_token);  // 100 tokens in all
  Engine engine(*model, 8, 16);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<EngineResult> done;
  auto req = [&](int64_t max_new) {
    EngineRequest r;
    r.prompt = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    r.max_new_tokens = max_new;
    r.ignore_eos = true;
    r.on_done = [&](EngineResult res) {
      std::lock_guard<std::mutex> g(mu);
      done.push_back(std::move(res));
      cv.notify_all();
    };
    return r;
  };
  engine.submit(req(200));  // 210 tokens: can never fit
  engine.submit(req(50));   // 60 tokens each: the second must wait for the first
  engine.submit(req(50));
  std::unique_lock<std::mutex> lk(mu);
  ASSERT_TRUE(cv.wait_for(lk, std::chrono::seconds(60), [&] { return done.size() == 3; }));
  int errors = 0, full_length = 0;
  for (auto& r : done) {
    if (r.finish_reason.rfind("error: KV cache", 0) == 0) ++errors;
    if (r.finish_reason == "length" && r.tokens.size() == 50) ++full_length;
  }
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(full_length, 2);
  EXPECT_EQ(gpu_->kv_bytes(), 0u) << "finished requests return their cache";
}

}  // namespace
