#include "interp/sweep.hpp"

#include <algorithm>
#include <cmath>

#include "interp/extract.hpp"
#include "runtime/generate.hpp"
#include "runtime/sampler.hpp"
#include "util/error.hpp"

namespace kscope {
using json = nlohmann::json;

Scorer make_scorer(const std::string& name) {
  if (name == "french") return [](const std::string& t) { return 100.0 * french_fraction(t); };
  fail(ErrorKind::input, "--scorer", "unknown scorer '{}' (expected french)", name);
}

SweepResult run_sweep(Model& model, const Tokenizer& tok, const SweepSpec& spec, const Scorer& scorer,
                      const std::function<void(const std::string&)>& log) {
  if (spec.prompts.empty()) fail(ErrorKind::input, "sweep", "no prompts");
  struct Cand {
    std::string site;
    double coef;
  };
  std::vector<Cand> cands{{"", 0.0}};
  for (const Site& s : spec.sites)
    for (double c : spec.coefs) cands.push_back({s.str(), c});
  // one row per (candidate, prompt), all in one batch
  std::vector<GenerateRequest> reqs;
  std::vector<std::vector<Intervention>> ivs;
  std::vector<SeqLayout> layouts;
  std::vector<SweepRow> rows;
  for (const Cand& c : cands)
    for (size_t p = 0; p < spec.prompts.size(); ++p) {
      GenerateRequest r;
      r.prompt = spec.prompts[p];
      r.max_new_tokens = spec.max_new_tokens;
      r.ignore_eos = true;
      reqs.push_back(r);
      std::vector<Intervention> l;
      if (!c.site.empty()) {
        Intervention iv;
        iv.site = parse_site(c.site, model.config().num_hidden_layers);
        iv.vector = spec.vectors.at(c.site);
        iv.coef = c.coef;
        iv.relative = spec.relative;
        iv.mean_norm = spec.relative ? spec.mean_norms.at(c.site) : 0.0;
        iv.positions = PositionSpec::parse(spec.positions);
        iv.label = fmt::format("{}*{}", c.site, c.coef);
        l.push_back(iv);
      }
      ivs.push_back(l);
      layouts.push_back({static_cast<int64_t>(r.prompt.size())});
      rows.push_back({c.site, c.coef, static_cast<int64_t>(p), "", 0, 0});
    }
  if (log) log(fmt::format("{} candidates x {} prompts = {} rows in one batch", cands.size(), spec.prompts.size(), reqs.size()));
  SteeringHook steer(ivs, layouts);
  steer.validate(model.config());
  GenerateOptions o;
  o.observer = &steer;
  const auto res = generate(model, reqs, o);
  // coherence: the unsteered model's log-likelihood of what each row generated (one replay batch)
  std::vector<KvCache> caches;
  caches.reserve(res.size());
  std::vector<std::vector<int32_t>> full(res.size());
  std::vector<ForwardItem> items;
  for (size_t i = 0; i < res.size(); ++i) {
    full[i] = reqs[i].prompt;
    full[i].insert(full[i].end(), res[i].tokens.begin(), res[i].tokens.end());
    caches.push_back(model.new_cache());
  }
  for (size_t i = 0; i < res.size(); ++i) items.push_back({&caches[i], full[i].data(), static_cast<int64_t>(full[i].size()), true});
  std::vector<std::vector<float>> logits;
  model.forward(items, logits);
  const int64_t V = model.config().vocab_size;
  for (size_t i = 0; i < res.size(); ++i) {
    const int64_t T = reqs[i].prompt.size();
    double ll = 0;
    for (size_t j = 0; j < res[i].tokens.size(); ++j) ll += log_softmax_at(logits[i].data() + (T - 1 + j) * V, V, res[i].tokens[j]);
    rows[i].loglik = res[i].tokens.empty() ? 0.0 : ll / res[i].tokens.size();
    rows[i].text = tok.decode(res[i].tokens);
    rows[i].score = scorer(rows[i].text);
  }
  SweepResult out;
  out.rows = rows;
  const size_t np = spec.prompts.size();
  for (size_t c = 0; c < cands.size(); ++c) {
    SweepCandidate k{cands[c].site, cands[c].coef, 0, 0, true};
    for (size_t p = 0; p < np; ++p) {
      k.score += rows[c * np + p].score / np;
      k.loglik += rows[c * np + p].loglik / np;
    }
    out.candidates.push_back(k);
  }
  const double base_ll = out.candidates[0].loglik;
  out.best = out.candidates[0];
  for (auto& k : out.candidates) {
    if (k.site.empty()) continue;
    k.coherent = k.loglik >= base_ll - spec.coherence_drop;
    if (k.coherent && (k.score > out.best.score || (k.score == out.best.score && k.coef < out.best.coef))) out.best = k;
  }
  return out;
}

json SweepResult::summary() const {
  const auto& b = candidates[0];
  return {{"baseline", b.score}, {"baseline_coherence", b.loglik}, {"best_site", best.site}, {"best_coef", best.coef},
          {"delta", best.score - b.score}, {"coherence", best.loglik}};
}

std::string SweepResult::table() const {
  std::string t = "| site | coefficient | score | coherence (log-lik/token) | counted |\n|---|---|---|---|---|\n";
  for (const auto& k : candidates)
    t += fmt::format("| {} | {} | {:.1f} | {:.2f} | {} |\n", k.site.empty() ? "baseline" : k.site, k.coef, k.score, k.loglik,
                     k.site.empty() ? "" : (k.coherent ? "yes" : "no (incoherent)"));
  const auto& b = candidates[0];
  t += fmt::format("\n| Baseline | Best site | Delta | Coherence | Coef |\n|---|---|---|---|---|\n| {:.1f} | {} | {:+.1f} | {:.2f} | {} |\n",
                   b.score, best.site.empty() ? "(none)" : best.site, best.score - b.score, best.loglik, best.coef);
  return t;
}

std::string SweepResult::svg(const std::string& title) const {
  // two panels (score, coherence) against coefficient, one polyline per site, baseline dashed
  std::vector<std::string> sites;
  double cmax = 0, llmin = 0, llmax = -1e30;
  for (const auto& k : candidates) {
    if (!k.site.empty() && std::find(sites.begin(), sites.end(), k.site) == sites.end()) sites.push_back(k.site);
    cmax = std::max(cmax, k.coef);
    llmin = std::min(llmin, k.loglik);
    llmax = std::max(llmax, k.loglik);
  }
  llmax = std::min(0.0, llmax + 0.5);
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};
  const int W = 380, Hh = 260, L = 55, T = 40, PW = 290, PH = 180;
  std::string s = fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='11'>\n", 2 * W, Hh + 30);
  s += fmt::format("<text x='{}' y='16' text-anchor='middle' font-size='13'>{}</text>\n", W, title);
  for (int panel = 0; panel < 2; ++panel) {
    const int x0 = panel * W + L, y0 = T;
    const double lo = panel == 0 ? 0.0 : llmin, hi = panel == 0 ? 100.0 : llmax;
    auto X = [&](double c) { return x0 + (cmax > 0 ? c / cmax : 0) * PW; };
    auto Y = [&](double v) { return y0 + PH - (v - lo) / (hi - lo) * PH; };
    s += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#999'/>\n", x0, y0, PW, PH);
    for (int i = 0; i <= 4; ++i) {
      const double v = lo + (hi - lo) * i / 4, c = cmax * i / 4;
      s += fmt::format("<text x='{}' y='{:.1f}' text-anchor='end'>{:.1f}</text>\n", x0 - 4, Y(v) + 4, v);
      s += fmt::format("<text x='{:.1f}' y='{}' text-anchor='middle'>{:.2g}</text>\n", X(c), y0 + PH + 14, c);
    }
    s += fmt::format("<text x='{}' y='{}' text-anchor='middle'>{}</text>\n", x0 + PW / 2, y0 - 8,
                     panel == 0 ? "score (0-100)" : "coherence (log-likelihood per token)");
    s += fmt::format("<text x='{}' y='{}' text-anchor='middle'>coefficient (x site mean norm)</text>\n", x0 + PW / 2, y0 + PH + 30);
    const double base = panel == 0 ? candidates[0].score : candidates[0].loglik;
    s += fmt::format("<line x1='{}' x2='{}' y1='{:.1f}' y2='{:.1f}' stroke='#555' stroke-dasharray='4,3'/>\n", x0, x0 + PW, Y(base), Y(base));
    for (size_t si = 0; si < sites.size(); ++si) {
      std::string pts = fmt::format("{:.1f},{:.1f}", X(0), Y(base));
      for (const auto& k : candidates)
        if (k.site == sites[si]) pts += fmt::format(" {:.1f},{:.1f}", X(k.coef), Y(panel == 0 ? k.score : k.loglik));
      s += fmt::format("<polyline points='{}' fill='none' stroke='{}' stroke-width='2'/>\n", pts, colors[si % 8]);
      if (panel == 1)
        s += fmt::format("<text x='{}' y='{}' fill='{}'>{}</text>\n", x0 + 8, y0 + PH - 8 - 13 * static_cast<int>(sites.size() - 1 - si),
                         colors[si % 8], sites[si]);
    }
  }
  return s + "</svg>\n";
}

}  // namespace kscope
