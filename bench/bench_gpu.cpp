// GPU benchmark of the CUDA backend on a Kimi-K2-layer-shaped checkpoint (not a test; scripts/gpu/bench.sh runs it
// next to HF transformers on the same checkpoint).
//   bench_gpu make DIR --format bf16|fp8|int4 [--layers 2]     write the kimi-k2-slice checkpoint
//   bench_gpu run DIR [--json FILE]                             measure
//   bench_gpu moe DIR [--json FILE]                             the MoE block table of `run` alone
//   bench_gpu mla [--json FILE]                                  absorbed decode attention alone at K2's attention
//                                                               shapes: tensor-core kernel vs the CUDA-core one
//   bench_gpu profile DIR [--tokens T] [--prefill T] [--batch B] for ncu (--profile-from-start off): the MoE block
//                                                               at T tokens and one decode step of B sequences
//                                                               (default 1), each once
//                                                               inside cudaProfilerStart/Stop, after warm-up; prints
//                                                               the decode step's wall time without the profiler.
//                                                               --prefill T: one prefill of 1 x T tokens instead
//   bench_gpu gemm [--json FILE]                                the dense matmul kernels alone at K2 shapes in every
//                                                               format, 1-4096 rows: streamed vs many-row kernels
//                                                               (mma.sync tile, warpgroup MMA) vs cuBLAS (bf16),
//                                                               against the floors; GEMM_ROWS=512,4096 GEMM_FMT
//                                                               GEMM_MATRIX narrow it
// KSCOPE_INVARIANT_ATTENTION=1 runs any of them with decode attention split per row
// (CudaBackend::set_batch_invariant_attention); KSCOPE_TILE_ROWS=dense,group sets when the many-row matmul kernel
// takes over (CudaBackend::set_tile_rows; 0 never, 1 always); MOE_COMPARE=1 also times each MoE block of `run`
// from 64 tokens with the experts on the streamed kernel only; MOE_TOKENS=1,8,256 narrows the MoE table's token counts.
// Measures the device's own floors (HBM bandwidth from a large device-to-device copy, BF16 tensor-core rate from a
// large cuBLAS matmul), load time, the MoE block of layer 1 (router, top-8 routing, 8 routed + shared expert) for
// 1..2048 tokens (one call synchronized, and calls queued back to back: the kernels' time), MLA absorbed decode attention at batch 64 x 4k context, decode steps at batch 1..256, prefill of
// 4 x 1024 tokens, and peak device memory.
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <deque>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/kernels.cuh"
#include "model/make_model.hpp"
#include "model/model.hpp"
#include "util/error.hpp"

using namespace kscope;
using json = nlohmann::json;
using clk = std::chrono::steady_clock;

namespace {

#define CU(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#x) + ": " + cudaGetErrorString(e_)); \
  } while (0)

// An environment switch: set and not empty or "0".
// The comma-separated integers of an environment variable (A/B runs narrowing a table), else `def`
std::vector<int> env_list(const char* name, std::vector<int> def) {
  const char* e = std::getenv(name);
  if (!e || !*e) return def;
  std::vector<int> v;
  for (std::string s = e; !s.empty();) {
    const size_t c = s.find(',');
    v.push_back(std::atoi(s.substr(0, c).c_str()));
    s = c == std::string::npos ? "" : s.substr(c + 1);
  }
  return v;
}
bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::string(v) != "0";
}

// KSCOPE_TILE_ROWS=dense,group (CudaBackend::set_tile_rows); KSCOPE_MLA_MMA_SYNC=1 (CudaBackend::force_mla_mma_sync);
// KSCOPE_MLA_NO_TMA=1 (CudaBackend::set_mla_tma(false)); KSCOPE_MLA_SPECIALIZED=0|1|2 (CudaBackend::set_mla_specialized); KSCOPE_WG_GEMM=0, KSCOPE_WG_ROWS=64|128|256
// (CudaBackend::set_wg_gemm); KSCOPE_FLASH_WG=0 (CudaBackend::set_flash_wg(false): prefill attention on mma.sync);
// KSCOPE_PDL=0 (CudaBackend::set_pdl(false): plain kernel launches); KSCOPE_FEW_BY_ROWS=0
// (CudaBackend::set_few_by_rows(false): the streamed expert matmuls as one launch, not one per tile size);
// KSCOPE_FEW_PIECE=32|16|8 (CudaBackend::set_few_piece: expert tiles of at most 32, 16 or 8 rows);
// KSCOPE_FEW_LATE=1|0 (CudaBackend::set_few_late); KSCOPE_FEW_WIDE=0|2|4|6|-1
// (CudaBackend::set_few_wide: which expert launch classes run 8-warp blocks); KSCOPE_ROUTE_BLOCK=0
// (CudaBackend::set_route_block(false): the router's picks by one warp per token)
void apply_kernel_env() {
  if (const char* f = std::getenv("KSCOPE_FEW_BY_ROWS"); f && std::string(f) == "0") CudaBackend::set_few_by_rows(false);
  if (const char* f = std::getenv("KSCOPE_FEW_PIECE"); f && *f) CudaBackend::set_few_piece(std::atoi(f));
  if (const char* f = std::getenv("KSCOPE_FEW_LATE"); f && *f) CudaBackend::set_few_late(std::string(f) != "0");
  if (const char* f = std::getenv("KSCOPE_FEW_WIDE"); f && *f) CudaBackend::set_few_wide(std::atoi(f));
  if (const char* f = std::getenv("KSCOPE_ROUTE_BLOCK"); f && std::string(f) == "0") CudaBackend::set_route_block(false);
  if (env_on("KSCOPE_MLA_MMA_SYNC")) CudaBackend::force_mla_mma_sync(true);  // decode attention's previous kernels
  if (env_on("KSCOPE_MLA_NO_TMA")) CudaBackend::set_mla_tma(false);         // its tiles by cp.async
  if (const char* f = std::getenv("KSCOPE_MLA_SPECIALIZED")) CudaBackend::set_mla_specialized(std::atoi(f));  // 0, 1, 2
  if (const char* f = std::getenv("KSCOPE_FLASH_WG"); f && std::string(f) == "0") CudaBackend::set_flash_wg(false);
  if (const char* f = std::getenv("KSCOPE_PDL"); f && std::string(f) == "0") CudaBackend::set_pdl(false);
  {  // the many-row matmul on the mma.sync tile kernel (KSCOPE_WG_GEMM=0) or the wgmma one with R rows per block
    const char* wr = std::getenv("KSCOPE_WG_ROWS");
    const char* wgv = std::getenv("KSCOPE_WG_GEMM");
    const bool on = !(wgv && std::string(wgv) == "0");
    CudaBackend::set_wg_gemm(on, wr && *wr ? std::atoi(wr) : 0);
  }
  const char* v = std::getenv("KSCOPE_TILE_ROWS");
  if (!v || !*v) return;
  const std::string s = v;
  const size_t c = s.find(',');
  const int d = std::stoi(s.substr(0, c));
  const double g = c == std::string::npos ? d : std::stod(s.substr(c + 1));  // may be a fraction: 48,0.5
  CudaBackend::set_tile_rows(d, g);
  static bool told = false;
  if (!told) std::printf("many-row matmul from %d dense rows, %g rows per expert on average\n", d, g);
  told = true;
}

// Batch × length pairs from an environment variable ("1x4096,64x4096"), or the defaults where it is unset.
std::vector<std::pair<int64_t, int64_t>> sizes_from_env(const char* name, std::vector<std::pair<int64_t, int64_t>> sizes) {
  const char* e = std::getenv(name);
  if (!e) return sizes;
  sizes.clear();
  const std::string spec = e;
  for (size_t a = 0; a < spec.size();) {
    size_t b = spec.find(',', a);
    if (b == std::string::npos) b = spec.size();
    const std::string item = spec.substr(a, b - a);
    sizes.push_back({std::stoll(item.substr(0, item.find('x'))), std::stoll(item.substr(item.find('x') + 1))});
    a = b + 1;
  }
  return sizes;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Seconds per call of fn (device-synchronized), median of `reps` after `warm` warm-up calls.
template <class F>
double time_it(F&& fn, int reps, int warm = 3) {
  for (int i = 0; i < warm; ++i) fn();
  CU(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = clk::now();
    fn();
    CU(cudaDeviceSynchronize());
    t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
  }
  return median(t);
}

// Seconds per call of fn with the calls queued back to back (one synchronization after all of them), as the layers
// of a decode step are: the host's work for a call overlaps the device's work for the previous ones.
template <class F>
double time_queued(F&& fn, int reps, int warm = 3) {
  for (int i = 0; i < warm; ++i) fn();
  CU(cudaDeviceSynchronize());
  const auto t0 = clk::now();
  for (int i = 0; i < reps; ++i) fn();
  CU(cudaDeviceSynchronize());
  return std::chrono::duration<double>(clk::now() - t0).count() / reps;
}

double hbm_bandwidth() {  // bytes read + written per second, device-to-device copy of 2 GiB
  const size_t n = 2ull << 30;
  void *a, *b;
  CU(cudaMalloc(&a, n));
  CU(cudaMalloc(&b, n));
  CU(cudaMemset(a, 1, n));
  const double s = time_it([&] { CU(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice)); }, 10);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * n / s;
}

double bf16_tensor_rate() {  // FLOP/s of an 8192^3 BF16 cuBLAS matmul with fp32 accumulation
  const int n = 8192;
  void *a, *b, *c;
  CU(cudaMalloc(&a, size_t(n) * n * 2));
  CU(cudaMalloc(&b, size_t(n) * n * 2));
  CU(cudaMalloc(&c, size_t(n) * n * 2));
  CU(cudaMemset(a, 0x3c, size_t(n) * n * 2));  // ~1.2 in bf16: non-zero data
  CU(cudaMemset(b, 0x3c, size_t(n) * n * 2));
  cublasHandle_t h;
  cublasCreate(&h);
  const float one = 1, zero = 0;
  const double s = time_it(
      [&] {
        cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &zero, c,
                     CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      },
      10);
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * n * double(n) / s;
}

uint64_t used_bytes() {
  size_t fr = 0, tot = 0;
  cudaMemGetInfo(&fr, &tot);
  return tot - fr;
}

std::vector<float> randn(int64_t n, uint64_t seed) {
  std::mt19937_64 r(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(r);
  return v;
}

// One MoE block of layer `mw` at T tokens of random input, run by the model's own moe_block (router, top-k, routed
// experts, shared expert added).
struct MoeStep {
  Backend& be;
  const ModelConfig& cfg;
  const MoeWeights& mw;
  int64_t T;
  Buf<float> x, y;
  MoeStep(Backend& b, const ModelConfig& c, const MoeWeights& m, int64_t t)
      : be(b), cfg(c), mw(m), T(t), x(b, randn(t * c.hidden_size, t)), y(b, t * c.hidden_size) {}
  void operator()() { moe_block(be, cfg, mw, x.data(), T, y.data()); }
  // the experts one more step chooses (the same every step: the input does not change)
  std::vector<int32_t> chosen() {
    std::vector<int32_t> ids(T * cfg.num_experts_per_tok);
    moe_block(be, cfg, mw, x.data(), T, y.data(),
              [&](float*, int32_t* idx, float*) { be.download(ids.data(), idx, ids.size() * sizeof(int32_t)); });
    return ids;
  }
};

// B sequences with 16-token prompts of their own (so that they route to different experts; sequence 0's is the
// batch-1 profile's prompt of earlier rounds), prefilled; step() decodes one greedy token for each, as generate()
// does: the device reduces each row to its top logit and normalizer.
struct GreedyBatch {
  Model& model;
  std::vector<KvCache> caches;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<ForwardItem> items;
  std::vector<LogitSummary> logits;
  std::vector<RowDraw> full;  // greedy: nothing drawn
  std::vector<int32_t> next;
  GreedyBatch(Model& m, int64_t B) : model(m), prompts(B), full(B), next(B) {
    const int64_t V = m.config().vocab_size;
    for (int64_t b = 0; b < B; ++b) {
      caches.push_back(m.new_cache());
      for (int t = 0; t < 16; ++t) prompts[b].push_back(static_cast<int32_t>((b * 131 + t * 17 + 3) % V));
    }
    for (int64_t b = 0; b < B; ++b) items.push_back({&caches[b], prompts[b].data(), 16, false});
    model.forward(items, full, 1, logits);
  }
  void step() {
    for (size_t b = 0; b < items.size(); ++b) {
      next[b] = logits[b].top_ids[0];
      items[b] = {&caches[b], &next[b], 1, false};
    }
    model.forward(items, full, 1, logits);
  }
};

int run(const std::string& dir, const std::string& json_path, bool moe_only = false) {
  json out;
  cudaDeviceProp p{};
  CU(cudaGetDeviceProperties(&p, 0));
  out["device"] = p.name;
  const double bw = hbm_bandwidth(), tc = bf16_tensor_rate();
  out["hbm_bytes_per_s"] = bw;
  out["bf16_flops"] = tc;
  std::printf("device %s: HBM %.0f GB/s (copy, read+write), BF16 tensor cores %.0f TFLOP/s (cuBLAS 8192^3)\n", p.name,
              bw / 1e9, tc / 1e12);

  auto backend = std::make_shared<CudaBackend>(0);
  backend->set_batch_invariant_attention(env_on("KSCOPE_INVARIANT_ATTENTION"));
  apply_kernel_env();
  const uint64_t base = used_bytes();
  auto model = Model::load(dir, backend);
  const CudaPlan& plan = backend->plan();
  const auto& cfg = model->config();
  out["layers"] = cfg.num_hidden_layers;
  out["workspace_bytes"] = plan.workspace_bytes;
  out["kv_bytes_per_token"] = plan.kv_bytes_per_token;
  {  // bytes one batch-1 decode step must read: every weight it touches once (8 routed experts per MoE layer;
     // kv_b_proj in the bf16 absorbed form), the embedding row, lm_head; the 16-32-token cache is negligible
    double b = 2.0 * cfg.hidden_size + model->weights().lm_head.bytes();
    for (const auto& lw : model->weights().layers) {
      const auto& a = lw.attn;
      for (const Linear* l : {a.q_proj ? &*a.q_proj : nullptr, a.q_a_proj ? &*a.q_a_proj : nullptr,
                              a.q_b_proj ? &*a.q_b_proj : nullptr, &a.kv_a_proj, &a.o_proj})
        if (l) b += l->bytes();
      b += 2.0 * a.kv_b_proj.out * a.kv_b_proj.in;
      if (lw.mlp) b += lw.mlp->gate.bytes() + lw.mlp->up.bytes() + lw.mlp->down.bytes();
      if (lw.moe) {
        const auto& e0 = lw.moe->experts[0];
        b += lw.moe->router.bytes() + cfg.num_experts_per_tok * double(e0.gate.bytes() + e0.up.bytes() + e0.down.bytes());
        if (lw.moe->shared) b += lw.moe->shared->gate.bytes() + lw.moe->shared->up.bytes() + lw.moe->shared->down.bytes();
      }
    }
    out["decode_b1_bytes"] = b;
  }
  out["load_seconds"] = plan.load_seconds;
  out["load_bytes"] = plan.load_bytes;
  out["weight_bytes"] = plan.weight_bytes;
  std::printf("loaded %.2f GB in %.1f s (%.2f GB/s); weights on device %.2f GB; KV budget %lld tokens\n",
              plan.load_bytes / 1e9, plan.load_seconds, plan.load_bytes / 1e9 / plan.load_seconds, plan.weight_bytes / 1e9,
              static_cast<long long>(plan.kv_capacity_tokens));
  Backend& be = model->backend();
  const int64_t H = cfg.hidden_size, E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, I = cfg.moe_intermediate_size;
  int64_t moe_layer = -1;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (model->weights().layers[l].moe) { moe_layer = l; break; }
  const auto& mw = *model->weights().layers[moe_layer].moe;
  const Linear& g0 = mw.experts[0].gate;
  const double expert_bytes = 3.0 * (g0.bytes());  // gate, up, down are the same size
  const double shared_bytes = mw.shared ? 3.0 * mw.shared->gate.bytes() : 0.0;
  const double router_bytes = mw.router.bytes();
  const int64_t Ish = mw.shared ? mw.shared->gate.out : 0;
  out["format"] = format_name(g0.format);

  // ---- MoE block latency
  json moe = json::array();
  std::printf("\nMoE block (layer %lld: router + top-%lld of %lld + shared), %s\n", static_cast<long long>(moe_layer),
              static_cast<long long>(K), static_cast<long long>(E), format_name(g0.format));
  const bool compare = env_on("MOE_COMPARE");
  // "time": one call synchronized (its host work and launch latency exposed); "queued": calls back to back, as a
  // decode step's layers run (the host's work overlaps the device's: the kernels' time), and its fraction of the floor
  std::printf("%7s %10s %9s %12s %12s %9s %10s %9s%s\n", "tokens", "time us", "experts", "bw floor us", "tc floor us",
              "of floor", "queued us", "of floor", compare ? "  streamed only us" : "");
  for (int64_t T : env_list("MOE_TOKENS", {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048})) {
    MoeStep step(be, cfg, mw, T);
    const double s = time_it(step, T <= 256 ? 50 : 20);
    const double sq = time_queued(step, T <= 256 ? 50 : 20);
    double s_few = NAN;
    if (compare && T >= 64) {  // the experts on the streamed kernel only (the same bits)
      CudaBackend::set_tile_rows(0, 0);
      s_few = time_it(step, T <= 256 ? 50 : 20);
      CudaBackend::set_tile_rows(-1, -1);
      apply_kernel_env();
    }
    const auto ih = step.chosen();
    const std::set<int32_t> distinct(ih.begin(), ih.end());
    const double bytes = distinct.size() * expert_bytes + shared_bytes + router_bytes + 4.0 * T * H * 2;
    const double flops = 2.0 * T * (K * 3.0 * H * I + 3.0 * H * Ish + E * H);
    const double fb = bytes / bw, fc = flops / tc, floor = std::max(fb, fc);
    std::printf("%7lld %10.1f %9zu %12.1f %12.1f %8.0f%% %10.1f %8.0f%%", static_cast<long long>(T), s * 1e6, distinct.size(),
                fb * 1e6, fc * 1e6, 100 * floor / s, sq * 1e6, 100 * floor / sq);
    if (!std::isnan(s_few)) std::printf("  %16.1f", s_few * 1e6);
    std::printf("\n");
    moe.push_back({{"tokens", T}, {"seconds", s}, {"seconds_queued", sq}, {"experts", distinct.size()}, {"bytes", bytes}, {"flops", flops},
                   {"bw_floor", fb}, {"tc_floor", fc}});
  }
  out["moe"] = moe;
  if (moe_only) {  // `bench_gpu moe`: the MoE table alone (A/B runs of the expert matmuls)
    if (!json_path.empty()) std::ofstream(json_path) << out.dump(1) << "\n";
    return 0;
  }

  // ---- MLA absorbed decode attention, batch 64 x 4096 cached tokens
  {
    const int64_t B = 64, Tctx = 4096, C = cfg.kv_lora_rank, dr = cfg.qk_rope_head_dim, nh = cfg.num_attention_heads;
    std::vector<KvCache> caches;
    const auto lat = randn(Tctx * (C + dr), 7);
    Buf<float> ckv(be, lat), latent(be, Tctx * C);
    be.rmsnorm(ckv.data(), std::vector<float>(C, 1.0f), Tctx, C, 1e-6f, latent.data(), C + dr);
    for (int64_t b = 0; b < B; ++b) {
      caches.push_back(model->new_cache());
      be.kv_append(*caches.back().state, moe_layer, latent.data(), ckv.data(), 0, Tctx, C, dr);
    }
    std::vector<AttnSeq> seqs;
    for (int64_t b = 0; b < B; ++b) seqs.push_back({b, 1, Tctx - 1, caches[b].state.get(), moe_layer, true});
    Buf<float> q(be, randn(B * nh * cfg.qk_head_dim(), 9)), o(be, B * nh * cfg.v_head_dim);
    const auto& aw = model->weights().layers[moe_layer].attn;
    const double s = time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, 0.1f, o.data()); }, 20);
    const double sq = time_queued([&] { be.mla_attention(cfg, aw, q.data(), seqs, 0.1f, o.data()); }, 20);
    const double bytes = double(B) * Tctx * (C + dr) * 2;
    std::printf("\nMLA absorbed decode attention, batch %lld x %lld context: %.1f us alone, %.1f us queued (bandwidth floor %.1f us, %.0f%% / %.0f%%)\n",
                static_cast<long long>(B), static_cast<long long>(Tctx), s * 1e6, sq * 1e6, bytes / bw * 1e6, 100 * bytes / bw / s,
                100 * bytes / bw / sq);
    out["mla_decode"] = {{"batch", B}, {"context", Tctx}, {"seconds", s}, {"seconds_queued", sq}, {"bytes", bytes}};
  }

  // ---- decode steps and prefill
  json dec = json::array();
  std::printf("\n%7s %12s %12s\n", "batch", "step ms", "tokens/s");
  uint64_t peak = used_bytes() - base;
  for (int64_t B : {1, 16, 64, 128, 256}) {
    try {
      GreedyBatch g(*model, B);
      const int steps = 16;
      std::vector<double> t;
      for (int s = 0; s < steps; ++s) {
        const auto t0 = clk::now();
        g.step();
        t.push_back(std::chrono::duration<double>(clk::now() - t0).count());
      }
      const double st = median(t);
      std::printf("%7lld %12.2f %12.1f\n", static_cast<long long>(B), st * 1e3, B / st);
      dec.push_back({{"batch", B}, {"step_seconds", st}, {"tokens_per_s", B / st}});
      peak = std::max<uint64_t>(peak, used_bytes() - base);
    } catch (const std::exception& e) {
      std::printf("%7lld  failed: %s\n", static_cast<long long>(B), e.what());
      dec.push_back({{"batch", B}, {"error", e.what()}});
    }
  }
  out["decode"] = dec;
  {
    const int64_t B = 4, T = 1024;
    std::vector<std::vector<int32_t>> prompts(B);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) prompts[b].push_back(static_cast<int32_t>((b * 7919 + t * 31 + 5) % cfg.vocab_size));
    std::vector<double> ts;
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<KvCache> caches;
      std::vector<ForwardItem> items;
      for (int64_t b = 0; b < B; ++b) caches.push_back(model->new_cache());
      for (int64_t b = 0; b < B; ++b) items.push_back({&caches[b], prompts[b].data(), T, false});
      std::vector<std::vector<float>> logits;
      backend->synchronize();
      const auto t0 = clk::now();
      model->forward(items, logits);
      ts.push_back(std::chrono::duration<double>(clk::now() - t0).count());
      peak = std::max<uint64_t>(peak, used_bytes() - base);
    }
    const double s = *std::min_element(ts.begin() + 1, ts.end());
    // FLOPs: 2 x the weights each token passes through (routed: top-k experts; kv_b_proj per cached token in the
    // expanded form), plus causal attention scores and values; lm_head on the last token only.
    double per_tok = 0;
    const int64_t nh = cfg.num_attention_heads, dq = cfg.qk_head_dim(), dv = cfg.v_head_dim;
    for (const auto& lw : model->weights().layers) {
      const auto& a = lw.attn;
      for (const Linear* l : {a.q_proj ? &*a.q_proj : nullptr, a.q_a_proj ? &*a.q_a_proj : nullptr,
                              a.q_b_proj ? &*a.q_b_proj : nullptr, &a.kv_a_proj, &a.kv_b_proj, &a.o_proj})
        if (l) per_tok += 2.0 * l->out * l->in;
      per_tok += 2.0 * nh * (dq + dv) * (T + 1) / 2.0;
      if (lw.mlp) per_tok += 2.0 * 3 * lw.mlp->gate.out * lw.mlp->gate.in;
      if (lw.moe) {
        per_tok += 2.0 * (K * 3.0 * H * I + E * H);
        if (lw.moe->shared) per_tok += 2.0 * 3 * lw.moe->shared->gate.out * H;
      }
    }
    const double flops = per_tok * B * T;
    std::printf("\nprefill %lld x %lld tokens: %.1f ms, %.0f tokens/s, %.0f TFLOP/s (%.0f%% of the BF16 tensor-core rate)\n",
                static_cast<long long>(B), static_cast<long long>(T), s * 1e3, B * T / s, flops / s / 1e12,
                100 * flops / s / tc);
    out["prefill"] = {{"batch", B}, {"tokens", T}, {"seconds", s}, {"tokens_per_s", B * T / s}, {"flops", flops}};
  }
  out["peak_bytes"] = peak;
  std::printf("peak device memory (process, incl. CUDA context and pools): %.2f GB\n", peak / 1e9);
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(1) << "\n";
  return 0;
}


// One MoE block at T tokens and one batch-1 decode step, each run once between cudaProfilerStart/Stop after
// warm-up, for `ncu --profile-from-start off` (per-kernel times); also prints the decode step's wall time over
// 20 unprofiled steps, to compare with the sum of its kernels.
int run_profile(const std::string& dir, int64_t T, int64_t prefill, int64_t batch) {
  auto backend = std::make_shared<CudaBackend>(0);
  backend->set_batch_invariant_attention(env_on("KSCOPE_INVARIANT_ATTENTION"));
  apply_kernel_env();
  auto model = Model::load(dir, backend);
  const auto& cfg = model->config();
  Backend& be = model->backend();
  if (prefill > 0) {  // one prefill of 1 x `prefill` tokens
    std::vector<int32_t> prompt;
    for (int64_t t = 0; t < prefill; ++t) prompt.push_back(static_cast<int32_t>((t * 31 + 5) % cfg.vocab_size));
    auto once = [&] {
      KvCache cache = model->new_cache();
      std::vector<ForwardItem> items{{&cache, prompt.data(), prefill, false}};
      std::vector<std::vector<float>> logits;
      model->forward(items, logits);
      backend->synchronize();
    };
    const double s = time_it(once, 3, 1);
    CU(cudaProfilerStart());
    once();
    CU(cudaProfilerStop());
    std::printf("prefill 1 x %lld tokens: %.2f ms (wall, median of 3)\n", static_cast<long long>(prefill), s * 1e3);
    return 0;
  }
  int64_t moe_layer = -1;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (model->weights().layers[l].moe) { moe_layer = l; break; }
  KSCOPE_CHECK(moe_layer >= 0, input, dir, "no MoE layer to profile");
  MoeStep step(be, cfg, *model->weights().layers[moe_layer].moe, T);
  const double s_moe = time_it(step, 20);
  CU(cudaProfilerStart());
  step();
  CU(cudaDeviceSynchronize());
  CU(cudaProfilerStop());
  // the decode step of `batch` sequences (the decode table's)
  GreedyBatch g(*model, batch);
  auto dstep = [&] { g.step(); };
  const double s_dec = time_it(dstep, 20);
  CU(cudaProfilerStart());
  dstep();
  CU(cudaDeviceSynchronize());
  CU(cudaProfilerStop());
  std::printf("MoE block, %lld tokens: %.1f us; decode step, batch %lld: %.1f us (wall, median of 20)\n",
              static_cast<long long>(T), s_moe * 1e6, static_cast<long long>(batch), s_dec * 1e6);
  return 0;
}

}  // namespace


// Absorbed (decode) MLA attention at Kimi-K2's attention shapes (64 heads, nope 128, rope 64, v 128, kv_lora 512),
// over random bf16 caches, for several batch x context sizes: the default (tiles by tensor copies; the kernel with
// specialized warpgroups for long splits), that kernel at every size ("spec."), the previous warpgroup-MMA kernel
// with tensor copies ("wgmma") and with cp.async loads, the mma.sync kernel and the CUDA-core kernel in the same run, against the bandwidth floor (the cache read
// once) and the tensor-core floor; speedup is mma.sync / default. Each call is timed alone (synchronized: its host
// work — row lists, tensor maps, their upload — before the device starts), and the default also with the calls
// queued back to back ("queued", as a decode step's layers run: the host's work overlaps the device's).
int run_mla(const std::string& json_out) {
  const double bw = hbm_bandwidth(), tc = bf16_tensor_rate();
  std::printf("device: HBM %.0f GB/s (copy), BF16 tensor cores %.0f TFLOP/s (cuBLAS)\n", bw / 1e9, tc / 1e12);
  ModelConfig cfg;
  cfg.num_attention_heads = 64;
  cfg.qk_nope_head_dim = 128;
  cfg.qk_rope_head_dim = 64;
  cfg.v_head_dim = 128;
  cfg.kv_lora_rank = 512;
  cfg.num_hidden_layers = 1;
  const int64_t nh = 64, C = 512, dr = 64, dq = 192, dv = 128;
  // random bf16 linears held in host memory (kv_b_proj at its K2 shape; the others small: only decode attention runs)
  struct HostLin {
    std::vector<uint8_t> w;
    TensorInfo t;
  };
  std::deque<HostLin> store;
  auto lin = [&](Linear& l, const std::string& name, int64_t out, int64_t in) {
    auto& h = store.emplace_back();
    h.w.resize(out * in * 2);
    std::mt19937 rng(static_cast<uint32_t>(out * 31 + in));
    std::normal_distribution<float> d(0.0f, 1.0f / std::sqrt(static_cast<float>(in)));
    for (int64_t i = 0; i < out * in; ++i) {
      const float f = d(rng);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      const uint16_t bb = static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
      std::memcpy(h.w.data() + 2 * i, &bb, 2);
    }
    h.t.name = name + ".weight";
    h.t.file = "bench";
    h.t.dtype = DType::BF16;
    h.t.shape = {out, in};
    h.t.data = h.w.data();
    h.t.nbytes = h.w.size();
    l.name = name;
    l.out = out;
    l.in = in;
    l.weight = &h.t;
  };
  AttentionWeights aw;
  const int64_t H = 64;
  lin(aw.kv_b_proj, "kv_b_proj", nh * 256, C);
  lin(aw.kv_a_proj, "kv_a_proj", C + dr, H);
  lin(aw.o_proj, "o_proj", H, nh * dv);
  aw.q_proj.emplace();
  lin(*aw.q_proj, "q_proj", nh * dq, H);
  CudaBackend be(0);
  be.set_batch_invariant_attention(env_on("KSCOPE_INVARIANT_ATTENTION"));
  be.prepare_attention(cfg, aw);
  json rows = json::array();
  std::printf("\n%6s %8s %10s %10s %10s %10s %12s %12s %12s %8s %8s %10s\n", "batch", "context", "default us", "queued us", "spec. us", "wgmma us", "cp.async us",
              "mma.sync us", "cuda-core us", "speedup", "% bw", "TFLOP/s");
  const auto sizes = sizes_from_env("MLA_SIZES", {{1, 4096}, {1, 32768}, {8, 4096}, {64, 1024}, {64, 4096}, {128, 4096}, {256, 1024}});
  const bool skip_simple = std::getenv("MLA_SKIP_SIMPLE") != nullptr;
  for (auto [B, T] : sizes) {
    const auto lat = randn(T * (C + dr), 7 + T);
    Buf<float> ckv(be, lat), latent(be, T * C);
    be.rmsnorm(ckv.data(), std::vector<float>(C, 1.0f), T, C, 1e-6f, latent.data(), C + dr);
    std::vector<std::unique_ptr<KvState>> kv;
    std::vector<AttnSeq> seqs;
    for (int64_t b = 0; b < B; ++b) {
      kv.push_back(be.new_kv(cfg));
      be.kv_append(*kv.back(), 0, latent.data(), ckv.data(), 0, T, C, dr);
      seqs.push_back({b, 1, T - 1, kv.back().get(), 0, true});
    }
    Buf<float> q(be, randn(B * nh * dq, 9)), o1(be, B * nh * dv), o2(be, B * nh * dv);
    const float scale = 1.0f / std::sqrt(static_cast<float>(dq));
    const double t_fast = time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o1.data()); }, 10);
    const double t_queued = time_queued([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data()); }, 20);
    CudaBackend::set_mla_specialized(2);
    const double t_ws = time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data()); }, 10);
    CudaBackend::set_mla_specialized(0);
    const double t_wg = time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data()); }, 10);
    CudaBackend::set_mla_specialized(1);
    CudaBackend::set_mla_tma(false);
    const double t_cpa = time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data()); }, 10);
    CudaBackend::set_mla_tma(true);
    CudaBackend::force_mla_mma_sync(true);
    const double t_mma = time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data()); }, 10);
    CudaBackend::force_mla_mma_sync(false);
    CudaBackend::force_simple_attention(true);
    const double t_simple = skip_simple ? NAN : time_it([&] { be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data()); }, B * T > 300000 ? 3 : 10, 1);
    if (skip_simple) be.mla_attention(cfg, aw, q.data(), seqs, scale, o2.data());
    CudaBackend::force_simple_attention(false);
    const auto a = o1.host(), b2 = o2.host();
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (a[i] - b2[i]) * (a[i] - b2[i]);
      den += b2[i] * b2[i];
    }
    const double bytes = double(B) * T * (C + dr) * 2;
    const double flops = double(B) * nh * T * (C + dr + C) * 2;
    std::printf("%6lld %8lld %10.1f %10.1f %10.1f %10.1f %12.1f %12.1f %12.1f %7.2fx %7.0f%% %10.1f   (rel diff %.1e)\n", static_cast<long long>(B),
                static_cast<long long>(T), t_fast * 1e6, t_queued * 1e6, t_ws * 1e6, t_wg * 1e6, t_cpa * 1e6, t_mma * 1e6, t_simple * 1e6, t_mma / t_fast, 100 * bytes / bw / t_fast,
                flops / t_fast / 1e12, std::sqrt(num / den));
    rows.push_back({{"batch", B}, {"context", T}, {"tensor_s", t_fast}, {"queued_s", t_queued}, {"specialized_s", t_ws}, {"wgmma_s", t_wg}, {"cp_async_s", t_cpa}, {"mma_sync_s", t_mma}, {"cuda_core_s", t_simple}, {"bytes", bytes}, {"flops", flops},
                    {"bw_floor_s", bytes / bw}, {"tc_floor_s", flops / tc}, {"rel_diff", std::sqrt(num / den)}});
  }
  if (!json_out.empty()) std::ofstream(json_out) << json({{"hbm_bytes_per_s", bw}, {"bf16_flops", tc}, {"mla", rows}}).dump(2) << "\n";
  return 0;
}

// Prefill (expanded-form) attention alone at Kimi-K2's head shapes (64 heads, nope 128 + rope 64, v 128) over B
// causal sequences of T tokens: the warpgroup-MMA kernel (128-row tiles, kvx converted to bf16 first) and the
// mma.sync one (64-row tiles over fp32 kvx) on the same random inputs, their bits compared, against the tensor-core
// floor of the causal attention's FLOPs (scores and values: sum over rows of keys x heads x (192 + 128) x 2).
// FLASH_SIZES="1x4096,4x1024" overrides the sizes.
int run_flash(const std::string& json_out) {
  const double tc = bf16_tensor_rate();
  std::printf("device: BF16 tensor cores %.0f TFLOP/s (cuBLAS)\n", tc / 1e12);
  const int nh = 64, dq = 192, dv = 128, dr = 64;
  cuda::AttnDims d{nh, 128, dr, dv, 512, 1.0f / std::sqrt(192.0f)};
  const auto sizes = sizes_from_env("FLASH_SIZES", {{4, 1024}, {1, 4096}, {1, 8192}, {16, 512}});
  json rows_out = json::array();
  std::printf("\n%6s %7s %10s %12s %10s %9s %8s %8s %10s\n", "batch", "tokens", "wgmma us", "mma.sync us", "to-bf16 us",
              "speedup", "TFLOP/s", "% tc", "same bits");
  auto fill = [](std::vector<float>& v, uint64_t seed) {  // uniform in [-2, 2): a quick generator for large inputs
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (auto& f : v) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      f = static_cast<float>((x >> 40) & 0xFFFFFF) / 4194304.0f - 2.0f;
    }
  };
  for (auto [B, T] : sizes) {
    const int64_t N = B * T;
    std::vector<float> kvx_h(N * nh * 256), q_h(N * nh * dq), rope_f(N * dr);
    fill(kvx_h, 1 + N);
    fill(q_h, 2 + N);
    fill(rope_f, 3 + N);
    std::vector<uint16_t> rope_h(rope_f.size());
    for (size_t i = 0; i < rope_f.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, &rope_f[i], 4);
      rope_h[i] = static_cast<uint16_t>(u >> 16);
    }
    float *kvx32, *kvx16, *scratch, *q, *o1, *o2;
    void *rope, *meta;
    const size_t kvb = kvx_h.size() * 4;
    CU(cudaMalloc(&kvx32, kvb));
    CU(cudaMalloc(&kvx16, kvb));
    CU(cudaMalloc(&scratch, kvb));
    CU(cudaMalloc(&q, q_h.size() * 4));
    CU(cudaMalloc(&o1, N * nh * dv * 4));
    CU(cudaMalloc(&o2, N * nh * dv * 4));
    CU(cudaMalloc(&rope, rope_h.size() * 2));
    CU(cudaMemcpy(kvx32, kvx_h.data(), kvb, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(kvx16, kvx_h.data(), kvb, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(q, q_h.data(), q_h.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(rope, rope_h.data(), rope_h.size() * 2, cudaMemcpyHostToDevice));
    cuda::kvx_to_bf16(kvx16, N * nh, nullptr);
    // rows and tiles as CudaBackend::mla_attention builds them: rows of one sequence, tiles of consecutive rows
    auto build = [&](float* kvx, int tile_rows, std::vector<cuda::AttnRow>& rows, std::vector<cuda::AttnTile>& tiles) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < T; ++i) {
          rows.push_back({nullptr, static_cast<const cuda::bf16*>(rope) + b * T * dr, kvx + b * T * nh * 256,
                          static_cast<int>(i + 1), static_cast<int>(b * T + i)});
          if (i % tile_rows == 0) tiles.push_back({static_cast<int>(b * T + i), 0});
          ++tiles.back().count;
        }
    };
    std::vector<cuda::AttnRow> r_wg, r_mma;
    std::vector<cuda::AttnTile> t_wg, t_mma;
    build(kvx16, cuda::flash_tile_rows(d), r_wg, t_wg);
    build(kvx32, cuda::kFlashTileRows, r_mma, t_mma);
    const size_t rb = r_wg.size() * sizeof(cuda::AttnRow);
    CU(cudaMalloc(&meta, 2 * rb + (t_wg.size() + t_mma.size()) * sizeof(cuda::AttnTile)));
    auto* m = static_cast<unsigned char*>(meta);
    CU(cudaMemcpy(m, r_wg.data(), rb, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(m + rb, r_mma.data(), rb, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(m + 2 * rb, t_wg.data(), t_wg.size() * sizeof(cuda::AttnTile), cudaMemcpyHostToDevice));
    CU(cudaMemcpy(m + 2 * rb + t_wg.size() * sizeof(cuda::AttnTile), t_mma.data(), t_mma.size() * sizeof(cuda::AttnTile),
                  cudaMemcpyHostToDevice));
    const auto* rw = reinterpret_cast<const cuda::AttnRow*>(m);
    const auto* rm = reinterpret_cast<const cuda::AttnRow*>(m + rb);
    const auto* tw = reinterpret_cast<const cuda::AttnTile*>(m + 2 * rb);
    const auto* tm = reinterpret_cast<const cuda::AttnTile*>(m + 2 * rb + t_wg.size() * sizeof(cuda::AttnTile));
    const int reps = N * T > 8'000'000 ? 5 : 10;
    const double s_wg = time_it([&] { cuda::attention_expanded_tiles(d, q, rw, tw, static_cast<int>(t_wg.size()), o1, nullptr); }, reps);
    cuda::set_flash_wg(false);
    const double s_mma = time_it([&] { cuda::attention_expanded_tiles(d, q, rm, tm, static_cast<int>(t_mma.size()), o2, nullptr); }, reps);
    cuda::set_flash_wg(true);
    const double s_conv = time_it([&] { cuda::kvx_to_bf16(scratch, N * nh, nullptr); }, reps);
    std::vector<float> a(N * nh * dv), b2(N * nh * dv);
    CU(cudaMemcpy(a.data(), o1, a.size() * 4, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(b2.data(), o2, b2.size() * 4, cudaMemcpyDeviceToHost));
    const bool same = std::memcmp(a.data(), b2.data(), a.size() * 4) == 0;
    const double flops = double(B) * nh * (dq + dv) * 2.0 * (double(T) * (T + 1) / 2);
    std::printf("%6lld %7lld %10.1f %12.1f %10.1f %8.2fx %8.0f %7.0f%% %10s\n", static_cast<long long>(B),
                static_cast<long long>(T), s_wg * 1e6, s_mma * 1e6, s_conv * 1e6, s_mma / s_wg, flops / s_wg / 1e12,
                100 * flops / s_wg / tc, same ? "yes" : "NO");
    rows_out.push_back({{"batch", B}, {"tokens", T}, {"wgmma_s", s_wg}, {"mma_sync_s", s_mma}, {"to_bf16_s", s_conv},
                        {"flops", flops}, {"tc_floor_s", flops / tc}, {"same_bits", same}});
    for (void* p : {static_cast<void*>(kvx32), static_cast<void*>(kvx16), static_cast<void*>(scratch), static_cast<void*>(q),
                    static_cast<void*>(o1), static_cast<void*>(o2), rope, meta})
      cudaFree(p);
    if (!same) return 1;
  }
  if (!json_out.empty()) std::ofstream(json_out) << json({{"bf16_flops", tc}, {"flash", rows_out}}).dump(2) << "\n";
  return 0;
}

// The dense matmul kernels alone at Kimi-K2 shapes, in every format, over 1-4096 rows: the streamed-weight kernel
// (set_tile_rows(0, 0)) and the many-row kernels (set_tile_rows(1, 1)), mma.sync tile and wgmma (set_wg_gemm), on
// the same device weights (random
// values of the format), cuBLAS BF16 (fp32 accumulation, bf16 output) on the bf16 shape as the peer, each against
// the bandwidth floor (weights + X + fp32 Y once) and the tensor-core floor.
int run_gemm(const std::string& json_out) {
  const double bw = hbm_bandwidth(), tc = bf16_tensor_rate();
  std::printf("device: HBM %.0f GB/s (copy), BF16 tensor cores %.0f TFLOP/s (cuBLAS)\n", bw / 1e9, tc / 1e12);
  struct Shape { const char* name; int N, K; bool pair; };
  const Shape shapes[] = {{"q_a 1536x7168", 1536, 7168, false}, {"o_proj 7168x8192", 7168, 8192, false},
                          {"gate+up 2x18432x7168", 18432, 7168, true}, {"down 7168x18432", 7168, 18432, false}};
  // some row counts (profiling): GEMM_ROWS=4096 or 128,4096
  const std::vector<int> rows = env_list("GEMM_ROWS", {1, 8, 32, 64, 128, 256, 512, 1024, 4096});
  const char* only_matrix = std::getenv("GEMM_MATRIX");                  // GEMM_MATRIX (a part of its name),
  const char* only_fmt = std::getenv("GEMM_FMT");                        // GEMM_FMT (bf16, fp8, int4)
  const int maxM = 4096;
  std::mt19937 rng(5);
  auto random_bytes = [&](size_t n, uint8_t mask) {  // device bytes from a repeated 16 MiB random pattern
    std::vector<uint8_t> h(std::min<size_t>(n, 16 << 20));
    for (auto& b : h) b = static_cast<uint8_t>(rng()) & mask;
    uint8_t* d = nullptr;
    CU(cudaMalloc(&d, n));
    for (size_t o = 0; o < n; o += h.size()) CU(cudaMemcpy(d + o, h.data(), std::min(h.size(), n - o), cudaMemcpyHostToDevice));
    return d;
  };
  auto const_floats = [&](size_t n, float v) {
    std::vector<float> h(n, v);
    float* d = nullptr;
    CU(cudaMalloc(&d, n * 4));
    CU(cudaMemcpy(d, h.data(), n * 4, cudaMemcpyHostToDevice));
    return d;
  };
  cuda::bf16* X = reinterpret_cast<cuda::bf16*>(random_bytes(size_t(maxM) * 18432 * 2, 0xbf));  // |x| < 2 in bf16 (sign, exponent <= 127)
  float *Y = nullptr, *Y2 = nullptr;
  CU(cudaMalloc(&Y, size_t(maxM) * 18432 * 4));
  CU(cudaMalloc(&Y2, size_t(maxM) * 18432 * 4));
  cublasHandle_t h;
  cublasCreate(&h);
  json out = json::array();
  cudaStream_t st = nullptr;
  const char* wg_rows_env = std::getenv("KSCOPE_WG_ROWS");  // the wgmma kernel's rows per block (default: by shape)
  const int wg_rows = wg_rows_env ? std::atoi(wg_rows_env) : 0;
  std::printf("\n%-22s %-5s %5s %10s %10s %10s %10s %8s %8s %9s\n", "matrix", "fmt", "rows", "streamed", "tile",
              "wgmma", "cuBLAS", "wg bw%", "wg tc%", "wg/cuBLAS");
  std::printf("(tile: the mma.sync many-row kernel at the format's default block, 128 features for bf16, 256 for\n"
              " FP8/INT4; wgmma: the warpgroup-MMA one; floor%%: the fastest\n"
              " kernel of the row count against max(bandwidth, tensor-core) floor)\n");
  for (const Shape& sh : shapes)
    for (int fmt : {cuda::kBf16, cuda::kFp8, cuda::kInt4}) {
      const char* fname = fmt == cuda::kBf16 ? "bf16" : fmt == cuda::kFp8 ? "fp8" : "int4";
      if ((only_matrix && !std::strstr(sh.name, only_matrix)) || (only_fmt && std::string(only_fmt) != fname)) continue;
      cuda::DLin W;
      W.fmt = fmt;
      W.N = sh.N;
      W.K = sh.K;
      const size_t wbytes = fmt == cuda::kBf16 ? size_t(sh.N) * sh.K * 2 : fmt == cuda::kFp8 ? size_t(sh.N) * sh.K : size_t(sh.N) * sh.K / 2;
      W.w_ld = static_cast<int64_t>(wbytes / sh.N);
      // bf16 values |w| < 2 (exponent byte <= 0x3f), e4m3 without NaN (exponent <= 7), any nibbles
      W.w = random_bytes(wbytes * (sh.pair ? 2 : 1), fmt == cuda::kBf16 ? 0xbf : fmt == cuda::kFp8 ? 0xbf : 0xff);
      if (fmt == cuda::kFp8) {
        W.bo = W.bi = 128;
        W.s_cols = sh.K / 128;
        W.s = const_floats(size_t(sh.N / 128 + 1) * W.s_cols, 1.0f / 64);
      } else if (fmt == cuda::kInt4) {
        W.g = 32;
        W.s_cols = sh.K / 32;
        {  // bf16 scales 1/64 (0x3c80), stored as compressed-tensors ships them
          std::vector<uint16_t> hs(size_t(sh.N) * W.s_cols, 0x3c80);
          uint16_t* ds = nullptr;
          CU(cudaMalloc(&ds, hs.size() * 2));
          CU(cudaMemcpy(ds, hs.data(), hs.size() * 2, cudaMemcpyHostToDevice));
          W.s16 = ds;
        }
      }
      cuda::DLin W2 = W;  // the pair's second matrix: the next rows of the same allocation (cuBLAS: one [2N, K])
      W2.w = W.w + wbytes;
      for (int M : rows) {
        auto call = [&] { cuda::gemm(X, M, Y, W, {}, (M + cuda::kBM - 1) / cuda::kBM, st, sh.pair ? Y2 : nullptr, sh.pair ? &W2 : nullptr); };
        CudaBackend::set_tile_rows(0, 0);
        const double t_few = time_it(call, 10);
        CudaBackend::set_tile_rows(1, 1);
        CudaBackend::set_wg_gemm(false);
        const double t_tile = time_it(call, 10);
        CudaBackend::set_wg_gemm(true, wg_rows);
        const double t_wg = time_it(call, 10);
        CudaBackend::set_wg_gemm(true, 0);
        CudaBackend::set_tile_rows(-1, -1);
        double t_cublas = NAN;
        if (fmt == cuda::kBf16) {
          const float one = 1, zero = 0;
          const int n_all = sh.N * (sh.pair ? 2 : 1);
          // C[n_all, M] (column-major) = W[n_all, K] · Xᵀ: Y row-major [M, n_all]; weights reused for the pair
          t_cublas = time_it([&] {
            cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n_all, M, sh.K, &one, W.w, CUDA_R_16BF, sh.K, X, CUDA_R_16BF, sh.K, &zero, Y,
                         CUDA_R_16BF, n_all, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          }, 10);
        }
        const double mats = sh.pair ? 2.0 : 1.0;
        const double flops = 2.0 * M * double(sh.N) * sh.K * mats;
        const double bytes = mats * (wbytes + (W.s ? 4.0 * sh.N * sh.K / 16384 : W.s16 ? 2.0 * sh.N * sh.K / 32 : 0)) +
                             2.0 * M * sh.K + mats * 4.0 * M * sh.N;
        const double floor = std::max(bytes / bw, flops / tc);
        const double t_best = std::min({t_few, t_tile, std::isnan(t_wg) ? t_tile : t_wg});
        std::printf("%-22s %-5s %5d %10.1f %10.1f %10.1f %10.1f %7.0f%% %7.0f%% %9.2f   (floor %.0f%%)\n", sh.name,
                    fmt == cuda::kBf16 ? "bf16" : fmt == cuda::kFp8 ? "fp8" : "int4", M, t_few * 1e6, t_tile * 1e6,
                    t_wg * 1e6, t_cublas * 1e6, 100 * bytes / bw / t_wg, 100 * flops / tc / t_wg, t_wg / t_cublas,
                    100 * floor / t_best);
        out.push_back({{"matrix", sh.name}, {"fmt", fmt}, {"rows", M}, {"streamed_s", t_few}, {"tile_s", t_tile},
                       {"wgmma_s", std::isnan(t_wg) ? json(nullptr) : json(t_wg)},
                       {"cublas_s", std::isnan(t_cublas) ? json(nullptr) : json(t_cublas)}, {"flops", flops}, {"bytes", bytes}});
      }
      cudaFree(const_cast<uint8_t*>(W.w));
      if (W.s) cudaFree(const_cast<float*>(W.s));
      if (W.s16) cudaFree(const_cast<uint16_t*>(W.s16));
    }
  cublasDestroy(h);
  cudaFree(X);
  cudaFree(Y);
  cudaFree(Y2);
  if (!json_out.empty()) std::ofstream(json_out) << json({{"hbm_bytes_per_s", bw}, {"bf16_flops", tc}, {"gemm", out}}).dump(1) << "\n";
  return 0;
}

int main(int argc, char** argv) {
  try {
    if (argc >= 3 && std::string(argv[1]) == "make") {
      MakeModelSpec s;
      s.preset = "kimi-k2-slice";
      s.seed = 1;
      for (int i = 3; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--format" && i + 1 < argc) s.format = parse_stored_format(argv[++i]);
        else if (a == "--layers" && i + 1 < argc) s.layers = std::stoll(argv[++i]);
      }
      const auto t0 = clk::now();
      make_model(argv[2], s, [](uint64_t d, uint64_t t) {
        static int last = -1;
        const int pct = static_cast<int>(100.0 * d / t);
        if (pct / 10 != last) { last = pct / 10; std::fprintf(stderr, "  writing %d%%\n", pct); }
      });
      std::printf("wrote %s in %.1f s\n", argv[2], std::chrono::duration<double>(clk::now() - t0).count());
      return 0;
    }
    if (argc >= 3 && (std::string(argv[1]) == "run" || std::string(argv[1]) == "moe")) {
      std::string js;
      for (int i = 3; i < argc; ++i)
        if (std::string(argv[i]) == "--json" && i + 1 < argc) js = argv[++i];
      return run(argv[2], js, std::string(argv[1]) == "moe");
    }
    if (argc >= 2 && std::string(argv[1]) == "mla") {
      std::string js;
      for (int i = 2; i < argc; ++i)
        if (std::string(argv[i]) == "--json" && i + 1 < argc) js = argv[++i];
      return run_mla(js);
    }
    if (argc >= 3 && std::string(argv[1]) == "profile") {
      int64_t T = 1, prefill = 0, batch = 1;
      for (int i = 3; i < argc; ++i) {
        if (std::string(argv[i]) == "--tokens" && i + 1 < argc) T = std::stoll(argv[++i]);
        else if (std::string(argv[i]) == "--prefill" && i + 1 < argc) prefill = std::stoll(argv[++i]);
        else if (std::string(argv[i]) == "--batch" && i + 1 < argc) batch = std::stoll(argv[++i]);
      }
      KSCOPE_CHECK(batch >= 1, input, "profile", "--batch must be at least 1, not {}", batch);
      return run_profile(argv[2], T, prefill, batch);
    }
    if (argc >= 2 && std::string(argv[1]) == "flash") {
      std::string js;
      for (int i = 2; i < argc; ++i)
        if (std::string(argv[i]) == "--json" && i + 1 < argc) js = argv[++i];
      return run_flash(js);
    }
    if (argc >= 2 && std::string(argv[1]) == "gemm") {
      std::string js;
      for (int i = 2; i < argc; ++i)
        if (std::string(argv[i]) == "--json" && i + 1 < argc) js = argv[++i];
      return run_gemm(js);
    }
    std::fprintf(stderr, "usage: bench_gpu make DIR --format bf16|fp8|int4 [--layers N] | bench_gpu run DIR [--json FILE] | bench_gpu moe DIR [--json FILE] | bench_gpu mla [--json FILE] | bench_gpu profile DIR [--tokens T] [--prefill T] [--batch B] | bench_gpu gemm [--json FILE] | bench_gpu flash [--json FILE]\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
}
