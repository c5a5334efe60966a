// CPU benchmark (not a test): checkpoint open+validate time, prefill and decode tokens/s, on a generated
// mid-size checkpoint in each stored format. Prints a Markdown table for bench/RESULTS.md.
//   bench_cpu [--preset mid] [--dir DIR] [--batches 1,4,16] [--steps 16] [--prompt 64]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "model/info.hpp"
#include "model/make_model.hpp"
#include "model/model.hpp"
#include "util/thread_pool.hpp"

using namespace kscope;
namespace fs = std::filesystem;
using clk = std::chrono::steady_clock;

static double secs(clk::time_point a) { return std::chrono::duration<double>(clk::now() - a).count(); }

int main(int argc, char** argv) {
  std::string preset = "mid", dir = (fs::temp_directory_path() / "kscope-bench").string();
  std::vector<int> batches = {1, 4, 16};
  int steps = 16, prompt = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--preset") preset = v;
    else if (k == "--dir") dir = v;
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--prompt") prompt = std::stoi(v);
    else if (k == "--batches") {
      batches.clear();
      size_t p = 0;
      while (p < v.size()) {
        const size_t q = v.find(',', p);
        batches.push_back(std::stoi(v.substr(p, q - p)));
        p = q == std::string::npos ? v.size() : q + 1;
      }
    }
  }
  // Host memory bandwidth: a 1 GiB copy, bytes read + written, best of 3 (the decode floor's denominator).
  double bw = 0;
  {
    std::vector<char> a(1 << 30, 1), b(1 << 30, 2);
    for (int r = 0; r < 3; ++r) {
      auto t = clk::now();
      ThreadPool::global().parallel_for(64, 1, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) std::memcpy(b.data() + (i << 24), a.data() + (i << 24), 1 << 24);
      });
      bw = std::max(bw, 2.0 * (1 << 30) / secs(t));
    }
  }
  fmt::print("host copy bandwidth {:.1f} GB/s (read + write)\n\n", bw / 1e9);
  fmt::print("| format | weights | weight bytes / decode token | open+validate s | prefill tok/s (1x{}) | ", prompt);
  for (int b : batches) fmt::print("decode tok/s b={} | ", b);
  fmt::print("b=1 weight GB/s (of {:.1f}) |\n|", bw / 1e9);
  for (size_t i = 0; i < batches.size() + 6; ++i) fmt::print("---|");
  fmt::print("\n");
  for (std::string fmtname : {"bf16", "fp8", "int4"}) {
    const std::string path = dir + "/" + preset + "-" + fmtname;
    if (!fs::exists(path + "/config.json")) {
      MakeModelSpec s;
      s.preset = preset;
      s.format = parse_stored_format(fmtname);
      make_model(path, s);
    }
    auto t0 = clk::now();
    auto model = Model::load(path);
    const double open_s = secs(t0);
    const ModelInfo mi = model_info(model->config(), model->weights());
    // bytes a batch-1 decode step must read: everything but the embedding table and the routed experts,
    // plus top-k experts in each MoE layer
    const auto& cfgm = model->config();
    int64_t n_moe = 0;
    for (int64_t l = 0; l < cfgm.num_hidden_layers; ++l) n_moe += cfgm.is_moe_layer(l);
    const uint64_t expert_bytes = n_moe ? mi.bytes_by_kind.at("routed_experts") / (n_moe * cfgm.n_routed_experts) : 0;
    const uint64_t step_bytes = mi.total_bytes - mi.bytes_by_kind.at("embedding") -
                                (n_moe ? mi.bytes_by_kind.at("routed_experts") : 0) + n_moe * cfgm.num_experts_per_tok * expert_bytes;
    const int64_t V = model->config().vocab_size;
    // prefill one prompt
    std::vector<int32_t> ids(prompt);
    for (int i = 0; i < prompt; ++i) ids[i] = (i * 7919 + 13) % V;
    KvCache c = model->new_cache();
    std::vector<ForwardItem> items{{&c, ids.data(), prompt, false}};
    std::vector<std::vector<float>> logits;
    model->forward(items, logits);  // warm-up (page faults on the mapping)
    c = model->new_cache();
    items[0].cache = &c;
    t0 = clk::now();
    model->forward(items, logits);
    const double prefill = prompt / secs(t0);
    fmt::print("| {} | {} | {} | {:.3f} | {:.0f} | ", fmtname, human_bytes(mi.total_bytes), human_bytes(step_bytes), open_s, prefill);
    double b1 = 0;
    for (int b : batches) {
      std::vector<KvCache> caches;
      for (int i = 0; i < b; ++i) caches.push_back(model->new_cache());
      std::vector<int32_t> tok(b);
      std::vector<ForwardItem> it(b);
      for (int i = 0; i < b; ++i) {
        it[i] = {&caches[i], ids.data() + (i % 8), 8, false};  // short prompts
      }
      model->forward(it, logits);
      t0 = clk::now();
      for (int s = 0; s < steps; ++s) {
        for (int i = 0; i < b; ++i) {
          tok[i] = static_cast<int32_t>(std::max_element(logits[i].begin(), logits[i].end()) - logits[i].begin());
          it[i] = {&caches[i], &tok[i], 1, false};
        }
        model->forward(it, logits);
      }
      const double tps = steps * b / secs(t0);
      if (b == 1) b1 = tps;
      fmt::print("{:.1f} | ", tps);
    }
    fmt::print("{:.1f} ({:.0f}%) |\n", b1 * step_bytes / 1e9, 100 * b1 * step_bytes / bw);
    std::fflush(stdout);
  }
  fmt::print("\n{} threads; preset {}; decode after an 8-token prompt, {} greedy steps\n", ThreadPool::global().size(), preset, steps);
  return 0;
}
