#include "interp/capture.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "util/error.hpp"

namespace kscope {

Reduction parse_reduction(const std::string& s) {
  if (s == "none") return Reduction::none;
  if (s == "mean") return Reduction::mean;
  fail(ErrorKind::input, "reduction", "'{}' is not a reduction (expected none or mean)", s);
}

CaptureHook::CaptureHook(CaptureSpec spec, int64_t n_seqs) : spec_(std::move(spec)), seqs_(n_seqs) {}

CaptureHook::~CaptureHook() {
  try {
    wait_reads();  // rows still being filed write into this hook
  } catch (...) {
  }
}

bool CaptureHook::wants(const Site& s) const {
  return std::find(spec_.sites.begin(), spec_.sites.end(), s) != spec_.sites.end();
}

void CaptureHook::on(const Site& s, int64_t seq, float* data, int64_t n, int64_t w, int64_t pos0) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string name = s.str();
  Rows* rp;
  {
    std::lock_guard<std::mutex> lk(mu_);
    rp = &seqs_[seq][name];  // map nodes stay put: the copy below runs outside the hook-wide lock
  }
  Rows& r = *rp;
  std::unique_lock<std::mutex> rl(r.mu);
  if (r.block_rows == 0) {
    r.width = w;
    r.block_rows = std::max<int64_t>(1, (int64_t{1} << 14) / w);
  }
  KSCOPE_CHECK(r.width == w, internal, "capture", "site {} changed width", s.str());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = static_cast<int64_t>(r.pos.size());
    if (at % r.block_rows == 0) r.blocks.emplace_back(new float[r.block_rows * w]);
    std::memcpy(r.blocks.back().get() + (at % r.block_rows) * w, data + i * w, w * sizeof(float));
    r.pos.push_back(pos0 + i);
  }
  rl.unlock();
  std::lock_guard<std::mutex> lk(mu_);
  filing_.bytes += static_cast<double>(n) * w * sizeof(float);
  filing_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

CaptureHook::FilingStats CaptureHook::filing() const {
  std::lock_guard<std::mutex> lk(mu_);
  return filing_;
}

void CaptureHook::on_router(int64_t layer, int64_t seq, const float*, int32_t* idx, float* weight, int64_t n,
                            int64_t, int64_t k, int64_t pos0) {
  const std::string name = Site{SiteKind::router, layer}.str();
  std::lock_guard<std::mutex> lk(mu_);
  Rows& r = seqs_[seq][name];
  r.width = r.k = k;
  for (int64_t i = 0; i < n; ++i) {
    r.pos.push_back(pos0 + i);
    // experts in ascending id, so a row's content does not depend on the router's internal order
    std::vector<std::pair<int32_t, float>> e(k);
    for (int64_t j = 0; j < k; ++j) e[j] = {idx[i * k + j], weight[i * k + j]};
    std::sort(e.begin(), e.end());
    for (auto& [id, w] : e) {
      r.ids.push_back(id);
      r.data.push_back(w);
    }
  }
}

CapturedSeq CaptureHook::finish(int64_t seq, const SeqLayout& layout) const {
  wait_reads();
  std::lock_guard<std::mutex> lk(mu_);
  CapturedSeq out;
  out.positions = spec_.positions.resolve(layout);
  out.prompt_len = layout.prompt_len;
  for (const Site& site : spec_.sites) {
    const std::string name = site.str();
    auto it = seqs_[seq].find(name);
    if (it == seqs_[seq].end()) continue;
    const Rows& r = it->second;
    std::vector<int64_t> where(out.positions.size(), -1);  // row index of each selected position
    for (size_t i = 0; i < r.pos.size(); ++i) {
      auto p = std::lower_bound(out.positions.begin(), out.positions.end(), r.pos[i]);
      if (p != out.positions.end() && *p == r.pos[i]) where[p - out.positions.begin()] = static_cast<int64_t>(i);
    }
    for (size_t j = 0; j < where.size(); ++j)
      if (where[j] < 0)
        fail(ErrorKind::internal, "capture", "position {} of sequence {} has no {} state", out.positions[j], seq, name);
    const int64_t w = r.width;
    if (site.kind == SiteKind::router) {
      auto& ids = out.router_ids[name];
      auto& wts = out.router_weights[name];
      for (int64_t i : where) {
        ids.insert(ids.end(), r.ids.begin() + i * w, r.ids.begin() + (i + 1) * w);
        wts.insert(wts.end(), r.data.begin() + i * w, r.data.begin() + (i + 1) * w);
      }
      out.width[name] = w;
      continue;
    }
    auto& rows = out.rows[name];
    out.width[name] = w;
    if (spec_.reduction == Reduction::none) {
      rows.reserve(where.size() * w);
      for (int64_t i : where) rows.insert(rows.end(), r.row(i), r.row(i) + w);
    } else {
      std::vector<double> acc(w, 0.0);
      for (int64_t i : where) {
        const float* x = r.row(i);
        for (int64_t d = 0; d < w; ++d) acc[d] += x[d];
      }
      rows.resize(w);
      for (int64_t d = 0; d < w; ++d) rows[d] = where.empty() ? 0.0f : static_cast<float>(acc[d] / where.size());
    }
  }
  return out;
}

std::vector<CapturedSeq> run_capture(Model& model, const std::vector<CaptureRequest>& reqs, const CaptureSpec& spec) {
  const int64_t n = static_cast<int64_t>(reqs.size());
  for (const Site& s : spec.sites)
    if (s.kind == SiteKind::router && !model.config().is_moe_layer(s.layer))
      fail(ErrorKind::input, "site '" + s.str() + "'", "layer {} is dense: it has no router", s.layer);
  CaptureHook cap(spec, n);
  std::vector<SeqLayout> layouts(n);
  std::vector<std::vector<Intervention>> ivs(n);
  for (int64_t i = 0; i < n; ++i) {
    layouts[i].prompt_len = static_cast<int64_t>(reqs[i].prompt.size());
    layouts[i].turns = reqs[i].turns;
    if (!reqs[i].generate) layouts[i].total_len = layouts[i].prompt_len + static_cast<int64_t>(reqs[i].response.size());
    ivs[i] = reqs[i].interventions;
  }
  SteeringHook steer(ivs, layouts);
  steer.validate(model.config());
  HookList hooks;
  hooks.hooks = {&steer, &cap};
  std::vector<CapturedSeq> out(n);
  // replayed sequences: one forward over prompt + response
  std::vector<int64_t> replay, gen;
  for (int64_t i = 0; i < n; ++i) (reqs[i].generate ? gen : replay).push_back(i);
  std::vector<std::vector<int32_t>> full(n);
  if (!replay.empty()) {
    std::vector<KvCache> caches;
    caches.reserve(replay.size());
    std::vector<ForwardItem> items;
    for (int64_t i : replay) {
      full[i] = reqs[i].prompt;
      full[i].insert(full[i].end(), reqs[i].response.begin(), reqs[i].response.end());
      KSCOPE_CHECK(!full[i].empty(), input, "sequence " + std::to_string(i), "empty");
      for (int32_t t : full[i])
        KSCOPE_CHECK(t >= 0 && t < model.config().vocab_size, input, "sequence " + std::to_string(i),
                     "token {} is outside the vocabulary [0, {})", t, model.config().vocab_size);
      caches.push_back(model.new_cache());
    }
    for (size_t j = 0; j < replay.size(); ++j)
      items.push_back({&caches[j], full[replay[j]].data(), static_cast<int64_t>(full[replay[j]].size()), false});
    RemapHook remap(&hooks, &replay);  // batch item j -> request replay[j]
    std::vector<std::vector<float>> logits;
    model.forward(items, logits, &remap);
  }
  if (!gen.empty()) {
    std::vector<GenerateRequest> greqs;
    for (int64_t i : gen) {
      GenerateRequest g = reqs[i].gen;
      g.prompt = reqs[i].prompt;
      greqs.push_back(g);
    }
    RemapHook remap(&hooks, &gen);  // generation indexes hooks by its own request order
    GenerateOptions opts;
    opts.observer = &remap;
    opts.feed_last = true;
    const auto res = generate(model, greqs, opts);
    for (size_t j = 0; j < gen.size(); ++j) {
      const int64_t i = gen[j];
      full[i] = reqs[i].prompt;
      full[i].insert(full[i].end(), res[j].tokens.begin(), res[j].tokens.end());
      layouts[i].total_len = res[j].states;
      out[i].finish = res[j].finish;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const FinishReason f = out[i].finish;
    out[i] = cap.finish(i, layouts[i]);
    out[i].finish = f;
    out[i].tokens = full[i];
  }
  return out;
}

}  // namespace kscope
