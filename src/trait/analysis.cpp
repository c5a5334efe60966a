#include "trait/analysis.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>

#include "trait/experiment.hpp"
#include "util/error.hpp"
#include "util/thread_pool.hpp"

namespace kscope {
using json = nlohmann::json;
namespace fs = std::filesystem;

std::vector<ProjectionTarget> projection_targets(const VectorFile& vf, const std::string& path, const std::string& sites,
                                                 const std::vector<int64_t>& extra) {
  std::vector<std::string> names;
  const std::string trait = vf.meta.count("trait") && !vf.meta.at("trait").empty() ? vf.meta.at("trait") : fs::path(path).stem().string();
  if (sites == "all") {
    for (auto& [k, v] : vf.vectors) names.push_back(k);
  } else if (sites == "best" || sites.empty()) {
    auto it = vf.meta.find("best_site");
    if (it == vf.meta.end() || it->second.empty())
      fail(ErrorKind::input, path, "records no best site (not from kscope extract): give --sites");
    names.push_back(it->second);
  } else {
    std::stringstream ss(sites);
    std::string s;
    while (std::getline(ss, s, ','))
      if (!s.empty()) names.push_back(s);
  }
  std::vector<int64_t> ex = extra;
  if (auto it = vf.meta.find("excluded_dims"); it != vf.meta.end() && !it->second.empty()) {
    try {
      for (auto& d : json::parse(it->second)) ex.push_back(d.get<int64_t>());
    } catch (const std::exception& e) {
      fail(ErrorKind::format, path, "metadata 'excluded_dims' is not a JSON list of integers: {}", e.what());
    }
  }
  std::sort(ex.begin(), ex.end());
  ex.erase(std::unique(ex.begin(), ex.end()), ex.end());
  json mids = json::object();
  if (auto it = vf.meta.find("midpoints"); it != vf.meta.end()) {
    try {
      mids = json::parse(it->second);
    } catch (const std::exception& e) {
      fail(ErrorKind::format, path, "metadata 'midpoints' is not JSON: {}", e.what());
    }
  }
  std::vector<ProjectionTarget> out;
  for (auto& s : names) {
    ProjectionTarget t;
    t.site = s;
    t.name = trait + "@" + s;
    t.unit = vf.at(s, path);
    for (int64_t d : ex)
      if (d < static_cast<int64_t>(t.unit.size())) t.unit[d] = 0;
    double n = 0;
    for (float x : t.unit) n += static_cast<double>(x) * x;
    n = std::sqrt(n);
    if (!(n > 0)) fail(ErrorKind::input, path, "the vector at '{}' is zero", s);
    for (auto& x : t.unit) x = static_cast<float>(x / n);
    t.midpoint = mids.contains(s) ? mids[s].get<double>() : 0.0;
    t.mean_norm = vf.norms.count(s) ? vf.norms.at(s) : 0.0;
    t.exclude = ex;
    out.push_back(std::move(t));
  }
  return out;
}

Projection project_row(const ProjectionTarget& t, const float* h, int64_t w) {
  if (static_cast<int64_t>(t.unit.size()) != w)
    fail(ErrorKind::input, t.name, "vector width {} does not match the activations' {}", t.unit.size(), w);
  double raw = 0, hn = 0;
  for (int64_t i = 0; i < w; ++i) {
    raw += static_cast<double>(h[i]) * t.unit[i];
    hn += static_cast<double>(h[i]) * h[i];
  }
  for (int64_t d : t.exclude)
    if (d < w) hn -= static_cast<double>(h[d]) * h[d];  // the excluded dimensions are not part of h either
  hn = std::sqrt(std::max(0.0, hn));
  return {raw, raw - t.midpoint, t.mean_norm > 0 ? raw / t.mean_norm : NAN, hn > 0 ? raw / hn : 0.0};
}

std::vector<Rollout> load_rollouts(const std::string& path, const Tokenizer& tok, ChatFormat chat) {
  std::ifstream f(path);
  if (!f) fail(ErrorKind::io, path, "cannot open the rollouts file");
  std::vector<Rollout> out;
  std::string line;
  for (int64_t n = 1; std::getline(f, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", path, n);
    json j;
    try {
      j = json::parse(line);
    } catch (const std::exception& e) {
      fail(ErrorKind::format, where, "not JSON: {}", e.what());
    }
    Rollout r;
    r.id = j.contains("id") ? (j["id"].is_string() ? j["id"].get<std::string>() : j["id"].dump()) : std::to_string(out.size());
    if (j.contains("messages")) {
      std::vector<ChatMessage> m;
      try {
        m = parse_messages(j["messages"]);
      } catch (const Error& e) {
        fail(ErrorKind::format, where, "{}", e.what());
      }
      ChatOptions co;
      co.add_generation_prompt = false;
      if (j.contains("tools")) co.tools = j["tools"];
      auto rc = render_chat(tok, chat, m, co);
      r.ids = std::move(rc.ids);
      r.turns = std::move(rc.turns);
    } else if (j.contains("text") && j["text"].is_string()) {
      r.ids = tok.encode(j["text"].get<std::string>());
    } else {
      fail(ErrorKind::format, where, "a rollout needs 'messages' (OpenAI chat) or 'text'");
    }
    if (r.ids.empty()) fail(ErrorKind::format, where, "the rollout has no tokens");
    out.push_back(std::move(r));
  }
  if (out.empty()) fail(ErrorKind::input, path, "no rollouts");
  return out;
}

namespace {

// Projects every row it sees, per sequence and target; nothing is stored but the projections.
class ProjectHook : public Hook {
 public:
  ProjectHook(const std::vector<ProjectionTarget>& t, std::vector<int64_t> lens) : t_(t), out_(lens.size()) {
    for (size_t s = 0; s < lens.size(); ++s) out_[s].assign(t.size(), std::vector<Projection>(lens[s]));
  }
  bool wants(const Site& s) const override {
    for (auto& t : t_)
      if (t.site == s.str()) return true;
    return false;
  }
  bool writes(const Site&) const override { return false; }
  void on(const Site& s, int64_t seq, float* data, int64_t n, int64_t w, int64_t pos0) override {
    const std::string name = s.str();
    for (size_t k = 0; k < t_.size(); ++k)
      if (t_[k].site == name)
        for (int64_t r = 0; r < n; ++r) out_[seq][k][pos0 + r] = project_row(t_[k], data + r * w, w);
  }

 private:
  const std::vector<ProjectionTarget>& t_;

 public:
  std::vector<std::vector<std::vector<Projection>>> out_;  // [seq][target][pos]
};

std::string role_color(const std::string& role) {
  if (role == "system") return "#dddddd";
  if (role == "user") return "#cfe2f3";
  if (role == "assistant") return "#d9ead3";
  if (role == "tool") return "#fce5cd";
  return "#eeeeee";
}

// One rollout's trace JSON and plot.
json write_trace(const std::string& out, const std::string& id, const std::vector<int32_t>& ids, const std::vector<int64_t>& positions,
                 const std::vector<Turn>& turns, int64_t prompt_len, const Tokenizer* tok,
                 const std::vector<ProjectionTarget>& t, const std::vector<std::vector<Projection>>& p) {
  const int64_t n = positions.size();
  std::vector<std::string> roles(n, ""), tokens(n);
  std::vector<int> think(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = positions[i];
    tokens[i] = tok ? tok->token_display(ids[pos]) : std::to_string(ids[pos]);
    for (auto& tn : turns)
      if (pos >= tn.start && pos < tn.end) {
        roles[i] = tn.role;
        think[i] = tn.think_start >= 0 && pos >= tn.think_start && pos < tn.think_end;
      }
    if (turns.empty() && prompt_len >= 0) roles[i] = pos < prompt_len ? "prompt" : "response";
  }
  json series = json::object();
  for (size_t k = 0; k < t.size(); ++k) {
    json raw = json::array(), cen = json::array(), nor = json::array(), cos = json::array();
    for (int64_t i = 0; i < n; ++i) {
      const auto& x = p[k][i];
      raw.push_back(x.raw);
      cen.push_back(x.centred);
      nor.push_back(std::isfinite(x.normalized) ? json(x.normalized) : json(nullptr));
      cos.push_back(x.cosine);
    }
    series[t[k].name] = {{"raw", raw}, {"centred", cen}, {"normalized", nor}, {"cosine", cos}};
  }
  json tj = json::array(), means = json::array();
  for (size_t ti = 0; ti < turns.size(); ++ti) {
    const auto& tn = turns[ti];
    tj.push_back({{"role", tn.role}, {"start", tn.start}, {"end", tn.end}, {"think_start", tn.think_start}, {"think_end", tn.think_end}});
    json m = {{"turn", ti}, {"role", tn.role}, {"tokens", 0}, {"centred_mean", json::object()}, {"cosine_mean", json::object()}};
    for (size_t k = 0; k < t.size(); ++k) {
      double c = 0, co = 0;
      int64_t cnt = 0;
      for (int64_t i = 0; i < n; ++i)
        if (positions[i] >= tn.start && positions[i] < tn.end) c += p[k][i].centred, co += p[k][i].cosine, ++cnt;
      m["tokens"] = cnt;
      m["centred_mean"][t[k].name] = cnt ? json(c / cnt) : json(nullptr);
      m["cosine_mean"][t[k].name] = cnt ? json(co / cnt) : json(nullptr);
    }
    means.push_back(m);
  }
  const json trace = {{"id", id}, {"n_tokens", n}, {"positions", positions}, {"tokens", tokens}, {"roles", roles},
                      {"think", think}, {"turns", tj}, {"series", series}, {"turn_means", means}};
  std::string safe;
  for (char c : id) safe += std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ? c : '_';
  write_atomic(out + "/rollout-" + safe + ".json", trace.dump() + "\n");
  // plot: centred projection / mean norm per target against position, turns shaded
  Plot pl{fmt::format("rollout {}", id), "token position", "(h·v̂ − midpoint) / mean‖h‖"};
  pl.width = std::max<int>(640, std::min<int>(1600, static_cast<int>(n) * 3));
  pl.height = 320;
  for (auto& tn : turns) {
    pl.bands.push_back({static_cast<double>(tn.start), static_cast<double>(tn.end), tn.role, role_color(tn.role)});
    if (tn.think_start >= 0) pl.bands.push_back({static_cast<double>(tn.think_start), static_cast<double>(tn.think_end), "think", "#e6d7f0"});
  }
  if (turns.empty() && prompt_len >= 0 && positions.size() && positions.back() >= prompt_len)
    pl.bands.push_back({static_cast<double>(prompt_len), static_cast<double>(positions.back() + 1), "response", role_color("assistant")});
  for (size_t k = 0; k < t.size(); ++k) {
    PlotSeries s{t[k].name, {}, {}};
    s.points = false;
    for (int64_t i = 0; i < n; ++i) {
      s.x.push_back(positions[i]);
      s.y.push_back(t[k].mean_norm > 0 ? p[k][i].centred / t[k].mean_norm : p[k][i].centred);
    }
    pl.series.push_back(s);
  }
  pl.hlines.push_back(0);
  write_atomic(out + "/rollout-" + safe + ".svg", pl.svg());
  return {{"id", id}, {"n_tokens", n}, {"turn_means", means}};
}

}  // namespace

json project_rollouts(Model& model, const Tokenizer& tok, const std::vector<ProjectionTarget>& targets, const std::vector<Rollout>& rs,
                      const ProjectOptions& o, const PipelineIO& io) {
  for (auto& t : targets) parse_site(t.site, model.config().num_hidden_layers);  // named error for a bad site
  fs::create_directories(o.out);
  std::string summary;
  for (size_t b = 0; b < rs.size(); b += o.batch) {
    const size_t e = std::min(rs.size(), b + static_cast<size_t>(o.batch));
    std::vector<int64_t> lens;
    for (size_t i = b; i < e; ++i) {
      if (static_cast<int64_t>(rs[i].ids.size()) > model.config().max_position_embeddings)
        fail(ErrorKind::input, "rollout " + rs[i].id, "{} tokens exceed the model's {} positions", rs[i].ids.size(),
             model.config().max_position_embeddings);
      lens.push_back(rs[i].ids.size());
    }
    ProjectHook hook(targets, lens);
    std::vector<KvCache> caches;
    caches.reserve(e - b);
    std::vector<ForwardItem> items;
    for (size_t i = b; i < e; ++i) {
      caches.push_back(model.new_cache());
      items.push_back({&caches.back(), rs[i].ids.data(), static_cast<int64_t>(rs[i].ids.size()), false});
    }
    std::vector<std::vector<float>> logits;
    model.forward(items, logits, &hook);
    for (size_t i = b; i < e; ++i) {
      std::vector<int64_t> pos(rs[i].ids.size());
      for (size_t p = 0; p < pos.size(); ++p) pos[p] = p;
      summary += write_trace(o.out, rs[i].id, rs[i].ids, pos, rs[i].turns, rs[i].prompt_len, &tok, targets, hook.out_[i - b]).dump() + "\n";
    }
    io.step("projecting", e, rs.size());
  }
  write_atomic(o.out + "/summary.jsonl", summary);
  io.say(fmt::format("projected {} rollouts onto {} targets -> {}", rs.size(), targets.size(), o.out));
  return {{"rollouts", rs.size()}, {"targets", targets.size()}, {"out", o.out}};
}

json project_store(const ActivationStore& store, const Tokenizer* tok, const std::vector<ProjectionTarget>& targets,
                   const ProjectOptions& o, const PipelineIO& io) {
  const json& m = store.manifest();
  if (m["config"].value("reduction", "none") != "none")
    fail(ErrorKind::input, "--store", "the store holds {}-reduced rows; per-token projection needs a capture with --reduction none",
         m["config"].value("reduction", ""));
  fs::create_directories(o.out);
  std::string summary;
  const int64_t n = store.n_sequences();
  for (int64_t s = 0; s < n; ++s) {
    const json& sq = m["sequences"][s];
    const auto ids = sq["tokens"].get<std::vector<int32_t>>();
    const auto positions = sq["positions"].get<std::vector<int64_t>>();
    std::vector<std::vector<Projection>> p(targets.size());
    for (size_t k = 0; k < targets.size(); ++k) {
      int64_t w = 0;
      const auto rows = store.sequence_rows(targets[k].site, s, &w);
      for (size_t r = 0; r < positions.size(); ++r) p[k].push_back(project_row(targets[k], rows.data() + r * w, w));
    }
    summary += write_trace(o.out, std::to_string(s), ids, positions, {}, sq.value("prompt_len", int64_t{-1}), tok, targets, p).dump() + "\n";
    io.step("projecting", s + 1, n);
  }
  write_atomic(o.out + "/summary.jsonl", summary);
  io.say(fmt::format("projected {} stored sequences onto {} targets -> {}", n, targets.size(), o.out));
  return {{"rollouts", n}, {"targets", targets.size()}, {"out", o.out}};
}

namespace {

class MassiveHook : public Hook {
 public:
  MassiveHook(int64_t layers, int64_t d) : d_(d), maxabs_(layers, std::vector<float>(d, 0.f)), sumabs_(layers, std::vector<double>(d, 0.0)),
                                           argpos_(layers, std::vector<int64_t>(d, -1)), rows_(layers, 0) {}
  bool wants(const Site& s) const override { return s.kind == SiteKind::resid_post; }
  bool writes(const Site&) const override { return false; }
  void on(const Site& s, int64_t seq, float* data, int64_t n, int64_t w, int64_t pos0) override {
    auto& mx = maxabs_[s.layer];
    auto& sm = sumabs_[s.layer];
    auto& ap = argpos_[s.layer];
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < w; ++i) {
        const float a = std::abs(data[r * w + i]);
        sm[i] += a;
        if (a > mx[i]) mx[i] = a, ap[i] = pos0 + r;
      }
    rows_[s.layer] += n;
  }
  int64_t d_;
  std::vector<std::vector<float>> maxabs_;
  std::vector<std::vector<double>> sumabs_;
  std::vector<std::vector<int64_t>> argpos_;
  std::vector<int64_t> rows_;
};

}  // namespace

json massive_activations(Model& model, const std::vector<std::vector<int32_t>>& prompts, const MassiveOptions& o, const std::string& out,
                         const PipelineIO& io) {
  const auto& cfg = model.config();
  const int64_t L = cfg.num_hidden_layers, d = cfg.hidden_size;
  if (prompts.empty()) fail(ErrorKind::input, "massive", "no prompts");
  MassiveHook hook(L, d);
  int64_t tokens = 0;
  for (size_t b = 0; b < prompts.size(); b += o.batch) {
    const size_t e = std::min(prompts.size(), b + static_cast<size_t>(o.batch));
    std::vector<KvCache> caches;
    caches.reserve(e - b);
    std::vector<ForwardItem> items;
    for (size_t i = b; i < e; ++i) {
      caches.push_back(model.new_cache());
      items.push_back({&caches.back(), prompts[i].data(), static_cast<int64_t>(prompts[i].size()), false});
      tokens += prompts[i].size();
    }
    std::vector<std::vector<float>> logits;
    model.forward(items, logits, &hook);
    io.step("calibrating", e, prompts.size());
  }
  json layers = json::array();
  std::map<int64_t, int64_t> count;  // dim -> layers where it is massive
  std::map<int64_t, double> peak;    // dim -> largest ratio
  std::vector<double> typical(L);
  for (int64_t l = 0; l < L; ++l) {
    std::vector<double> mean(d);
    for (int64_t i = 0; i < d; ++i) mean[i] = hook.sumabs_[l][i] / std::max<int64_t>(1, hook.rows_[l]);
    std::vector<double> sorted = mean;
    std::nth_element(sorted.begin(), sorted.begin() + d / 2, sorted.end());
    typical[l] = sorted[d / 2];
    std::vector<int64_t> order(d);
    for (int64_t i = 0; i < d; ++i) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + std::min<int64_t>(o.top, d), order.end(),
                      [&](int64_t a, int64_t b) { return hook.maxabs_[l][a] > hook.maxabs_[l][b]; });
    json top = json::array(), massive = json::array();
    for (int64_t i = 0; i < d; ++i) {
      const double ratio = typical[l] > 0 ? hook.maxabs_[l][i] / typical[l] : 0.0;
      if (ratio >= o.ratio) {
        massive.push_back(i);
        ++count[i];
      }
      peak[i] = std::max(peak[i], ratio);
    }
    for (int64_t k = 0; k < std::min<int64_t>(o.top, d); ++k) {
      const int64_t i = order[k];
      top.push_back({{"dim", i}, {"max_abs", hook.maxabs_[l][i]}, {"ratio", typical[l] > 0 ? hook.maxabs_[l][i] / typical[l] : 0.0},
                     {"mean_abs", mean[i]}, {"position", hook.argpos_[l][i]}});
    }
    layers.push_back({{"layer", l}, {"site", std::to_string(l) + ".resid_post"}, {"typical_abs", typical[l]}, {"massive", massive}, {"top", top}});
  }
  json rec = json::array();
  std::vector<int64_t> recommended;
  for (auto& [dim, c] : count)
    if (c >= o.persistent * L) {
      recommended.push_back(dim);
      rec.push_back({{"dim", dim}, {"layers", c}, {"peak_ratio", peak[dim]}});
    }
  const json report = {{"model_identity", cfg.identity_hash()}, {"prompts", prompts.size()}, {"tokens", tokens},
                       {"ratio_threshold", o.ratio}, {"persistent_fraction", o.persistent}, {"recommended_exclude", recommended},
                       {"recommended", rec}, {"layers", layers},
                       {"definition", "ratio = max over tokens of |h_d| / median over dimensions of mean |h|, per layer (resid_post)"}};
  if (!out.empty()) {
    fs::create_directories(out);
    write_atomic(out + "/massive.json", report.dump(2) + "\n");
    // plot: ratio per layer of the dims that peak highest (log scale)
    std::vector<std::pair<double, int64_t>> best;
    for (auto& [dim, r] : peak) best.push_back({r, dim});
    std::sort(best.rbegin(), best.rend());
    Plot pl{"massive activations: max |h_d| / typical |h| per layer", "layer", "ratio (log scale)"};
    pl.log_y = true;
    pl.width = 720;
    pl.height = 340;
    for (size_t k = 0; k < std::min<size_t>(6, best.size()); ++k) {
      const int64_t dim = best[k].second;
      PlotSeries s{fmt::format("dim {}", dim), {}, {}};
      for (int64_t l = 0; l < L; ++l) {
        s.x.push_back(l);
        s.y.push_back(typical[l] > 0 ? hook.maxabs_[l][dim] / typical[l] : NAN);
      }
      pl.series.push_back(s);
    }
    pl.hlines.push_back(o.ratio);
    write_atomic(out + "/massive.svg", pl.svg());
  }
  io.say(fmt::format("massive: {} tokens, {} dimensions recommended for exclusion", tokens, recommended.size()));
  return report;
}

json vector_lens(const Model& model, const Tokenizer* tok, const std::vector<float>& v, int64_t k) {
  const auto& cfg = model.config();
  const auto& W = model.weights().lm_head;
  if (static_cast<int64_t>(v.size()) != W.in) fail(ErrorKind::input, "lens", "vector width {} is not the model's {}", v.size(), W.in);
  std::vector<float> x(v.size());
  for (size_t i = 0; i < v.size(); ++i) x[i] = v[i] * model.weights().final_norm[i];
  const int64_t V = std::min<int64_t>(W.out, cfg.vocab_size);
  std::vector<double> logit(V);
  ThreadPool::global().parallel_for(V, 256, [&](int64_t a, int64_t b) {
    std::vector<float> row(W.in);
    for (int64_t j = a; j < b; ++j) {
      W.dequant_row(j, row.data());
      double s = 0;
      for (int64_t i = 0; i < W.in; ++i) s += static_cast<double>(row[i]) * x[i];
      logit[j] = s;
    }
  });
  std::vector<int64_t> order(V);
  for (int64_t j = 0; j < V; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return logit[a] > logit[b] || (logit[a] == logit[b] && a < b); });
  auto entry = [&](int64_t j) { return json({{"id", j}, {"token", tok ? tok->token_display(static_cast<int32_t>(j)) : ""}, {"logit", logit[j]}}); };
  json top = json::array(), bottom = json::array();
  for (int64_t i = 0; i < std::min(k, V); ++i) {
    top.push_back(entry(order[i]));
    bottom.push_back(entry(order[V - 1 - i]));
  }
  return {{"top", top}, {"bottom", bottom}};
}

}  // namespace kscope
