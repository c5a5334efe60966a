#include "runtime/generate.hpp"

#include <algorithm>

#include "util/error.hpp"

namespace kscope {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::context: return "context";
  }
  return "?";
}

std::vector<GenerateResult> generate(Model& model, const std::vector<GenerateRequest>& reqs, const GenerateOptions& opts) {
  const auto& cfg = model.config();
  const int64_t V = cfg.vocab_size;
  const int64_t n = static_cast<int64_t>(reqs.size());
  for (int64_t i = 0; i < n; ++i) {
    const auto& r = reqs[i];
    const std::string where = "request " + std::to_string(i);
    KSCOPE_CHECK(!r.prompt.empty(), input, where, "prompt is empty");
    KSCOPE_CHECK(r.max_new_tokens >= 0, input, where, "max_new_tokens must be >= 0");
    KSCOPE_CHECK(r.sampling.temperature >= 0, input, where, "temperature must be >= 0");
    KSCOPE_CHECK(r.sampling.top_p > 0 && r.sampling.top_p <= 1, input, where, "top_p must be in (0, 1]");
    KSCOPE_CHECK(r.sampling.top_k >= 0, input, where, "top_k must be >= 0");
    for (auto t : r.prompt) KSCOPE_CHECK(t >= 0 && t < V, input, where, "prompt token {} is outside the vocabulary [0, {})", t, V);
    for (auto t : r.stop_tokens) KSCOPE_CHECK(t >= 0 && t < V, input, where, "stop token {} is outside the vocabulary [0, {})", t, V);
    KSCOPE_CHECK(static_cast<int64_t>(r.prompt.size()) <= cfg.max_position_embeddings, input, where,
                 "prompt of {} tokens exceeds max_position_embeddings {}", r.prompt.size(), cfg.max_position_embeddings);
  }
  std::vector<GenerateResult> res(n);
  std::vector<KvCache> caches;
  std::vector<Sampler> samplers;
  caches.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    caches.push_back(model.new_cache());
    samplers.emplace_back(reqs[i].sampling);
  }
  std::vector<int64_t> active;  // sequences still generating
  for (int64_t i = 0; i < n; ++i)
    if (reqs[i].max_new_tokens > 0) active.push_back(i);
  std::vector<int32_t> next(n);
  bool prefill = true;
  int64_t step = 0;
  while (!active.empty()) {
    std::vector<ForwardItem> items;
    for (auto i : active) {
      ForwardItem it;
      it.cache = &caches[i];
      if (prefill) {
        it.tokens = reqs[i].prompt.data();
        it.n = static_cast<int64_t>(reqs[i].prompt.size());
      } else {
        it.tokens = &next[i];
        it.n = 1;
      }
      items.push_back(it);
    }
    RemapHook remap(opts.observer, &active);  // batch items -> request indices
    // the logits come back reduced (top-M and the normalizer), and drawn from where they are
    int64_t top = 1;
    for (auto i : active)
      if (reqs[i].sampling.top_k > 0 && reqs[i].sampling.top_k <= kSummaryTop) top = std::max(top, reqs[i].sampling.top_k);
    std::vector<RowDraw> draws;  // sampling over the whole vocabulary happens where the logits are
    for (auto i : active) draws.push_back(samplers[i].needs_full_row(top) ? samplers[i].draw_for_row() : RowDraw{});
    std::vector<LogitSummary> logits;
    model.forward(items, draws, top, logits, opts.observer ? &remap : nullptr);
    prefill = false;
    std::vector<int64_t> still;
    for (size_t a = 0; a < active.size(); ++a) {
      const int64_t i = active[a];
      const auto& r = reqs[i];
      float lp = 0;
      const int32_t tok = samplers[i].sample(logits[a], V, &lp);
      auto& out = res[i];
      out.logprobs.push_back(lp);
      const bool is_eos = !r.ignore_eos && std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok) != cfg.eos_token_ids.end();
      const bool is_stop = is_eos || std::find(r.stop_tokens.begin(), r.stop_tokens.end(), tok) != r.stop_tokens.end();
      if (is_stop) {
        out.finish = FinishReason::stop;
        out.stop_token = tok;
        continue;
      }
      out.tokens.push_back(tok);
      if (opts.on_token) opts.on_token(i, tok);
      if (static_cast<int64_t>(out.tokens.size()) >= r.max_new_tokens) {
        out.finish = FinishReason::length;
        continue;
      }
      if (caches[i].length + 1 > cfg.max_position_embeddings) {
        out.finish = FinishReason::context;
        continue;
      }
      next[i] = tok;
      still.push_back(i);
    }
    active.swap(still);
    if (opts.on_step) opts.on_step(step, static_cast<int64_t>(active.size()));
    ++step;
  }
  if (opts.feed_last) {
    // sequences that stopped on length still hold an unfed last token (a stop token's predecessor was fed)
    std::vector<ForwardItem> items;
    std::vector<int64_t> which;
    for (int64_t i = 0; i < n; ++i) {
      const auto& t = res[i].tokens;
      if (t.empty() || res[i].finish == FinishReason::stop) continue;
      if (caches[i].length + 1 > cfg.max_position_embeddings) continue;
      ForwardItem it;
      it.cache = &caches[i];
      it.tokens = &t.back();
      it.n = 1;
      items.push_back(it);
      which.push_back(i);
    }
    if (!items.empty()) {
      RemapHook remap(opts.observer, &which);
      std::vector<std::vector<float>> logits;
      model.forward(items, logits, opts.observer ? &remap : nullptr);
    }
  }
  for (int64_t i = 0; i < n; ++i) res[i].states = caches[i].length;
  model.drain();  // every capture of the generation is filed when it returns
  return res;
}

}  // namespace kscope
