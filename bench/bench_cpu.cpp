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
  fmt::print("| format | weights | open+validate s | prefill tok/s (1x{}) | ", prompt);
  for (int b : batches) fmt::print("decode tok/s b={} | ", b);
  fmt::print("\n|---|---|---|---|{}\n", std::string(batches.size() * 4, '-') + "|");
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
    fmt::print("| {} | {} | {:.3f} | {:.0f} | ", fmtname, human_bytes(mi.total_bytes), open_s, prefill);
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
      fmt::print("{:.1f} | ", steps * b / secs(t0));
    }
    fmt::print("\n");
    std::fflush(stdout);
  }
  fmt::print("\n{} threads; preset {}; decode after an 8-token prompt, {} greedy steps\n", ThreadPool::global().size(), preset, steps);
  return 0;
}
