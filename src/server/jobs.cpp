#include "server/jobs.hpp"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "interp/vectors.hpp"
#include "trait/analysis.hpp"
#include "trait/dataset.hpp"
#include "trait/experiment.hpp"
#include "trait/judge.hpp"
#include "trait/pipeline.hpp"
#include "util/error.hpp"

namespace kscope {
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Thrown from the pipeline's poll: a cancel (user) or a server shutdown (the job stays resumable).
struct Stop {
  bool user;
};

[[noreturn]] void bad(const std::string& field, const std::string& msg) { throw JobError(400, field, field + ": " + msg); }

const std::map<std::string, std::set<std::string>>& allowed() {
  static const std::map<std::string, std::set<std::string>> a = {
      {"extract", {"trait", "dataset", "sites", "positions", "max_new_tokens", "batch", "temperature", "seed", "max_pairs", "vet",
                   "pos_min", "neg_max", "coherence_min", "on_topic_min", "coherence", "test_fraction", "split_seed", "probe_C",
                   "exclude_dims", "judge", "judge_min_mass", "stop_after"}},
      {"steer-eval", {"trait", "dataset", "from_job", "vectors", "method", "sites", "mode", "grid", "start", "grow", "shrink", "steps",
                      "coherence_min", "on_topic_min", "coherence", "positions", "max_new_tokens", "max_questions", "temperature",
                      "seed", "exclude_dims", "judge", "judge_min_mass"}},
      {"project", {"vectors", "sites", "rollouts", "batch"}},
      {"massive", {"prompts", "ratio", "persistent", "top", "batch"}}};
  return a;
}

// Typed readers naming "params.FIELD" in their errors.
struct Params {
  const json& j;
  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  std::string str(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j[k].is_string()) bad(std::string("params.") + k, "expected a string");
    return j[k];
  }
  double num(const char* k, double def) const {
    if (!has(k)) return def;
    if (!j[k].is_number()) bad(std::string("params.") + k, "expected a number");
    return j[k];
  }
  int64_t integer(const char* k, int64_t def, int64_t lo = 0) const {
    if (!has(k)) return def;
    if (!j[k].is_number_integer() || j[k].get<int64_t>() < lo) bad(std::string("params.") + k, fmt::format("expected an integer >= {}", lo));
    return j[k];
  }
  bool flag(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean()) bad(std::string("params.") + k, "expected true or false");
    return j[k];
  }
  std::vector<int64_t> ints(const char* k) const {
    if (!has(k)) return {};
    if (!j[k].is_array()) bad(std::string("params.") + k, "expected a list of integers");
    std::vector<int64_t> v;
    for (auto& x : j[k]) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0) bad(std::string("params.") + k, "expected a list of integers >= 0");
      v.push_back(x);
    }
    return v;
  }
  std::vector<double> nums(const char* k, std::vector<double> def) const {
    if (!has(k)) return def;
    if (!j[k].is_array() || j[k].empty()) bad(std::string("params.") + k, "expected a non-empty list of numbers");
    std::vector<double> v;
    for (auto& x : j[k]) {
      if (!x.is_number()) bad(std::string("params.") + k, "expected a list of numbers");
      v.push_back(x);
    }
    return v;
  }
};

bool safe_name(const std::string& s) {
  if (s.empty() || s.size() > 128 || s[0] == '.') return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  return true;
}

}  // namespace

struct JobManager::Job {
  std::string id, kind;
  json params;
  std::string state = "queued";  // queued | running | done | failed | canceled | interrupted
  int64_t created = 0, started = 0, finished = 0, runs = 0, last_save = 0;
  json progress = {{"label", ""}, {"done", 0}, {"total", 0}};
  json result;
  std::string error;
  std::atomic<bool> cancel{false};
  json to_json() const {
    return {{"id", id}, {"kind", kind}, {"params", params}, {"state", state}, {"created_ms", created}, {"started_ms", started},
            {"finished_ms", finished}, {"runs", runs}, {"progress", progress}, {"result", result},
            {"error", error.empty() ? json(nullptr) : json(error)}};
  }
};

JobManager::JobManager(std::string dir, Model& model, const Tokenizer* tok, ChatFormat chat, std::string model_name, std::string vectors_dir)
    : dir_(std::move(dir)), model_(model), tok_(tok), chat_(chat), model_name_(std::move(model_name)), vectors_dir_(std::move(vectors_dir)) {
  fs::create_directories(dir_);
  std::vector<std::shared_ptr<Job>> found;
  for (auto& e : fs::directory_iterator(dir_)) {
    const std::string f = e.path().string() + "/job.json";
    if (!e.is_directory() || !fs::exists(f)) continue;
    json j;
    try {
      j = json::parse(read_file(f));
    } catch (const std::exception& ex) {
      fail(ErrorKind::format, f, "damaged job record: {}", ex.what());
    }
    auto job = std::make_shared<Job>();
    job->id = j.at("id");
    job->kind = j.at("kind");
    job->params = j.at("params");
    job->state = j.at("state");
    job->created = j.value("created_ms", int64_t{0});
    job->started = j.value("started_ms", int64_t{0});
    job->finished = j.value("finished_ms", int64_t{0});
    job->runs = j.value("runs", int64_t{0});
    job->progress = j.value("progress", json::object());
    job->result = j.value("result", json());
    if (j.contains("error") && j["error"].is_string()) job->error = j["error"];
    found.push_back(job);
  }
  std::sort(found.begin(), found.end(), [](auto& a, auto& b) { return a->created < b->created || (a->created == b->created && a->id < b->id); });
  for (auto& job : found) {
    jobs_[job->id] = job;
    if (job->state == "queued" || job->state == "running" || job->state == "interrupted") {
      const bool was_running = job->state != "queued";
      job->state = "queued";
      save(*job);
      if (was_running) append_log(*job, "server restarted: queued again, resuming from the job's files");
      queue_.push_back(job->id);
    }
  }
  worker_ = std::thread([this] { worker(); });
}

JobManager::~JobManager() {
  shutdown_ = true;
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void JobManager::save(const Job& j) const { write_atomic(dir_ + "/" + j.id + "/job.json", j.to_json().dump(2) + "\n"); }

void JobManager::append_log(const Job& j, const std::string& line) const {
  std::ofstream f(dir_ + "/" + j.id + "/log.txt", std::ios::app);
  const auto t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S", std::gmtime(&t));
  f << ts << "  " << line << "\n";
}

std::shared_ptr<JobManager::Job> JobManager::find(const std::string& id) const {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) throw JobError(404, "id", fmt::format("no job '{}'", id));
  return it->second;
}

json JobManager::submit(const json& req) {
  if (!req.is_object()) bad("body", "expected {\"kind\", \"params\"}");
  for (auto& [k, v] : req.items())
    if (k != "kind" && k != "params") bad(k, "unknown field (expected kind, params)");
  if (!req.contains("kind") || !req["kind"].is_string()) bad("kind", "expected one of extract, steer-eval, project, massive");
  const std::string kind = req["kind"];
  auto al = allowed().find(kind);
  if (al == allowed().end()) bad("kind", fmt::format("'{}' is not extract, steer-eval, project or massive", kind));
  const json params = req.value("params", json::object());
  if (!params.is_object()) bad("params", "expected an object");
  for (auto& [k, v] : params.items())
    if (!al->second.count(k)) {
      std::string known;
      for (auto& a : al->second) known += (known.empty() ? "" : ", ") + a;
      bad("params." + k, fmt::format("unknown field for a {} job (known: {})", kind, known));
    }
  if (kind != "massive" || params.contains("prompts"))
    if (!tok_) bad("kind", "this model has no tokenizer; text jobs need one");
  Params p{params};
  // validate what can be checked now, so a bad job fails at submit and not in the queue
  if (kind == "extract" || kind == "steer-eval") {
    if (p.has("dataset")) {
      if (!params["dataset"].is_object()) bad("params.dataset", "expected an inline trait dataset object (docs/traits.md)");
    } else if (kind == "extract" || !p.has("from_job")) {
      const std::string t = p.str("trait", "");
      if (t.empty()) bad("params.trait", "name a shipped trait (GET /traits) or give an inline 'dataset'");
      if (!safe_name(t) || !fs::exists(traits_dir() + "/" + t + ".json")) bad("params.trait", fmt::format("'{}' is not a shipped trait", t));
    }
    const json judge = params.value("judge", json("self"));
    if (judge.is_string() && judge != "self" && judge != "none") bad("params.judge", "expected \"self\", \"none\" or {\"url\", \"model\", \"key\"?}");
    if (judge.is_object() && (!judge.contains("url") || !judge.contains("model"))) bad("params.judge", "an OpenAI-compatible judge needs 'url' and 'model'");
    if (!judge.is_string() && !judge.is_object()) bad("params.judge", "expected \"self\", \"none\" or an object");
    if (p.has("sites")) {
      try {
        parse_site_list(p.str("sites", ""), model_.config());
      } catch (const Error& e) {
        bad("params.sites", e.what());
      }
    }
    p.ints("exclude_dims");
  }
  if (kind == "steer-eval" && p.has("from_job")) {
    std::lock_guard<std::mutex> l(mu_);
    auto src = find(p.str("from_job", ""));
    if (src->kind != "extract") bad("params.from_job", "must name an extract job");
  }
  if (kind == "steer-eval" && p.has("vectors") && !safe_name(p.str("vectors", ""))) bad("params.vectors", "a vector name in the server's --vectors directory");
  if (kind == "project") {
    if (!p.has("vectors") || !params["vectors"].is_array() || params["vectors"].empty())
      bad("params.vectors", "expected a list of {\"job\": ID, \"method\"?} or vector names");
    if (!p.has("rollouts") || !params["rollouts"].is_array() || params["rollouts"].empty())
      bad("params.rollouts", "expected a list of rollouts ({\"id\", \"messages\"} or {\"id\", \"text\"})");
  }
  if (kind == "massive" && p.has("prompts") && (!params["prompts"].is_array() || params["prompts"].empty()))
    bad("params.prompts", "expected a non-empty list of texts or {\"messages\"}");
  auto job = std::make_shared<Job>();
  static std::atomic<uint32_t> n{0};
  static const uint32_t salt = std::random_device{}() & 0xffff;
  job->created = now_ms();
  job->id = fmt::format("job-{:x}-{:04x}{:04x}", job->created, salt, ++n & 0xffff);
  job->kind = kind;
  job->params = params;
  fs::create_directories(dir_ + "/" + job->id + "/out");
  if (p.has("dataset")) {
    write_atomic(dir_ + "/" + job->id + "/dataset.json", params["dataset"].dump(1));
    try {
      TraitDataset::load(dir_ + "/" + job->id + "/dataset.json");
    } catch (const Error& e) {
      fs::remove_all(dir_ + "/" + job->id);
      bad("params.dataset", e.what());
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  save(*job);
  append_log(*job, fmt::format("queued: {} {}", kind, params.dump()));
  jobs_[job->id] = job;
  queue_.push_back(job->id);
  cv_.notify_all();
  return job->to_json();
}

json JobManager::list() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::shared_ptr<Job>> v;
  for (auto& [id, j] : jobs_) v.push_back(j);
  std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a->created < b->created || (a->created == b->created && a->id < b->id); });
  json out = json::array();
  for (auto& j : v) {
    json r = j->to_json();
    r.erase("result");
    out.push_back(r);
  }
  return {{"jobs", out}};
}

json JobManager::get(const std::string& id) const {
  std::lock_guard<std::mutex> l(mu_);
  return find(id)->to_json();
}

std::string JobManager::log(const std::string& id) const {
  {
    std::lock_guard<std::mutex> l(mu_);
    find(id);
  }
  const std::string p = dir_ + "/" + id + "/log.txt";
  return fs::exists(p) ? read_file(p) : "";
}

json JobManager::cancel(const std::string& id) {
  std::lock_guard<std::mutex> l(mu_);
  auto j = find(id);
  if (j->state == "queued") {
    queue_.erase(std::remove(queue_.begin(), queue_.end(), id), queue_.end());
    j->state = "canceled";
    j->finished = now_ms();
    save(*j);
    append_log(*j, "canceled before it started");
  } else if (j->state == "running") {
    j->cancel = true;  // the worker stops it at its next report
  }
  return j->to_json();
}

void JobManager::remove(const std::string& id) {
  std::lock_guard<std::mutex> l(mu_);
  auto j = find(id);
  if (j->state == "queued" || j->state == "running") throw JobError(409, "id", fmt::format("job '{}' is {}: cancel it first", id, j->state));
  jobs_.erase(id);
  fs::remove_all(dir_ + "/" + id);
}

json JobManager::files(const std::string& id) const {
  {
    std::lock_guard<std::mutex> l(mu_);
    find(id);
  }
  json out = json::array();
  const fs::path root = dir_ + "/" + id + "/out";
  if (fs::exists(root))
    for (auto& e : fs::recursive_directory_iterator(root))
      if (e.is_regular_file() && e.path().extension() != ".tmp")
        out.push_back({{"path", fs::relative(e.path(), root).string()}, {"bytes", e.file_size()}});
  std::sort(out.begin(), out.end(), [](const json& a, const json& b) { return a["path"] < b["path"]; });
  return {{"files", out}};
}

std::string JobManager::file_path(const std::string& id, const std::string& rel) const {
  {
    std::lock_guard<std::mutex> l(mu_);
    find(id);
  }
  const fs::path root = fs::weakly_canonical(dir_ + "/" + id + "/out");
  const fs::path p = fs::weakly_canonical(root / rel);
  const std::string rs = root.string(), ps = p.string();
  if (ps.compare(0, rs.size(), rs) != 0 || (ps.size() > rs.size() && ps[rs.size()] != '/'))
    throw JobError(400, "path", "the path leaves the job's output directory");
  if (!fs::is_regular_file(p)) throw JobError(404, "path", fmt::format("job '{}' has no file '{}'", id, rel));
  return ps;
}

std::map<std::string, int64_t> JobManager::counts() const {
  std::lock_guard<std::mutex> l(mu_);
  std::map<std::string, int64_t> c = {{"queued", 0}, {"running", 0}, {"done", 0}, {"failed", 0}, {"canceled", 0}};
  for (auto& [id, j] : jobs_) ++c[j->state];
  return c;
}

void JobManager::worker() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return shutdown_ || !queue_.empty(); });
      if (shutdown_) return;
      job = jobs_.at(queue_.front());
      queue_.pop_front();
      job->state = "running";
      job->started = now_ms();
      ++job->runs;
      job->cancel = false;
      save(*job);
    }
    append_log(*job, job->runs > 1 ? fmt::format("running (attempt {})", job->runs) : "running");
    std::string state, error;
    json result;
    try {
      run(*job);
      state = "done";
    } catch (const Stop& s) {
      state = s.user ? "canceled" : "interrupted";
    } catch (const std::exception& e) {
      state = "failed";
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      job->state = state;
      job->error = error;
      job->finished = now_ms();
      save(*job);
    }
    append_log(*job, state == "failed" ? "failed: " + error : state == "interrupted" ? "interrupted by shutdown (resumes at restart)" : state);
    if (shutdown_) return;
  }
}

void JobManager::run(Job& job) {
  const json& params = job.params;
  Params p{params};
  const std::string jdir = dir_ + "/" + job.id, out = jdir + "/out";
  PipelineIO io;
  io.poll = [this, &job] {
    if (job.cancel) throw Stop{true};
    if (shutdown_) throw Stop{false};
  };
  io.log = [this, &job](const std::string& s) { append_log(job, s); };
  io.progress = [this, &job](const std::string& label, int64_t done, int64_t total) {
    std::lock_guard<std::mutex> l(mu_);
    const bool new_label = job.progress.value("label", "") != label;
    job.progress = {{"label", label}, {"done", done}, {"total", total}};
    const int64_t t = now_ms();
    if (new_label || t - job.last_save > 1000 || done == total) {
      job.last_save = t;
      save(job);
    }
  };
  auto dataset = [&]() -> TraitDataset {
    if (fs::exists(jdir + "/dataset.json")) return TraitDataset::load(jdir + "/dataset.json");
    if (p.has("trait")) return TraitDataset::find(p.str("trait", ""));
    // steer-eval from an extract job: its dataset
    std::shared_ptr<Job> src;
    {
      std::lock_guard<std::mutex> l(mu_);
      src = find(p.str("from_job", ""));
    }
    if (fs::exists(dir_ + "/" + src->id + "/dataset.json")) return TraitDataset::load(dir_ + "/" + src->id + "/dataset.json");
    return TraitDataset::find(src->params.at("trait").get<std::string>());
  };
  auto make_judge = [&](const std::string& cache_dir) -> std::unique_ptr<Judge> {
    const json j = params.value("judge", json("self"));
    std::unique_ptr<Judge> judge;
    if (j.is_string() && j == "none") return nullptr;
    if (j.is_string()) {
      judge = std::make_unique<SelfJudge>(model_, *tok_, chat_, model_name_ + "@" + model_.config().identity_hash());
    } else {
      OpenAIJudgeOptions o;
      o.base_url = j.at("url");
      o.model = j.at("model");
      o.api_key = j.value("key", "");
      judge = std::make_unique<OpenAIJudge>(judge_options_from_env(o));
    }
    judge->min_mass = p.num("judge_min_mass", 0.25);
    judge->cache = std::make_shared<JudgeCache>(cache_dir + "/judge-cache.jsonl");
    return judge;
  };
  json result;
  if (job.kind == "extract") {
    const TraitDataset ds = dataset();
    ExtractOptions o;
    o.out = out;
    o.sites = p.str("sites", o.sites);
    o.positions = p.str("positions", o.positions);
    o.max_new_tokens = p.integer("max_new_tokens", o.max_new_tokens, 1);
    o.batch = p.integer("batch", o.batch, 1);
    o.temperature = p.num("temperature", 0);
    o.seed = p.integer("seed", 0);
    o.max_pairs = p.integer("max_pairs", 0);
    o.vet = p.flag("vet", true);
    o.pos_min = p.num("pos_min", ds.pos_min.value_or(50));
    o.neg_max = p.num("neg_max", ds.neg_max.value_or(50));
    o.coherence_min = p.num("coherence_min", ds.coherence_min.value_or(50));
    o.on_topic_min = p.num("on_topic_min", 0);
    o.coherence = p.str("coherence", "");
    o.test_fraction = p.num("test_fraction", o.test_fraction);
    o.split_seed = p.integer("split_seed", 0);
    o.probe_C = p.num("probe_C", 1.0);
    o.exclude_dims = p.ints("exclude_dims");
    o.stop_after = p.str("stop_after", "");
    auto judge = make_judge(out);
    TraitContext ctx{model_, *tok_, chat_, judge.get(), io};
    result = run_extract(ctx, ds, o);
  } else if (job.kind == "steer-eval") {
    const TraitDataset ds = dataset();
    SteerEvalOptions o;
    o.out = out;
    o.method = p.str("method", o.method);
    if (p.has("from_job")) {
      const std::string src = p.str("from_job", "");
      o.vectors = dir_ + "/" + src + "/out/" + ds.name + "/vectors/" + o.method + ".safetensors";
    } else if (p.has("vectors")) {
      if (vectors_dir_.empty()) bad("params.vectors", "this server has no --vectors directory");
      o.vectors = vectors_dir_ + "/" + p.str("vectors", "") + ".safetensors";
    }
    o.sites = p.str("sites", o.sites);
    o.mode = p.str("mode", o.mode);
    o.grid = p.nums("grid", o.grid);
    o.start = p.num("start", o.start);
    o.rule.grow = p.num("grow", o.rule.grow);
    o.rule.shrink = p.num("shrink", o.rule.shrink);
    o.rule.max_steps = static_cast<int>(p.integer("steps", o.rule.max_steps, 1));
    o.coherence_min = p.num("coherence_min", ds.coherence_min.value_or(70));
    o.on_topic_min = p.num("on_topic_min", 0);
    o.coherence = p.str("coherence", "");
    o.positions = p.str("positions", o.positions);
    o.max_new_tokens = p.integer("max_new_tokens", o.max_new_tokens, 1);
    o.max_questions = p.integer("max_questions", 0);
    o.temperature = p.num("temperature", 0);
    o.seed = p.integer("seed", 0);
    o.exclude_dims = p.ints("exclude_dims");
    auto judge = make_judge(out);
    TraitContext ctx{model_, *tok_, chat_, judge.get(), io};
    result = run_steer_eval(ctx, ds, o);
  } else if (job.kind == "project") {
    std::vector<ProjectionTarget> targets;
    const std::string sites = p.str("sites", "best");
    for (size_t i = 0; i < params["vectors"].size(); ++i) {
      const json& v = params["vectors"][i];
      std::string path;
      if (v.is_string()) {
        if (vectors_dir_.empty() || !safe_name(v.get<std::string>())) bad(fmt::format("params.vectors[{}]", i), "not a vector name of the server's --vectors directory");
        path = vectors_dir_ + "/" + v.get<std::string>() + ".safetensors";
      } else if (v.is_object() && v.contains("job")) {
        std::shared_ptr<Job> src;
        {
          std::lock_guard<std::mutex> l(mu_);
          src = find(v["job"].get<std::string>());
        }
        const std::string trait = v.value("trait", src->params.value("trait", ""));
        const std::string method = v.value("method", "probe");
        std::string tname = trait;
        if (tname.empty() && fs::exists(dir_ + "/" + src->id + "/dataset.json")) tname = TraitDataset::load(dir_ + "/" + src->id + "/dataset.json").name;
        const std::string base = src->kind == "extract" ? "/out/" : "/";
        path = dir_ + "/" + src->id + base + tname + "/vectors/" + method + ".safetensors";
      } else {
        bad(fmt::format("params.vectors[{}]", i), "expected a vector name or {\"job\": ID, \"method\"?}");
      }
      if (!fs::exists(path)) bad(fmt::format("params.vectors[{}]", i), "no such vector file (has the extract job finished?)");
      VectorFile vf = VectorFile::load(path);
      vf.check_model(model_.config(), path);
      for (auto& t : projection_targets(vf, path, sites, {})) targets.push_back(std::move(t));
    }
    std::string lines;
    for (auto& r : params["rollouts"]) lines += r.dump() + "\n";
    write_atomic(jdir + "/rollouts.jsonl", lines);
    const auto rs = load_rollouts(jdir + "/rollouts.jsonl", *tok_, chat_);
    ProjectOptions po{out + "/project", p.integer("batch", 4, 1)};
    result = project_rollouts(model_, *tok_, targets, rs, po, io);
  } else if (job.kind == "massive") {
    std::vector<std::vector<int32_t>> prompts;
    if (p.has("prompts")) {
      for (auto& x : params["prompts"]) {
        if (x.is_string()) prompts.push_back(tok_->encode(x.get<std::string>()));
        else if (x.is_object() && x.contains("text")) prompts.push_back(tok_->encode(x["text"].get<std::string>()));
        else if (x.is_object() && x.contains("messages")) {
          ChatOptions co;
          co.add_generation_prompt = false;
          prompts.push_back(render_chat(*tok_, chat_, parse_messages(x["messages"]), co).ids);
        } else bad("params.prompts", "each prompt is a text, {\"text\"} or {\"messages\"}");
      }
    } else {
      if (!tok_) bad("params.prompts", "this model has no tokenizer: give prompts");
      std::ifstream f(traits_dir() + "/neutral.jsonl");
      std::string line;
      while (std::getline(f, line))
        if (!line.empty()) prompts.push_back(tok_->encode(json::parse(line).at("text").get<std::string>()));
    }
    MassiveOptions mo;
    mo.ratio = p.num("ratio", mo.ratio);
    mo.persistent = p.num("persistent", mo.persistent);
    mo.top = p.integer("top", mo.top, 1);
    mo.batch = p.integer("batch", mo.batch, 1);
    json r = massive_activations(model_, prompts, mo, out + "/massive", io);
    result = {{"recommended_exclude", r["recommended_exclude"]}, {"tokens", r["tokens"]}, {"report", "massive/massive.json"}};
  }
  std::lock_guard<std::mutex> l(mu_);
  job.result = result;
}

}  // namespace kscope
