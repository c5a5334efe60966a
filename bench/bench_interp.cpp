// Interpretability overhead (not a test): plain batched decode against the same decode with (a) capture of 9
// sites on every token, (b) a different steering vector and coefficient on every row, (c) both.
//   bench_interp [MODEL_DIR] [--batch 16] [--steps 32] [--device cpu|cuda]
// On cuda, KSCOPE_COPY_STREAM=0 copies captures out on the compute stream instead of the copy stream (to compare).
// After the table: the time the capture hooks spent filing rows (allocation + copy, thread-seconds), per generate()
// call, and the delivery thread's busy time and what generate() waited for it (KSCOPE_DELIVERY_THREADS: how many
// threads file one pass's rows; default half the host's threads, at most 8).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "interp/capture.hpp"
#include "model/make_model.hpp"
#ifdef KSCOPE_HAVE_CUDA
#include "backend/cuda/cuda_backend.hpp"
#endif
#include "util/thread_pool.hpp"

using namespace kscope;
using clk = std::chrono::steady_clock;

int main(int argc, char** argv) {
  std::string dir = (std::filesystem::temp_directory_path() / "kscope-bench/mid-bf16").string();
  int64_t batch = 16, steps = 32;
  std::string device = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--batch" && i + 1 < argc) batch = std::stoll(argv[++i]);
    else if (a == "--steps" && i + 1 < argc) steps = std::stoll(argv[++i]);
    else if (a == "--device" && i + 1 < argc) device = argv[++i];
    else dir = a;
  }
  if (!std::filesystem::exists(dir + "/config.json")) {
    MakeModelSpec s;
    s.preset = "mid";
    make_model(dir, s);
  }
  auto backend = make_backend(device);
#ifdef KSCOPE_HAVE_CUDA
  const char* copy_env = std::getenv("KSCOPE_COPY_STREAM");
  if (auto* cb = dynamic_cast<CudaBackend*>(backend.get()); cb && copy_env && std::string(copy_env) == "0")
    cb->set_capture_copy_stream(false);
#endif
  auto model = Model::load(dir, backend);
  const auto& cfg = model->config();
  const int64_t H = cfg.hidden_size, L = cfg.num_hidden_layers;
  std::vector<GenerateRequest> reqs(batch);
  for (int64_t i = 0; i < batch; ++i) {
    for (int t = 0; t < 8 + i % 5; ++t) reqs[i].prompt.push_back(static_cast<int32_t>((i * 131 + t * 17) % cfg.vocab_size));
    reqs[i].max_new_tokens = steps;
    reqs[i].ignore_eos = true;
  }
  CaptureSpec cs;
  for (int64_t l = 0; l < L; ++l) cs.sites.push_back({SiteKind::resid_post, l});
  cs.sites.push_back({SiteKind::final_norm, -1});
  std::vector<std::vector<Intervention>> ivs(batch);
  std::vector<SeqLayout> layouts(batch);
  for (int64_t i = 0; i < batch; ++i) {
    Intervention iv;
    iv.site = {SiteKind::resid_post, L / 2};
    iv.vector.resize(H);
    for (int64_t d = 0; d < H; ++d) iv.vector[d] = std::sin(0.01f * (d + 1) * (i + 1));
    iv.coef = 0.5 + 0.1 * i;
    iv.positions = PositionSpec::parse("response");
    ivs[i] = {iv};
    layouts[i].prompt_len = static_cast<int64_t>(reqs[i].prompt.size());
  }
  // per run: the delivery thread's busy time and what generate() waited for it (Model::delivery_stats), per call
  std::vector<std::pair<std::string, Model::DeliveryStats>> delivery;
  auto run = [&](Hook* h, const std::string& name) {
    GenerateOptions o;
    o.observer = h;
    double best = 1e30;
    const auto d0 = model->delivery_stats();
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = clk::now();
      generate(*model, reqs, o);
      best = std::min(best, std::chrono::duration<double>(clk::now() - t0).count());
    }
    auto d = model->delivery_stats();
    d.jobs -= d0.jobs;
    d.busy_seconds -= d0.busy_seconds;
    d.waited_seconds -= d0.waited_seconds;
    if (h) delivery.emplace_back(name, d);
    return batch * steps / best;
  };
  const double plain = run(nullptr, "plain");
  CaptureHook cap(cs, batch);
  const double with_capture = run(&cap, "capture");
  SteeringHook steer(ivs, layouts);
  const double with_steer = run(&steer, "steering");
  CaptureHook cap2(cs, batch);
  HookList both;
  both.hooks = {&steer, &cap2};
  const double with_both = run(&both, "both");
  fmt::print("| run | tok/s | vs plain |\n|---|---|---|\n");
  fmt::print("| plain decode | {:.1f} | 1.00 |\n", plain);
  fmt::print("| capture {} sites, every token | {:.1f} | {:.3f} |\n", cs.sites.size(), with_capture, with_capture / plain);
  fmt::print("| {} rows, each its own steering vector and coefficient | {:.1f} | {:.3f} |\n", batch, with_steer, with_steer / plain);
  fmt::print("| both | {:.1f} | {:.3f} |\n", with_both, with_both / plain);
  fmt::print("\nmodel {} ({} layers, hidden {}), batch {}, {} new tokens per row (prefill included), device {}, {} host "
             "threads, best of 3\n", dir, L, H, batch, steps, device, ThreadPool::global().size());
  // what filing the captured rows cost (allocation + copy into the hook; on a device, the delivery thread's work,
  // hidden while it stays under a step): both hooks filed 3 generate() calls' rows, each call's into fresh memory
  for (const auto* c : {&cap, &cap2}) {
    const auto f = c->filing();
    fmt::print("capture filing{}: {:.0f} MB in {:.1f} thread-ms ({:.2f} GB/s per thread; {:.1f} thread-ms per generate() call)\n",
               c == &cap ? "" : " (with steering)", f.bytes / 1e6, f.seconds * 1e3,
               f.seconds > 0 ? f.bytes / f.seconds / 1e9 : 0.0, f.seconds * 1e3 / 3);
  }
  for (const auto& [name, d] : delivery)
    if (d.jobs > 0)
      fmt::print("delivery ({}): {} passes, delivery thread busy {:.1f} ms, generate() waited {:.1f} ms for it, per "
                 "generate() call\n", name, d.jobs / 3, d.busy_seconds * 1e3 / 3, d.waited_seconds * 1e3 / 3);
  return 0;
}
