#include "trait/pipeline.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include "interp/capture.hpp"
#include "interp/intervention.hpp"
#include "interp/sweep.hpp"
#include "interp/vectors.hpp"
#include "runtime/generate.hpp"
#include "store/activation_store.hpp"
#include "trait/experiment.hpp"
#include "trait/stats.hpp"
#include "util/error.hpp"
#include "util/thread_pool.hpp"

namespace kscope {
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

json opt(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

Judge& need_judge(TraitContext& ctx, const std::string& what) {
  if (!ctx.judge) fail(ErrorKind::input, "--judge", "{} needs a judge: --judge self (the loaded model) or --judge-url URL", what);
  return *ctx.judge;
}

// Trait scores of (question, answer) rows: the dataset's programmatic scorer, else the judge.
// (A programmatic score has mass 1.)
std::vector<Judgment> trait_scores(TraitContext& ctx, const TraitDataset& ds, const std::vector<std::string>& qs,
                                   const std::vector<std::string>& as, const std::string& label) {
  if (!ds.scorer.empty()) {
    std::vector<Judgment> out(as.size());
    const Scorer s = make_scorer(ds.scorer);
    for (size_t i = 0; i < as.size(); ++i) out[i] = {s(as[i]), 1.0};
    return out;
  }
  std::vector<std::string> prompts;
  for (size_t i = 0; i < as.size(); ++i) prompts.push_back(ds.rubric.trait(ds.name, ds.definition, qs[i], as[i]));
  return need_judge(ctx, "trait scoring").score(prompts, [&](int64_t d, int64_t t) { ctx.io.step(label, d, t); });
}

std::vector<Judgment> judge_scores(TraitContext& ctx, const std::vector<std::string>& prompts, const std::string& label) {
  return need_judge(ctx, label).score(prompts, [&](int64_t d, int64_t t) { ctx.io.step(label, d, t); });
}

json opt(const Judgment& j) { return opt(j.score); }

std::vector<Judgment> coherence_judgments(TraitContext& ctx, const TraitDataset& ds, const std::vector<std::string>& qs,
                                          const std::vector<std::string>& as, const std::string& label) {
  std::vector<std::string> p;
  for (size_t k = 0; k < as.size(); ++k) p.push_back(ds.rubric.coherence(qs[k], as[k]));
  return judge_scores(ctx, p, label);
}

std::vector<Judgment> on_topic_judgments(TraitContext& ctx, const TraitDataset& ds, const std::vector<std::string>& qs,
                                         const std::vector<std::string>& as, const std::string& label) {
  std::vector<std::string> p;
  for (size_t k = 0; k < as.size(); ++k) p.push_back(ds.rubric.on_topic(qs[k], as[k]));
  return judge_scores(ctx, p, label);
}

std::vector<int32_t> ids_of(const json& j) { return j.get<std::vector<int32_t>>(); }

// The prompt of one side of a pair.
std::vector<int32_t> pair_prompt(TraitContext& ctx, const TraitDataset& ds, const TraitPair& p, bool pos) {
  if (ds.style == "document") return render_prompt(ctx.tok, ctx.chat, ds.style, "", pos ? p.pos : p.neg);
  return render_prompt(ctx.tok, ctx.chat, ds.style, pos ? p.pos : p.neg, p.question);
}

std::string pair_question(const TraitDataset& ds, const TraitPair& p, bool pos) {
  return ds.style == "document" ? (pos ? p.pos : p.neg) : p.question;
}

bool forced(const ExtractOptions& o, const std::string& stage) { return o.force.count("all") || o.force.count(stage); }

// Stage 1: responses.
json stage_responses(TraitContext& ctx, const TraitDataset& ds, const ExtractOptions& o, const std::string& dir, StageLog& st,
                     int64_t n_pairs, std::string& hash) {
  const json settings = {{"dataset", ds.hash}, {"model", ctx.model.config().identity_hash()}, {"chat", chat_format_name(ctx.chat)},
                         {"max_new_tokens", o.max_new_tokens}, {"temperature", o.temperature}, {"seed", o.seed}, {"pairs", n_pairs}};
  hash = hash_json(settings);
  JsonlLog log(dir + "/responses.jsonl");
  if (st.up_to_date("responses", hash) && !forced(o, "responses") && static_cast<int64_t>(log.lines().size()) == 2 * n_pairs) {
    ctx.io.say(fmt::format("responses: up to date ({} rows)", log.lines().size()));
    return st.summary("responses");
  }
  if (st.started("responses") != hash || forced(o, "responses")) {
    if (!log.lines().empty()) ctx.io.say("responses: settings changed or forced, starting over");
    log.clear();
    st.start("responses", hash);
  } else if (!log.lines().empty()) {
    ctx.io.say(fmt::format("responses: resuming, {} of {} rows on disk", log.lines().size(), 2 * n_pairs));
  }
  std::set<std::pair<int64_t, int>> have;
  for (auto& l : log.lines()) have.insert({l.at("pair").get<int64_t>(), l.at("side") == "pos" ? 1 : 0});
  struct Todo {
    int64_t pair;
    int side;
  };
  std::vector<Todo> todo;
  for (int64_t i = 0; i < n_pairs; ++i)
    for (int side = 1; side >= 0; --side)
      if (!have.count({i, side})) todo.push_back({i, side});
  const int64_t total = 2 * n_pairs;
  int64_t appended = 0;
  for (size_t b = 0; b < todo.size(); b += o.batch) {
    const size_t e = std::min(todo.size(), b + static_cast<size_t>(o.batch));
    std::vector<GenerateRequest> reqs;
    for (size_t k = b; k < e; ++k) {
      GenerateRequest r;
      r.prompt = pair_prompt(ctx, ds, ds.pairs[todo[k].pair], todo[k].side == 1);
      r.max_new_tokens = o.max_new_tokens;
      r.sampling.temperature = o.temperature;
      r.sampling.seed = o.seed + 2 * todo[k].pair + todo[k].side;
      reqs.push_back(std::move(r));
    }
    const int64_t done0 = static_cast<int64_t>(log.lines().size());
    GenerateOptions go;
    go.on_step = [&](int64_t step, int64_t) {
      ctx.io.step("responses", done0 + static_cast<int64_t>((e - b) * std::min<double>(1.0, double(step) / o.max_new_tokens)), total);
    };
    const auto res = generate(ctx.model, reqs, go);
    std::vector<json> lines;
    for (size_t k = b; k < e; ++k) {
      const auto& r = res[k - b];
      lines.push_back({{"pair", todo[k].pair}, {"side", todo[k].side ? "pos" : "neg"},
                       {"question_index", ds.pairs[todo[k].pair].question_index},
                       {"response", ctx.tok.decode(r.tokens)}, {"response_ids", r.tokens}, {"finish", finish_reason_name(r.finish)}});
    }
    log.append_all(lines);
    appended += lines.size();
    ctx.io.step("responses", log.lines().size(), total);
    if (o.fail_after_rows >= 0 && appended >= o.fail_after_rows)
      fail(ErrorKind::internal, "responses", "simulated interruption after {} rows (fail_after_rows)", appended);
  }
  const json summary = {{"rows", log.lines().size()}, {"pairs", n_pairs}};
  st.finish("responses", hash, summary);
  ctx.io.say(fmt::format("responses: {} rows ({} pairs)", log.lines().size(), n_pairs));
  return summary;
}

// The responses by (pair, side).
std::map<std::pair<int64_t, int>, json> responses_by_key(const std::string& dir) {
  JsonlLog log(dir + "/responses.jsonl");
  std::map<std::pair<int64_t, int>, json> m;
  for (auto& l : log.lines()) m[{l.at("pair").get<int64_t>(), l.at("side") == "pos" ? 1 : 0}] = l;
  return m;
}

// Stage 2: vetting.
json stage_vet(TraitContext& ctx, const TraitDataset& ds, const ExtractOptions& o, const std::string& dir, StageLog& st,
               int64_t n_pairs, const std::string& up, std::string& hash) {
  const std::string coh = o.coherence.empty() ? ds.coherence : o.coherence;
  json settings = {{"responses", up}, {"vet", o.vet}, {"coherence", coh}};
  if (o.vet) {
    settings["scorer"] = ds.scorer;
    settings["judge"] = ds.scorer.empty() || coh == "judge" || o.on_topic_min > 0 ? need_judge(ctx, "vetting").id() : "";
    settings["thresholds"] = {o.pos_min, o.neg_max, o.coherence_min, o.on_topic_min};
    settings["rubric"] = {ds.rubric.trait_template, ds.rubric.coherence_template, ds.rubric.on_topic_template, ds.definition};
  }
  hash = hash_json(settings);
  if (st.up_to_date("vet", hash) && !forced(o, "vet") && fs::exists(dir + "/vet.json")) {
    ctx.io.say("vet: up to date");
    return st.summary("vet");
  }
  st.start("vet", hash);
  const auto rs = responses_by_key(dir);
  std::vector<json> rows;
  std::vector<int64_t> kept;
  json counts = {{"pairs", n_pairs}};
  if (!o.vet) {
    for (int64_t i = 0; i < n_pairs; ++i) {
      const bool ok = !rs.at({i, 1})["response_ids"].empty() && !rs.at({i, 0})["response_ids"].empty();
      if (ok) kept.push_back(i);
      for (int side = 1; side >= 0; --side)
        rows.push_back({{"pair", i}, {"side", side ? "pos" : "neg"}, {"pass", ok}, {"why", ok ? "not vetted" : "empty response"}});
    }
  } else {
    std::vector<std::string> qs, as;
    std::vector<std::pair<int64_t, int>> keys;
    for (int64_t i = 0; i < n_pairs; ++i)
      for (int side = 1; side >= 0; --side) {
        keys.push_back({i, side});
        qs.push_back(pair_question(ds, ds.pairs[i], side == 1));
        as.push_back(rs.at({i, side})["response"].get<std::string>());
      }
    const auto trait = trait_scores(ctx, ds, qs, as, "vet: trait");
    std::vector<Judgment> coherence(as.size()), on_topic(as.size());
    std::vector<double> loglik;
    if (coh == "judge") {
      coherence = coherence_judgments(ctx, ds, qs, as, "vet: coherence");
    } else {
      std::vector<std::vector<int32_t>> pr, re;
      for (auto& [i, side] : keys) {
        pr.push_back(pair_prompt(ctx, ds, ds.pairs[i], side == 1));
        re.push_back(ids_of(rs.at({i, side})["response_ids"]));
      }
      loglik = mean_logliks(ctx.model, pr, re, o.batch);
    }
    if (o.on_topic_min > 0 && ds.style == "instruct") on_topic = on_topic_judgments(ctx, ds, qs, as, "vet: on-topic");
    std::vector<int> pass(as.size());
    double tp = 0, tn = 0;
    int64_t np = 0, nn = 0, refused = 0;
    for (size_t k = 0; k < as.size(); ++k) {
      const bool pos = keys[k].second == 1;
      std::string why;
      const auto& ts = trait[k].score;
      if (rs.at(keys[k])["response_ids"].empty()) why = "empty response";
      else if (!ts) why = fmt::format("judge gave no trait score (refusal or too little mass on numbers: {:.3g})", trait[k].mass), ++refused;
      else if (pos && *ts < o.pos_min) why = fmt::format("trait {:.1f} < {}", *ts, o.pos_min);
      else if (!pos && *ts > o.neg_max) why = fmt::format("trait {:.1f} > {}", *ts, o.neg_max);
      else if (coh == "judge" && !coherence[k].score) why = fmt::format("no coherence score (mass {:.3g})", coherence[k].mass);
      else if (coh == "judge" && *coherence[k].score < o.coherence_min) why = fmt::format("coherence {:.1f} < {}", *coherence[k].score, o.coherence_min);
      else if (o.on_topic_min > 0 && ds.style == "instruct" && (!on_topic[k].score || *on_topic[k].score < o.on_topic_min)) why = "off topic";
      pass[k] = why.empty();
      if (ts) (pos ? (tp += *ts, ++np) : (tn += *ts, ++nn));
      json r = {{"pair", keys[k].first}, {"side", pos ? "pos" : "neg"}, {"trait", opt(trait[k])}, {"trait_mass", trait[k].mass},
                {"pass", why.empty()}, {"why", why}};
      r["coherence"] = coh == "judge" ? opt(coherence[k]) : json(nullptr);
      if (coh == "loglik") r["loglik"] = loglik[k];
      if (o.on_topic_min > 0) r["on_topic"] = opt(on_topic[k]);
      rows.push_back(r);
    }
    for (int64_t i = 0; i < n_pairs; ++i)
      if (pass[2 * i] && pass[2 * i + 1]) kept.push_back(i);
    counts["mean_trait_pos"] = np ? json(tp / np) : json(nullptr);
    counts["mean_trait_neg"] = nn ? json(tn / nn) : json(nullptr);
    counts["no_score"] = refused;
  }
  std::string lines;
  for (auto& r : rows) lines += r.dump() + "\n";
  write_atomic(dir + "/vet.jsonl", lines);
  counts["kept"] = kept.size();
  const json vet = {{"kept_pairs", kept}, {"counts", counts}, {"vetted", o.vet},
                    {"thresholds", {{"pos_min", o.pos_min}, {"neg_max", o.neg_max}, {"coherence_min", o.coherence_min},
                                    {"on_topic_min", o.on_topic_min}, {"coherence", coh}}}};
  write_atomic(dir + "/vet.json", vet.dump(2) + "\n");
  st.finish("vet", hash, counts);
  ctx.io.say(fmt::format("vet: kept {} of {} pairs{}", kept.size(), n_pairs, o.vet ? "" : " (vetting off)"));
  return counts;
}

std::vector<int64_t> kept_pairs(const std::string& dir) {
  return json::parse(read_file(dir + "/vet.json")).at("kept_pairs").get<std::vector<int64_t>>();
}

// Stage 3: activations.
json stage_acts(TraitContext& ctx, const TraitDataset& ds, const ExtractOptions& o, const std::string& dir, StageLog& st,
                const std::string& up, std::string& hash, std::vector<Site>& sites) {
  const auto& cfg = ctx.model.config();
  sites = parse_site_list(o.sites, cfg);
  std::vector<std::string> names;
  for (auto& s : sites) names.push_back(s.str());
  const auto kept = kept_pairs(dir);
  const json settings = {{"vet", up}, {"kept", kept}, {"sites", names}, {"positions", o.positions}};
  hash = hash_json(settings);
  if (kept.size() < 4) fail(ErrorKind::input, dir + "/vet.json", "only {} pairs passed vetting; at least 4 are needed (lower the thresholds, "
                                                               "fix the judge, or add pairs)", kept.size());
  if (st.up_to_date("activations", hash) && !forced(o, "activations")) {
    ctx.io.say("activations: up to date");
    return st.summary("activations");
  }
  const bool restart = st.started("activations") != hash || forced(o, "activations");
  st.start("activations", hash);
  const auto rs = responses_by_key(dir);
  CaptureSpec spec;
  spec.sites = sites;
  spec.positions = PositionSpec::parse(o.positions);
  spec.reduction = Reduction::mean;
  for (int side = 1; side >= 0; --side) {
    std::vector<CaptureRequest> reqs;
    for (int64_t i : kept) {
      CaptureRequest r;
      r.prompt = pair_prompt(ctx, ds, ds.pairs[i], side == 1);
      r.response = ids_of(rs.at({i, side})["response_ids"]);
      reqs.push_back(std::move(r));
    }
    StoreConfig sc;
    sc.model_identity = cfg.identity_hash();
    sc.model_type = cfg.model_type;
    sc.sites = names;
    sc.positions = o.positions;
    sc.reduction = "mean";
    sc.d_model = cfg.hidden_size;
    sc.shard_sequences = 256;
    sc.source = dir + "/responses.jsonl";
    sc.source_hash = hash;
    sc.extra = {{"trait", ds.name}, {"side", side ? "pos" : "neg"}, {"n_sequences", reqs.size()}};
    const std::string sd = dir + (side ? "/acts/pos" : "/acts/neg");
    StoreWriter w(sd, sc, restart);
    if (w.complete()) continue;
    const std::string label = side ? "activations (pos)" : "activations (neg)";
    capture_to_store(ctx.model, reqs, spec, w, o.batch, [&](int64_t d, int64_t t) { ctx.io.step(label, d, t); });
  }
  const json summary = {{"sites", names.size()}, {"pairs", kept.size()}};
  st.finish("activations", hash, summary);
  ctx.io.say(fmt::format("activations: {} sites x {} pairs x 2 sides", names.size(), kept.size()));
  return summary;
}

// Reads one site's rows of a mean-reduced store, [n_seq, d].
stats::Rows store_rows(const ActivationStore& s, const std::string& site) {
  stats::Rows r;
  for (int64_t sh = 0; sh < s.n_shards(); ++sh) {
    int64_t w = 0;
    auto x = s.read(site, sh, &w);
    r.d = w;
    r.x.insert(r.x.end(), x.begin(), x.end());
  }
  r.n = r.d ? static_cast<int64_t>(r.x.size()) / r.d : 0;
  return r;
}

stats::Rows take(const stats::Rows& a, const std::vector<int64_t>& idx) {
  stats::Rows r;
  r.d = a.d;
  r.n = idx.size();
  for (int64_t i : idx) r.x.insert(r.x.end(), a.row(i), a.row(i) + a.d);
  return r;
}

std::vector<double> unit(std::vector<double> v) {
  const double n = stats::norm(v);
  if (n > 0)
    for (auto& x : v) x /= n;
  return v;
}

// Stage 4: vectors and held-out evaluation.
json stage_vectors(TraitContext& ctx, const TraitDataset& ds, const ExtractOptions& o, const std::string& dir, StageLog& st,
                   const std::string& up, const std::vector<Site>& sites) {
  const auto kept = kept_pairs(dir);
  const json settings = {{"activations", up}, {"test_fraction", o.test_fraction}, {"split_seed", o.split_seed},
                         {"C", o.probe_C}, {"exclude_dims", o.exclude_dims}};
  const std::string hash = hash_json(settings);
  if (st.up_to_date("vectors", hash) && !forced(o, "vectors") && fs::exists(dir + "/vectors/summary.json")) {
    ctx.io.say("vectors: up to date");
    return json::parse(read_file(dir + "/vectors/summary.json"));
  }
  st.start("vectors", hash);
  // split by question (pairs sharing a question stay together), deterministically
  std::map<int64_t, uint64_t> qkey;
  for (int64_t i : kept) {
    const int64_t q = ds.pairs[i].question_index;
    const uint64_t s = o.split_seed;
    qkey[q] = fnv1a64(&q, sizeof q, fnv1a64(&s, sizeof s));
  }
  std::vector<std::pair<uint64_t, int64_t>> order;
  for (auto& [q, k] : qkey) order.push_back({k, q});
  std::sort(order.begin(), order.end());
  const size_t n_test_q = std::min(order.size() - 1, static_cast<size_t>(std::ceil(o.test_fraction * order.size())));
  std::set<int64_t> test_q;
  for (size_t i = 0; i < n_test_q; ++i) test_q.insert(order[i].second);
  std::vector<int64_t> tr, te;  // indices into the kept list (= store sequence index)
  for (size_t k = 0; k < kept.size(); ++k) (test_q.count(ds.pairs[kept[k]].question_index) ? te : tr).push_back(k);
  if (tr.size() < 2) fail(ErrorKind::input, "vectors", "{} training pairs after the split: need at least 2", tr.size());
  const auto pos = ActivationStore::open(dir + "/acts/pos"), neg = ActivationStore::open(dir + "/acts/neg");
  const char* methods[] = {"mean_diff", "probe", "pca"};
  std::map<std::string, VectorFile> files;
  json per = json::object();
  std::vector<json> site_results(sites.size());
  std::vector<std::array<std::vector<float>, 3>> vecs(sites.size());
  std::vector<std::array<double, 3>> mids(sites.size());
  std::vector<double> norms(sites.size());
  std::atomic<int64_t> done{0};
  std::mutex mu;
  ThreadPool::global().parallel_for(static_cast<int64_t>(sites.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t si = a; si < b; ++si) {
      const std::string name = sites[si].str();
      stats::Rows P = store_rows(pos, name), N = store_rows(neg, name);
      double ns = 0;
      for (int side = 0; side < 2; ++side) {
        const auto& R = side ? N : P;
        for (int64_t i = 0; i < R.n; ++i) {
          double s = 0;
          for (int64_t j = 0; j < R.d; ++j) s += static_cast<double>(R.row(i)[j]) * R.row(i)[j];
          ns += std::sqrt(s);
        }
      }
      norms[si] = ns / (P.n + N.n);
      for (int64_t dim : o.exclude_dims)
        if (dim < P.d)
          for (int side = 0; side < 2; ++side) {
            auto& R = side ? N : P;
            for (int64_t i = 0; i < R.n; ++i) R.x[i * R.d + dim] = 0;
          }
      const auto Ptr = take(P, tr), Ntr = take(N, tr), Pte = take(P, te), Nte = take(N, te);
      const auto md = stats::mean_difference(Ptr, Ntr);
      stats::ProbeOptions po;
      po.C = o.probe_C;
      const auto probe = stats::logistic_probe(Ptr, Ntr, po);
      const auto pca = stats::paired_pca(Ptr, Ntr);
      const auto mp = stats::mean_row(Ptr), mn = stats::mean_row(Ntr);
      json res = json::object();
      const std::vector<double> dirs[3] = {unit(md), unit(probe.w), pca};
      for (int m = 0; m < 3; ++m) {
        const auto& v = dirs[m];
        double mid = 0;
        for (size_t j = 0; j < v.size(); ++j) mid += 0.5 * (mp[j] + mn[j]) * v[j];
        mids[si][m] = mid;
        auto scores = [&](const stats::Rows& R) {
          std::vector<double> s;
          for (int64_t i = 0; i < R.n; ++i) s.push_back(m == 1 ? stats::probe_logit(probe, R.row(i), R.d, po.normalize_rows) : stats::dot(R.row(i), v));
          return s;
        };
        const double thr = m == 1 ? 0.0 : mid;
        const auto sp = scores(Pte), sn = scores(Nte), tp = scores(Ptr), tn = scores(Ntr);
        auto num = [](double x) { return std::isfinite(x) ? json(x) : json(nullptr); };
        res[methods[m]] = {{"test_accuracy", num(stats::accuracy(sp, sn, thr))}, {"test_auroc", num(stats::auroc(sp, sn))},
                           {"test_effect_size", num(stats::cohens_d(sp, sn))}, {"train_accuracy", num(stats::accuracy(tp, tn, thr))},
                           {"vector_norm", m == 0 ? stats::norm(md) : 1.0}};
        if (m == 1) res[methods[m]]["probe_iterations"] = probe.iterations;
        std::vector<float> f(v.size());
        for (size_t j = 0; j < v.size(); ++j) f[j] = static_cast<float>(m == 0 ? md[j] : v[j]);
        vecs[si][m] = std::move(f);
      }
      res["mean_norm"] = norms[si];
      site_results[si] = res;
      std::lock_guard<std::mutex> l(mu);
      ctx.io.step("vectors", ++done, static_cast<int64_t>(sites.size()));
    }
  });
  fs::create_directories(dir + "/vectors");
  std::vector<int64_t> test_ids;
  for (int64_t k : te) test_ids.push_back(kept[k]);
  json summary = {{"trait", ds.name}, {"pairs", kept.size()}, {"train_pairs", tr.size()}, {"test_pairs", te.size()},
                  {"test_pair_ids", test_ids},
                  {"test_questions", test_q.size()}, {"sites", json::object()}, {"best", json::object()}};
  for (size_t si = 0; si < sites.size(); ++si) summary["sites"][sites[si].str()] = site_results[si];
  std::string table = fmt::format("# {} — held-out evaluation ({} train / {} test pairs)\n\n| site | method | accuracy | AUROC | effect size (d) |\n|---|---|---|---|---|\n",
                                  ds.name, tr.size(), te.size());
  for (int m = 0; m < 3; ++m) {
    VectorFile vf;
    json mid = json::object();
    std::string best;
    double best_auc = -1, best_d = -INFINITY;
    for (size_t si = 0; si < sites.size(); ++si) {
      const std::string name = sites[si].str();
      vf.vectors[name] = vecs[si][m];
      vf.norms[name] = norms[si];
      mid[name] = mids[si][m];
      const json& r = site_results[si][methods[m]];
      const double auc = r["test_auroc"].is_null() ? -1 : r["test_auroc"].get<double>();
      const double d = r["test_effect_size"].is_null() ? -INFINITY : r["test_effect_size"].get<double>();
      if (auc > best_auc || (auc == best_auc && d > best_d)) best = name, best_auc = auc, best_d = d;
      auto f = [](const json& x) { return x.is_null() ? std::string("—") : fmt::format("{:.3f}", x.get<double>()); };
      table += fmt::format("| {} | {} | {} | {} | {} |\n", name, methods[m], f(r["test_accuracy"]), f(r["test_auroc"]), f(r["test_effect_size"]));
    }
    vf.meta = {{"model_identity", ctx.model.config().identity_hash()}, {"method", methods[m]}, {"trait", ds.name},
               {"normalization", m == 0 ? "none (raw mean difference)" : "unit norm"},
               {"source_hash", hash}, {"positions", o.positions}, {"midpoints", mid.dump()},
               {"best_site", best}, {"dataset", ds.path}, {"dataset_hash", ds.hash},
               {"excluded_dims", json(o.exclude_dims).dump()},
               {"split", json({{"train_pairs", tr.size()}, {"test_pairs", te.size()}, {"seed", o.split_seed}}).dump()}};
    vf.save(dir + "/vectors/" + methods[m] + ".safetensors");
    summary["best"][methods[m]] = {{"site", best}, {"test_auroc", best_auc}, {"test_effect_size", best_d}};
  }
  table += "\nBest site per method (held-out AUROC, then effect size):\n\n";
  for (int m = 0; m < 3; ++m) table += fmt::format("- {}: {}\n", methods[m], summary["best"][methods[m]]["site"].get<std::string>());
  write_atomic(dir + "/vectors/summary.md", table);
  write_atomic(dir + "/vectors/summary.json", summary.dump(2) + "\n");
  st.finish("vectors", hash, summary["best"]);
  ctx.io.say(fmt::format("vectors: {} sites x 3 methods -> {}/vectors/ (best probe site {})", sites.size(), dir,
                         summary["best"]["probe"]["site"].get<std::string>()));
  return summary;
}

}  // namespace

json run_extract(TraitContext& ctx, const TraitDataset& ds, const ExtractOptions& o) {
  const std::string dir = o.out + "/" + ds.name;
  fs::create_directories(dir);
  StageLog st(dir);
  const int64_t n_pairs = o.max_pairs > 0 ? std::min<int64_t>(o.max_pairs, ds.pairs.size()) : ds.pairs.size();
  write_atomic(dir + "/dataset.json", ds.describe().dump(2) + "\n");
  std::string h1, h2, h3;
  json out = {{"trait", ds.name}, {"dir", dir}};
  out["responses"] = stage_responses(ctx, ds, o, dir, st, n_pairs, h1);
  if (o.stop_after == "responses") return out;
  out["vet"] = stage_vet(ctx, ds, o, dir, st, n_pairs, h1, h2);
  if (o.stop_after == "vet") return out;
  std::vector<Site> sites;
  out["activations"] = stage_acts(ctx, ds, o, dir, st, h2, h3, sites);
  if (o.stop_after == "activations") return out;
  out["vectors"] = stage_vectors(ctx, ds, o, dir, st, h3, sites);
  return out;
}

// ---- steering evaluation ----

void search_step(SearchState& s, bool coherent, const SearchRule& r) {
  if (s.done) return;
  ++s.steps;
  if (coherent) s.good = std::max(s.good, s.coef);
  else s.bad = s.bad > 0 ? std::min(s.bad, s.coef) : s.coef;
  if (s.bad > 0 && s.good > 0) {
    s.coef = 0.5 * (s.good + s.bad);
    if (s.bad / s.good < 1 + r.tol) s.done = true;
  } else if (s.bad > 0) {
    s.coef = s.coef * r.shrink;
  } else {
    s.coef = s.coef * r.grow;
  }
  if (s.steps >= r.max_steps) s.done = true;
}

namespace {

struct Cand {
  std::string site;  // "" baseline; "all" ablates every site
  double rel = 0;    // relative coefficient magnitude (adaptive / grid); 0 for ablation
  bool ablate = false;
  std::string key() const { return fmt::format("{}|{:.6g}|{}", site, rel, ablate); }
};

}  // namespace

json run_steer_eval(TraitContext& ctx, const TraitDataset& ds, const SteerEvalOptions& o) {
  const auto& cfg = ctx.model.config();
  const std::string tdir = o.out + "/" + ds.name, dir = tdir + "/steer";
  const std::string vpath = o.vectors.empty() ? tdir + "/vectors/" + o.method + ".safetensors" : o.vectors;
  if (!fs::exists(vpath)) fail(ErrorKind::input, vpath, "no vector file (run kscope extract first, or give --vectors)");
  VectorFile vf = VectorFile::load(vpath);
  vf.check_model(cfg, vpath);
  if (o.mode != "adaptive" && o.mode != "grid" && o.mode != "ablate")
    fail(ErrorKind::input, "--mode", "'{}' is not adaptive, grid or ablate", o.mode);
  const std::string coh = o.coherence.empty() ? ds.coherence : o.coherence;
  std::vector<Site> sites = parse_site_list(o.sites, cfg);
  std::map<std::string, std::vector<float>> vec;
  std::map<std::string, double> vnorm, mnorm;
  for (auto& s : sites) {
    auto v = vf.at(s.str(), vpath);
    for (int64_t d : o.exclude_dims)
      if (d < static_cast<int64_t>(v.size())) v[d] = 0;
    double n = 0;
    for (float x : v) n += static_cast<double>(x) * x;
    vnorm[s.str()] = std::sqrt(n);
    if (!(vnorm[s.str()] > 0)) fail(ErrorKind::input, vpath, "the vector at '{}' is zero", s.str());
    if (!vf.norms.count(s.str())) fail(ErrorKind::input, vpath, "no mean norm for site '{}' in the file's metadata", s.str());
    mnorm[s.str()] = vf.norms.at(s.str());
    vec[s.str()] = std::move(v);
  }
  std::vector<std::string> questions = ds.eval_questions;
  if (o.max_questions > 0 && static_cast<int64_t>(questions.size()) > o.max_questions) questions.resize(o.max_questions);
  std::vector<std::vector<int32_t>> prompts;
  for (auto& q : questions) prompts.push_back(render_prompt(ctx.tok, ctx.chat, ds.style, "", q));
  std::vector<std::string> site_names;
  for (auto& s : sites) site_names.push_back(s.str());
  const json settings = {{"vectors", fnv1a64_file(vpath)}, {"sites", site_names}, {"mode", o.mode}, {"grid", o.grid},
                         {"start", o.start}, {"rule", {o.rule.grow, o.rule.shrink, o.rule.tol, o.rule.max_steps}},
                         {"positions", o.positions}, {"max_new_tokens", o.max_new_tokens}, {"questions", questions},
                         {"temperature", o.temperature}, {"seed", o.seed}, {"coherence", coh}, {"coherence_min", o.coherence_min},
                         {"on_topic_min", o.on_topic_min}, {"scorer", ds.scorer}, {"judge", ctx.judge ? ctx.judge->id() : ""},
                         {"rubric", {ds.rubric.trait_template, ds.rubric.coherence_template, ds.definition}},
                         {"exclude_dims", o.exclude_dims}, {"sign", ds.steer_sign}};
  const std::string hash = hash_json(settings);
  JsonlLog log(dir + "/results.jsonl");
  if (!log.lines().empty() && log.lines()[0].value("hash", "") != hash) {
    if (!o.force)
      fail(ErrorKind::input, log.path(), "was written with other settings; rerun with --force to start over (or use another --out)");
    log.clear();
  } else if (o.force) {
    log.clear();
  }
  if (log.lines().empty()) log.append({{"kind", "settings"}, {"hash", hash}, {"settings", settings}});
  else ctx.io.say(fmt::format("steer-eval: resuming from {} logged records", log.lines().size() - 1));

  const double sign = ds.steer_sign;
  // what the log already holds
  std::optional<json> baseline;
  std::vector<json> records;
  std::set<std::string> logged;
  for (size_t i = 1; i < log.lines().size(); ++i) {
    const json& l = log.lines()[i];
    if (l["kind"] == "baseline") baseline = l;
    else if (l["kind"] == "candidate") {
      records.push_back(l);
      logged.insert(Cand{l["site"], l["rel"], l["ablate"]}.key());
    }
  }
  std::map<std::string, SearchState> search;
  if (o.mode == "adaptive") {
    for (auto& s : site_names) search[s].coef = o.start;
    for (auto& r : records) {  // replay the rule over the logged outcomes
      auto& s = search[r["site"].get<std::string>()];
      search_step(s, r["coherent"].get<bool>(), o.rule);
    }
  }
  auto pending = [&]() {
    std::vector<Cand> c;
    if (o.mode == "adaptive") {
      for (auto& s : site_names)
        if (!search[s].done) c.push_back({s, search[s].coef, false});
    } else if (o.mode == "grid") {
      for (auto& s : site_names)
        for (double g : o.grid)
          if (!logged.count(Cand{s, g, false}.key())) c.push_back({s, g, false});
    } else {
      for (auto& s : site_names)
        if (!logged.count(Cand{s, 0, true}.key())) c.push_back({s, 0, true});
      if (site_names.size() > 1 && !logged.count(Cand{"all", 0, true}.key())) c.push_back({"all", 0, true});
    }
    return c;
  };
  const PositionSpec pos_spec = PositionSpec::parse(o.positions);
  const PositionSpec all_pos = PositionSpec::parse("all");
  auto make_iv = [&](const std::string& s, double rel, bool ablate) {
    Intervention iv;
    iv.site = parse_site(s, cfg.num_hidden_layers);
    iv.vector = vec.at(s);
    if (ablate) {
      iv.op = InterventionOp::ablate;
      iv.positions = all_pos;
    } else {
      iv.op = InterventionOp::add;
      iv.coef = sign * rel;
      iv.relative = true;
      iv.mean_norm = mnorm.at(s);
      iv.positions = pos_spec;
    }
    iv.label = fmt::format("{}{}", s, ablate ? "!ablate" : fmt::format("*{}n", sign * rel));
    return iv;
  };
  int step = records.empty() ? 0 : records.back()["step"].get<int>() + 1;
  int64_t steps_run = 0;
  for (;;) {
    const auto cands = pending();
    const bool need_base = !baseline.has_value();
    if (cands.empty() && !need_base) break;
    // one generation: baseline rows (if missing) then every candidate x question
    std::vector<GenerateRequest> reqs;
    std::vector<std::vector<Intervention>> ivs;
    std::vector<SeqLayout> layouts;
    const int64_t nq = questions.size();
    const int64_t groups = static_cast<int64_t>(cands.size()) + (need_base ? 1 : 0);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t q = 0; q < nq; ++q) {
        GenerateRequest r;
        r.prompt = prompts[q];
        r.max_new_tokens = o.max_new_tokens;
        r.sampling.temperature = o.temperature;
        r.sampling.seed = o.seed + q;
        reqs.push_back(r);
        std::vector<Intervention> l;
        const int64_t c = need_base ? g - 1 : g;
        if (c >= 0) {
          const Cand& k = cands[c];
          if (k.site == "all")
            for (auto& s : site_names) l.push_back(make_iv(s, 0, true));
          else
            l.push_back(make_iv(k.site, k.rel, k.ablate));
        }
        ivs.push_back(l);
        SeqLayout lay;
        lay.prompt_len = static_cast<int64_t>(r.prompt.size());
        layouts.push_back(lay);
      }
    ctx.io.say(fmt::format("steer-eval step {}: {} candidates{} x {} questions = {} rows in one batch", step, cands.size(),
                           need_base ? " + baseline" : "", nq, reqs.size()));
    SteeringHook hook(ivs, layouts);
    hook.validate(cfg);
    GenerateOptions go;
    go.observer = &hook;
    go.on_step = [&](int64_t s, int64_t) { ctx.io.step("generating", s, o.max_new_tokens); };
    const auto res = generate(ctx.model, reqs, go);
    std::vector<std::string> qs, as;
    std::vector<std::vector<int32_t>> pr, re;
    for (size_t i = 0; i < res.size(); ++i) {
      qs.push_back(questions[i % nq]);
      as.push_back(ctx.tok.decode(res[i].tokens));
      pr.push_back(prompts[i % nq]);
      re.push_back(res[i].tokens);
    }
    const auto trait = trait_scores(ctx, ds, qs, as, "judging trait");
    std::vector<Judgment> coherence(as.size()), on_topic(as.size());
    std::vector<double> lls;
    if (coh == "judge") {
      coherence = coherence_judgments(ctx, ds, qs, as, "judging coherence");
    } else {
      // relative likelihood per token under the unsteered model, against the unsteered answer to the same question
      const auto ll = mean_logliks(ctx.model, pr, re, 32);
      std::vector<double> base_ll(nq);
      if (need_base) {
        for (int64_t q = 0; q < nq; ++q) base_ll[q] = ll[q];
      } else {
        for (int64_t q = 0; q < nq; ++q) base_ll[q] = (*baseline)["responses"][q]["loglik"].get<double>();
      }
      // an empty answer is not a coherent one
      for (size_t k = 0; k < as.size(); ++k)
        coherence[k] = {re[k].empty() ? 0.0 : 100.0 * std::exp(std::min(0.0, ll[k] - base_ll[k % nq])), 1.0};
      lls = ll;
    }
    if (o.on_topic_min > 0 && ds.style == "instruct") on_topic = on_topic_judgments(ctx, ds, qs, as, "judging on-topic");
    std::vector<json> out_lines;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c = need_base ? g - 1 : g;
      json r = c >= 0 ? json({{"kind", "candidate"}, {"site", cands[c].site}, {"rel", cands[c].rel}, {"ablate", cands[c].ablate}, {"step", step}})
                      : json({{"kind", "baseline"}});
      double ts = 0, cs = 0, os = 0;
      int64_t nt = 0, nc = 0, no = 0;
      json resp = json::array();
      for (int64_t q = 0; q < nq; ++q) {
        const size_t k = g * nq + q;
        if (trait[k].score) ts += *trait[k].score, ++nt;
        if (coherence[k].score) cs += *coherence[k].score, ++nc;
        if (on_topic[k].score) os += *on_topic[k].score, ++no;
        json x = {{"question", q}, {"text", as[k]}, {"trait", opt(trait[k])}, {"coherence", opt(coherence[k])}};
        if (o.on_topic_min > 0) x["on_topic"] = opt(on_topic[k]);
        if (!lls.empty()) x["loglik"] = lls[k];
        resp.push_back(x);
      }
      r["trait"] = nt ? json(ts / nt) : json(nullptr);
      r["coherence"] = nc ? json(cs / nc) : json(nullptr);
      if (no) r["on_topic"] = os / no;
      r["scored"] = nt;
      r["n"] = nq;
      if (c >= 0) {
        const Cand& k = cands[c];
        if (!k.ablate) r["coef"] = sign * k.rel * mnorm.at(k.site) / vnorm.at(k.site);
        const bool ok = nc > 0 && cs / nc >= o.coherence_min && (o.on_topic_min <= 0 || ds.style != "instruct" || (no > 0 && os / no >= o.on_topic_min));
        r["coherent"] = ok;
      }
      r["responses"] = resp;
      out_lines.push_back(r);
    }
    log.append_all(out_lines);
    for (auto& r : out_lines) {
      if (r["kind"] == "baseline") baseline = r;
      else {
        records.push_back(r);
        logged.insert(Cand{r["site"], r["rel"], r["ablate"]}.key());
        if (o.mode == "adaptive") search_step(search[r["site"].get<std::string>()], r["coherent"].get<bool>(), o.rule);
      }
    }
    ++step;
    if (o.fail_after_steps >= 0 && ++steps_run >= o.fail_after_steps)
      fail(ErrorKind::internal, "steer-eval", "simulated interruption after {} steps (fail_after_steps)", steps_run);
  }
  // summary
  const double base_t = (*baseline)["trait"].is_null() ? NAN : (*baseline)["trait"].get<double>();
  const json* best = nullptr;
  double best_delta = -INFINITY;
  for (auto& r : records) {
    if (!r["coherent"].get<bool>() || r["trait"].is_null()) continue;
    const double delta = r["ablate"].get<bool>() ? base_t - r["trait"].get<double>() : sign * (r["trait"].get<double>() - base_t);
    if (delta > best_delta) best_delta = delta, best = &r;
  }
  json summary = {{"trait", ds.name}, {"vectors", vpath}, {"mode", o.mode}, {"baseline", (*baseline)["trait"]},
                  {"baseline_coherence", (*baseline)["coherence"]}, {"candidates", records.size()}, {"coherence_min", o.coherence_min},
                  {"coherence_scoring", coh}, {"steer", sign > 0 ? "increase" : "decrease"}};
  if (best) {
    summary["best_site"] = (*best)["site"];
    summary["delta"] = (*best)["trait"].get<double>() - base_t;
    summary["trait"] = (*best)["trait"];
    summary["coherence"] = (*best)["coherence"];
    summary["coef"] = best->contains("coef") ? (*best)["coef"] : json(nullptr);
    summary["rel_coef"] = (*best)["rel"];
    std::string lines;
    for (auto& x : (*best)["responses"])
      lines += json({{"question", questions[x["question"].get<int64_t>()]}, {"response", x["text"]}, {"trait", x["trait"]},
                     {"coherence", x["coherence"]}, {"site", (*best)["site"]}, {"coef", summary["coef"]}}).dump() + "\n";
    write_atomic(dir + "/best_responses.jsonl", lines);
  } else {
    summary["best_site"] = nullptr;
    summary["delta"] = nullptr;
  }
  auto f1 = [](const json& x) { return x.is_null() ? std::string("—") : fmt::format("{:.1f}", x.get<double>()); };
  std::string md = fmt::format("# steering {} ({}; {})\n\n| Trait | Baseline | Best site | Delta | Coherence | Coef |\n|---|---|---|---|---|---|\n",
                               ds.name, o.mode, vpath);
  md += fmt::format("| {} | {} | {} | {} | {} | {} |\n\n", ds.name, f1(summary["baseline"]),
                    best ? (*best)["site"].get<std::string>() : "(none coherent)",
                    best ? fmt::format("{:+.1f}", summary["delta"].get<double>()) : "—", best ? f1(summary["coherence"]) : "—",
                    best && !summary["coef"].is_null() ? fmt::format("{:.3g}", summary["coef"].get<double>()) : "—");
  md += "All candidates:\n\n| site | relative coef | coef | trait | coherence | counted |\n|---|---|---|---|---|---|\n";
  for (auto& r : records)
    md += fmt::format("| {} | {} | {} | {} | {} | {} |\n", r["site"].get<std::string>(), r["ablate"].get<bool>() ? "ablate" : fmt::format("{:.3g}", r["rel"].get<double>()),
                      r.contains("coef") ? fmt::format("{:.3g}", r["coef"].get<double>()) : "—", f1(r["trait"]), f1(r["coherence"]),
                      r["coherent"].get<bool>() ? "yes" : "no");
  write_atomic(dir + "/summary.md", md);
  write_atomic(dir + "/summary.json", summary.dump(2) + "\n");
  if (o.mode != "ablate") {
    Plot pt{"trait score", "coefficient (x mean norm / |v|)", "trait (0-100)"}, pc{"coherence", "coefficient (x mean norm / |v|)", "coherence (0-100)"};
    for (auto& s : site_names) {
      std::vector<std::pair<double, const json*>> pts;
      for (auto& r : records)
        if (r["site"] == s) pts.push_back({r["rel"].get<double>(), &r});
      std::sort(pts.begin(), pts.end(), [](auto& a, auto& b) { return a.first < b.first; });
      PlotSeries a{s, {0.0}, {base_t}}, b{s, {0.0}, {(*baseline)["coherence"].is_null() ? NAN : (*baseline)["coherence"].get<double>()}};
      for (auto& [x, r] : pts) {
        a.x.push_back(x);
        a.y.push_back((*r)["trait"].is_null() ? NAN : (*r)["trait"].get<double>());
        b.x.push_back(x);
        b.y.push_back((*r)["coherence"].is_null() ? NAN : (*r)["coherence"].get<double>());
      }
      pt.series.push_back(a);
      pc.series.push_back(b);
    }
    if (std::isfinite(base_t)) pt.hlines.push_back(base_t);
    pc.hlines.push_back(o.coherence_min);
    write_atomic(dir + "/plot.svg", svg_panels({pt, pc}, fmt::format("steering {} with {} ({})", ds.name, fs::path(vpath).filename().string(), o.mode)));
  }
  ctx.io.say(fmt::format("steer-eval: baseline {} -> best {} (delta {}), written to {}", f1(summary["baseline"]),
                         best ? (*best)["site"].get<std::string>() : "(none coherent)", best ? fmt::format("{:+.1f}", summary["delta"].get<double>()) : "—", dir));
  return summary;
}

}  // namespace kscope
