#include "server/server.hpp"

#include <httplib.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "interp/capture.hpp"
#include "interp/steer_spec.hpp"
#include "interp/vectors.hpp"
#include "server/jobs.hpp"
#include "store/activation_store.hpp"
#include "trait/dataset.hpp"
#include "util/error.hpp"

namespace kscope {
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// An error that becomes an HTTP response: {"error": {"message", "type", "param", "code"}}.
struct HttpError : std::runtime_error {
  int status;
  std::string param;
  HttpError(int s, std::string p, const std::string& m) : std::runtime_error(m), status(s), param(std::move(p)) {}
};

[[noreturn]] void bad(const std::string& param, const std::string& msg) { throw HttpError(400, param, param + ": " + msg); }

void send_error(httplib::Response& res, int status, const std::string& param, const std::string& msg) {
  const char* type = status == 401 ? "authentication_error" : status == 429 ? "rate_limit_error"
                     : status >= 500 ? "server_error" : "invalid_request_error";
  res.status = status;
  res.set_content(json({{"error", {{"message", msg}, {"type", type}, {"param", param.empty() ? json(nullptr) : json(param)}, {"code", status}}}}).dump(),
                  "application/json");
}

std::string new_id(const char* prefix) {
  static std::atomic<uint64_t> n{0};
  static const uint64_t salt = std::random_device{}();
  return fmt::format("{}-{:x}{:06x}", prefix, salt & 0xffffff, ++n);
}

int64_t now_s() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Field readers that name the field in their errors.
double num(const json& j, const char* k, double def, double lo, double hi) {
  if (!j.contains(k) || j[k].is_null()) return def;
  if (!j[k].is_number()) bad(k, "expected a number");
  const double v = j[k].get<double>();
  if (!(v >= lo && v <= hi)) bad(k, fmt::format("{} is outside [{}, {}]", v, lo, hi));
  return v;
}

// A request's stream of events, filled by the engine thread and drained by the HTTP thread.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<TokenEvent> events;
  std::optional<EngineResult> done;
  std::atomic<bool> cancelled{false};
};

}  // namespace

KscopeServer::KscopeServer(std::unique_ptr<Model> model, ServerOptions opts)
    : model_(std::move(model)), opts_(std::move(opts)), http_(std::make_unique<httplib::Server>()) {
  if (fs::exists(opts_.model_dir + "/tokenizer.json") || fs::exists(opts_.model_dir + "/tiktoken.model")) {
    tok_ = Tokenizer::load(opts_.model_dir);
    tok_->limit_ids(static_cast<int32_t>(model_->config().vocab_size));
    chat_ = default_chat_format(*tok_, opts_.model_dir);
  }
  engine_ = std::make_unique<Engine>(*model_, opts_.max_batch, opts_.max_queue);
  if (!opts_.jobs_dir.empty())
    jobs_ = std::make_unique<JobManager>(opts_.jobs_dir, *model_, tok_.get(), chat_, opts_.model_name, opts_.vectors_dir);
  http_->new_task_queue = [n = opts_.threads] { return new httplib::ThreadPool(n); };
  http_->set_payload_max_length(opts_.max_body_bytes);
  routes();
}

KscopeServer::~KscopeServer() {
  stop();
  jobs_.reset();  // interrupt a running job (it resumes at the next start) before the engine and model go
}

namespace {
// The process's open file descriptors, from /proc/self/fd.
std::vector<int> open_fds() {
  std::vector<int> out;
  for (const auto& e : fs::directory_iterator("/proc/self/fd")) {
    try {
      out.push_back(std::stoi(e.path().filename().string()));
    } catch (const std::exception&) {
    }
  }
  return out;
}

int port_of(const sockaddr_storage& a) {
  return a.ss_family == AF_INET ? ntohs(reinterpret_cast<const sockaddr_in*>(&a)->sin_port)
         : a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port) : -1;
}

// Debian's cpp-httplib is compiled with a listen backlog of 5, so a burst of connections (64 clients at once)
// overflows the accept queue and clients see reset connections. Linux lets listen() be called again on a
// listening socket to change its backlog: find ours by its bound port and raise it.
void raise_backlog(int port) {
  for (int fd : open_fds()) {
    int listening = 0;
    socklen_t len = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
    sockaddr_storage ss{};
    socklen_t sl = sizeof ss;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl) != 0) continue;
    if (port_of(ss) == port) ::listen(fd, SOMAXCONN);
  }
}
}  // namespace

namespace {
// cpp-httplib 0.11 gives a handler no socket, so a non-streaming handler cannot see its client leave. The
// connection is the socket whose local port is ours and whose peer is the request's remote address and port:
// find it once, then peek at it while waiting (a read of 0 bytes means the client closed it).
int client_socket(const std::string& addr, int remote_port, int local_port) {
  if (remote_port <= 0 || local_port <= 0) return -1;
  for (int fd : open_fds()) {
    sockaddr_storage local{}, peer{};
    socklen_t ll = sizeof local, pl = sizeof peer;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) != 0 || getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    if (port_of(local) != local_port || port_of(peer) != remote_port) continue;
    char text[INET6_ADDRSTRLEN] = {};
    const void* src = peer.ss_family == AF_INET ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(&peer)->sin_addr)
                                                : static_cast<const void*>(&reinterpret_cast<const sockaddr_in6*>(&peer)->sin6_addr);
    if (inet_ntop(peer.ss_family, src, text, sizeof text) && addr == text) return fd;
  }
  return -1;
}

bool client_gone(int fd) {
  if (fd < 0) return false;
  char c;
  const ssize_t n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}
}  // namespace

int KscopeServer::bind(const std::string& host, int port) {
  const int bound = port == 0 ? http_->bind_to_any_port(host) : (http_->bind_to_port(host, port) ? port : -1);
  if (bound > 0) raise_backlog(bound);
  port_ = bound;
  return bound;
}
void KscopeServer::serve() { http_->listen_after_bind(); }
void KscopeServer::stop() {
  if (http_) http_->stop();
}

void KscopeServer::routes() {
  auto& S = *http_;
  const auto& cfg = model_->config();

  // authentication, accounting and errors for every route
  S.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    ++requests_;
    if (opts_.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
    if (req.get_header_value("Authorization") != "Bearer " + opts_.api_key) {
      ++errors_;
      send_error(res, 401, "", "missing or wrong bearer token");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  S.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    ++errors_;
    try {
      std::rethrow_exception(ep);
    } catch (const HttpError& e) {
      send_error(res, e.status, e.param, e.what());
    } catch (const JobError& e) {
      send_error(res, e.status, e.field, e.what());
    } catch (const QueueFull& e) {
      send_error(res, 429, "", e.what());
    } catch (const Error& e) {
      send_error(res, e.kind() == ErrorKind::internal ? 500 : e.kind() == ErrorKind::resource ? 503 : 400, e.where(), e.what());
    } catch (const json::exception& e) {
      send_error(res, 400, "", std::string("malformed JSON: ") + e.what());
    } catch (const std::exception& e) {
      send_error(res, 500, "", e.what());
    }
  });
  S.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (res.body.empty()) send_error(res, res.status, "", fmt::format("{} {}: HTTP {}", req.method, req.path, res.status));
  });

  auto body = [](const httplib::Request& req) {
    json j;
    try {
      j = json::parse(req.body);
    } catch (const json::exception& e) {
      throw HttpError(400, "", std::string("body is not valid JSON: ") + e.what());
    }
    if (!j.is_object()) throw HttpError(400, "", "body must be a JSON object");
    return j;
  };
  auto need_tok = [this]() -> const Tokenizer& {
    if (!tok_) throw HttpError(400, "", "this model has no tokenizer: send token ids");
    return *tok_;
  };

  S.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const auto st = engine_->stats();
    res.set_content(json({{"status", "ok"}, {"model", opts_.model_name}, {"queued", st.queued}, {"active", st.active}}).dump(),
                    "application/json");
  });
  S.Get("/v1/models", [this, &cfg](const httplib::Request&, httplib::Response& res) {
    res.set_content(json({{"object", "list"},
                          {"data", {{{"id", opts_.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "kscope"},
                                     {"kscope", {{"identity", cfg.identity_hash()}, {"model_type", cfg.model_type},
                                                 {"layers", cfg.num_hidden_layers}, {"hidden_size", cfg.hidden_size},
                                                 {"vocab_size", cfg.vocab_size}, {"max_position_embeddings", cfg.max_position_embeddings}}}}}}})
                        .dump(),
                    "application/json");
  });
  S.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    const auto st = engine_->stats();
    std::string m;
    auto metric = [&](const char* name, const char* type, const char* help, double v) {
      m += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
    };
    metric("kscope_requests_total", "counter", "HTTP requests received", static_cast<double>(requests_.load()));
    metric("kscope_request_errors_total", "counter", "HTTP requests answered with an error", static_cast<double>(errors_.load()));
    metric("kscope_queue_length", "gauge", "generation requests waiting for a batch slot", static_cast<double>(st.queued));
    metric("kscope_batch_size", "gauge", "sequences in the running batch", static_cast<double>(st.active));
    metric("kscope_generations_completed_total", "counter", "generation requests finished", static_cast<double>(st.completed));
    metric("kscope_generations_cancelled_total", "counter", "generation requests cancelled", static_cast<double>(st.cancelled));
    metric("kscope_generated_tokens_total", "counter", "tokens generated", static_cast<double>(st.generated_tokens));
    metric("kscope_prompt_tokens_total", "counter", "prompt tokens processed", static_cast<double>(st.prompt_tokens));
    metric("kscope_engine_steps_total", "counter", "forward steps run", static_cast<double>(st.steps));
    metric("kscope_engine_busy_seconds_total", "counter", "seconds spent in forward steps", st.busy_seconds);
    metric("kscope_model_weight_bytes", "gauge", "bytes of weights as stored", static_cast<double>(model_->weights().store.total_bytes()));
    {
      long pages = 0, resident = 0;
      if (FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        std::fclose(f);
      }
      metric("kscope_process_resident_bytes", "gauge", "resident memory of the server process",
             static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)));
      const int64_t kv_free = model_->backend().kv_free_tokens(model_->config());
      if (kv_free != INT64_MAX) metric("kscope_kv_free_tokens", "gauge", "KV cache tokens the device can still hold", static_cast<double>(kv_free));
    }
    if (jobs_) {
      m += "# HELP kscope_jobs background jobs by state\n# TYPE kscope_jobs gauge\n";
      for (auto& [state, n] : jobs_->counts()) m += fmt::format("kscope_jobs{{state=\"{}\"}} {}\n", state, n);
    }
    res.set_content(m, "text/plain; version=0.0.4");
  });

  S.Post("/tokenize", [this, body, need_tok](const httplib::Request& req, httplib::Response& res) {
    const json j = body(req);
    const Tokenizer& t = need_tok();
    json out;
    std::vector<int32_t> ids;
    if (j.contains("messages")) {
      ChatOptions o;
      o.add_generation_prompt = j.value("add_generation_prompt", true);
      if (j.contains("tools")) o.tools = j["tools"];
      const auto r = render_chat(t, chat_, parse_messages(j["messages"]), o);
      ids = r.ids;
      json turns = json::array();
      for (const Turn& u : r.turns)
        turns.push_back({{"role", u.role}, {"start", u.start}, {"end", u.end}, {"content_start", u.content_start},
                         {"content_end", u.content_end}, {"think_start", u.think_start}, {"think_end", u.think_end}});
      out["turns"] = turns;
    } else if (j.contains("text") && j["text"].is_string()) {
      ids = t.encode(j["text"].get<std::string>(), j.value("parse_special", false));
    } else {
      bad("text", "send a string 'text' or a list of 'messages'");
    }
    json toks = json::array();
    for (int32_t id : ids) toks.push_back(t.token_display(id));
    out["ids"] = ids;
    out["tokens"] = toks;
    res.set_content(out.dump(), "application/json");
  });
  S.Post("/detokenize", [body, need_tok](const httplib::Request& req, httplib::Response& res) {
    const json j = body(req);
    if (!j.contains("ids") || !j["ids"].is_array()) bad("ids", "expected a list of token ids");
    std::vector<int32_t> ids;
    for (auto& x : j["ids"]) {
      if (!x.is_number_integer()) bad("ids", "expected integers");
      ids.push_back(x.get<int32_t>());
    }
    res.set_content(json({{"text", need_tok().decode(ids)}}).dump(), "application/json");
  });
  S.Post("/apply-template", [this, body, need_tok](const httplib::Request& req, httplib::Response& res) {
    const json j = body(req);
    if (!j.contains("messages")) bad("messages", "required");
    ChatOptions o;
    o.add_generation_prompt = j.value("add_generation_prompt", true);
    if (j.contains("tools")) o.tools = j["tools"];
    const auto r = render_chat(need_tok(), chat_, parse_messages(j["messages"]), o);
    res.set_content(json({{"text", need_tok().decode(r.ids)}, {"ids", r.ids}, {"chat_format", chat_format_name(chat_)}}).dump(),
                    "application/json");
  });

  // ------------------------------------------------------------------------------------ vectors
  auto check_name = [](const std::string& n, const char* field) {
    if (!std::regex_match(n, std::regex("[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")) || n.find("..") != std::string::npos)
      bad(field, "a name is 1-128 letters, digits, '_', '-' and '.'");
  };
  auto vec_dir = [this]() -> const std::string& {
    if (opts_.vectors_dir.empty()) throw HttpError(400, "", "this server has no vector directory (start it with --vectors DIR)");
    return opts_.vectors_dir;
  };
  S.Get("/vectors", [vec_dir](const httplib::Request&, httplib::Response& res) {
    json list = json::array();
    for (auto& e : fs::directory_iterator(vec_dir())) {
      if (e.path().extension() != ".safetensors") continue;
      try {
        const auto v = VectorFile::load(e.path().string());
        json sites = json::array();
        for (auto& [k, x] : v.vectors) sites.push_back(k);
        list.push_back({{"name", e.path().stem().string()}, {"sites", sites}, {"metadata", v.meta}});
      } catch (const Error&) {
        // not a vector file: not listed
      }
    }
    std::sort(list.begin(), list.end(), [](const json& a, const json& b) { return a["name"] < b["name"]; });
    res.set_content(json({{"vectors", list}}).dump(), "application/json");
  });
  S.Post("/vectors", [&cfg, body, check_name, vec_dir](const httplib::Request& req, httplib::Response& res) {
    const json j = body(req);
    if (!j.contains("name") || !j["name"].is_string()) bad("name", "required string");
    const std::string name = j["name"].get<std::string>();
    check_name(name, "name");
    if (!j.contains("vectors") || !j["vectors"].is_object() || j["vectors"].empty()) bad("vectors", "expected {site: [numbers]}");
    VectorFile v;
    for (auto it = j["vectors"].begin(); it != j["vectors"].end(); ++it) {
      const Site site = parse_site(it.key(), cfg.num_hidden_layers);
      const int64_t width = site.kind == SiteKind::logits ? cfg.vocab_size : cfg.hidden_size;
      if (!it->is_array() || static_cast<int64_t>(it->size()) != width)
        bad("vectors." + it.key(), fmt::format("expected {} numbers (the width of {})", width, site.str()));
      std::vector<float> f;
      for (auto& x : *it) {
        if (!x.is_number() || !std::isfinite(x.get<double>())) bad("vectors." + it.key(), "expected finite numbers");
        f.push_back(x.get<float>());
      }
      v.vectors[site.str()] = std::move(f);
    }
    if (j.contains("norms")) {
      if (!j["norms"].is_object()) bad("norms", "expected {site: mean norm}");
      for (auto& [k, x] : j["norms"].items()) {
        if (!x.is_number() || !(x.get<double>() > 0)) bad("norms." + k, "expected a positive number");
        v.norms[k] = x.get<double>();
      }
    }
    if (j.contains("metadata")) {
      if (!j["metadata"].is_object()) bad("metadata", "expected {key: string}");
      for (auto& [k, x] : j["metadata"].items()) {
        if (!x.is_string()) bad("metadata." + k, "expected a string");
        v.meta[k] = x.get<std::string>();
      }
    }
    v.meta["model_identity"] = cfg.identity_hash();
    const std::string path = vec_dir() + "/" + name + ".safetensors";
    const bool existed = fs::exists(path);
    v.save(path);
    res.status = existed ? 200 : 201;
    res.set_content(json({{"name", name}, {"sites", v.vectors.size()}, {"replaced", existed}}).dump(), "application/json");
  });
  S.Delete(R"(/vectors/([^/]+))", [check_name, vec_dir](const httplib::Request& req, httplib::Response& res) {
    const std::string name = req.matches[1];
    check_name(name, "name");
    const std::string path = vec_dir() + "/" + name + ".safetensors";
    if (!fs::exists(path)) throw HttpError(404, "name", "no vector named '" + name + "'");
    fs::remove(path);
    res.set_content(json({{"deleted", name}}).dump(), "application/json");
  });

  // ------------------------------------------------------------------------------------ capture
  // Replays given sequences (text, ids or messages, with an optional response) and returns the activations
  // inline, or writes them to an activation store under --stores.
  S.Post("/capture", [this, &cfg, body, check_name, need_tok](const httplib::Request& req, httplib::Response& res) {
    const json j = body(req);
    for (auto it = j.begin(); it != j.end(); ++it)
      if (it.key() != "sequences" && it.key() != "sites" && it.key() != "positions" && it.key() != "reduction" && it.key() != "store" && it.key() != "dtype")
        bad(it.key(), "unknown field (expected sequences, sites, positions, reduction, store, dtype)");
    if (!j.contains("sequences") || !j["sequences"].is_array() || j["sequences"].empty()) bad("sequences", "expected a non-empty list");
    if (!j.contains("sites") || !j["sites"].is_array() || j["sites"].empty()) bad("sites", "expected a list of sites");
    CaptureSpec spec;
    for (auto& s : j["sites"]) {
      if (!s.is_string()) bad("sites", "expected site names");
      spec.sites.push_back(parse_site(s.get<std::string>(), cfg.num_hidden_layers));
    }
    spec.positions = PositionSpec::parse(j.value("positions", "all"));
    spec.reduction = parse_reduction(j.value("reduction", "none"));
    std::vector<CaptureRequest> reqs;
    for (size_t i = 0; i < j["sequences"].size(); ++i) {
      const json& q = j["sequences"][i];
      const std::string w = fmt::format("sequences[{}]", i);
      CaptureRequest r;
      auto ids_of = [&](const json& x, const std::string& field) {
        std::vector<int32_t> ids;
        if (x.is_string()) return need_tok().encode(x.get<std::string>());
        if (!x.is_array()) bad(w + "." + field, "expected text or token ids");
        for (auto& t : x) {
          if (!t.is_number_integer()) bad(w + "." + field, "expected integers");
          ids.push_back(t.get<int32_t>());
        }
        return ids;
      };
      if (q.is_string()) r.prompt = need_tok().encode(q.get<std::string>());
      else if (q.is_object() && q.contains("messages")) {
        ChatOptions o;
        o.add_generation_prompt = !q.contains("response");
        const auto rc = render_chat(need_tok(), chat_, parse_messages(q["messages"]), o);
        r.prompt = rc.ids;
        r.turns = rc.turns;
      } else if (q.is_object() && q.contains("text")) r.prompt = ids_of(q["text"], "text");
      else if (q.is_object() && q.contains("ids")) r.prompt = ids_of(q["ids"], "ids");
      else bad(w, "expected text, {text|ids|messages, response?}");
      if (q.is_object() && q.contains("response")) r.response = ids_of(q["response"], "response");
      if (r.prompt.empty()) bad(w, "empty");
      reqs.push_back(std::move(r));
    }
    std::lock_guard<std::mutex> lk(capture_mu_);
    if (j.contains("store")) {
      if (opts_.stores_dir.empty()) bad("store", "this server has no store directory (start it with --stores DIR)");
      const std::string name = j["store"].get<std::string>();
      check_name(name, "store");
      StoreConfig sc;
      sc.model_identity = cfg.identity_hash();
      sc.model_type = cfg.model_type;
      sc.model_path = opts_.model_dir;
      for (auto& s : spec.sites) sc.sites.push_back(s.str());
      sc.positions = spec.positions.text();
      sc.reduction = j.value("reduction", "none");
      sc.dtype = j.value("dtype", "float32");
      sc.d_model = cfg.hidden_size;
      sc.source = "POST /capture";
      sc.source_hash = fmt::format("{:016x}", fnv1a64(req.body.data(), req.body.size()));
      StoreWriter w(opts_.stores_dir + "/" + name, sc);
      capture_to_store(*model_, reqs, spec, w, 16);
      res.set_content(json({{"store", name}, {"sequences", reqs.size()}, {"shards", w.manifest()["shards"].size()}}).dump(), "application/json");
      return;
    }
    int64_t values = 0;
    for (auto& r : reqs) values += static_cast<int64_t>(r.prompt.size() + r.response.size()) * cfg.hidden_size * spec.sites.size();
    if (values > (16 << 20)) bad("sequences", "too large to return inline: name a 'store' (and start the server with --stores)");
    const auto caps = run_capture(*model_, reqs, spec);
    json out = json::array();
    for (const auto& c : caps) {
      json sites = json::object();
      for (auto& [site, rows] : c.rows) {
        const int64_t w = c.width.at(site);
        json m = json::array();
        for (size_t i = 0; i * w < rows.size(); ++i) m.push_back(std::vector<float>(rows.begin() + i * w, rows.begin() + (i + 1) * w));
        sites[site] = m;
      }
      json o = {{"positions", c.positions}, {"tokens", c.tokens}, {"sites", sites}};
      for (auto& [site, ids] : c.router_ids) o["router"][site] = {{"experts", ids}, {"weights", c.router_weights.at(site)}};
      out.push_back(o);
    }
    res.set_content(json({{"sequences", out}}).dump(), "application/json");
  });

  // ---------------------------------------------------------------------------------- research jobs
  auto need_jobs = [this]() -> JobManager& {
    if (!jobs_) throw HttpError(400, "", "this server runs no jobs: start it with --jobs DIR");
    return *jobs_;
  };
  auto send_json = [](httplib::Response& res, const json& j, int status = 200) {
    res.status = status;
    res.set_content(j.dump(), "application/json");
  };
  S.Get("/traits", [send_json](const httplib::Request&, httplib::Response& res) {
    json out = json::array();
    for (auto& n : shipped_traits()) out.push_back(TraitDataset::load(traits_dir() + "/" + n + ".json").describe());
    send_json(res, {{"traits", out}});
  });
  S.Post("/jobs", [body, need_jobs, send_json](const httplib::Request& req, httplib::Response& res) {
    send_json(res, need_jobs().submit(body(req)), 202);
  });
  S.Get("/jobs", [need_jobs, send_json](const httplib::Request&, httplib::Response& res) { send_json(res, need_jobs().list()); });
  S.Get(R"(/jobs/([^/]+))", [need_jobs, send_json](const httplib::Request& req, httplib::Response& res) {
    send_json(res, need_jobs().get(req.matches[1]));
  });
  S.Get(R"(/jobs/([^/]+)/log)", [need_jobs](const httplib::Request& req, httplib::Response& res) {
    res.set_content(need_jobs().log(req.matches[1]), "text/plain");
  });
  S.Post(R"(/jobs/([^/]+)/cancel)", [need_jobs, send_json](const httplib::Request& req, httplib::Response& res) {
    send_json(res, need_jobs().cancel(req.matches[1]));
  });
  S.Delete(R"(/jobs/([^/]+))", [need_jobs, send_json](const httplib::Request& req, httplib::Response& res) {
    need_jobs().remove(req.matches[1]);
    send_json(res, {{"id", std::string(req.matches[1])}, {"deleted", true}});
  });
  S.Get(R"(/jobs/([^/]+)/files)", [need_jobs, send_json](const httplib::Request& req, httplib::Response& res) {
    send_json(res, need_jobs().files(req.matches[1]));
  });
  S.Get(R"(/jobs/([^/]+)/files/(.+))", [need_jobs](const httplib::Request& req, httplib::Response& res) {
    const std::string path = need_jobs().file_path(req.matches[1], req.matches[2]);
    const std::string ext = fs::path(path).extension().string();
    const char* type = ext == ".json" ? "application/json" : ext == ".svg" ? "image/svg+xml"
                       : ext == ".md" || ext == ".txt" ? "text/plain" : ext == ".jsonl" ? "application/jsonl" : "application/octet-stream";
    std::ifstream f(path, std::ios::binary);
    std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    res.set_content(data, type);
  });

  // ---------------------------------------------------------------------------------- generation
  // Builds an engine request from an OpenAI body (completions or chat), validating every field.
  struct Gen {
    EngineRequest req;
    std::vector<std::string> stops;
    bool stream = false, chat = false, include_usage = false;
    int logprobs = -1;  // completions: top-n count; chat: 0 when logprobs requested
    bool want_logprobs = false;
  };
  auto build = [this, &cfg, need_tok](const json& j, bool chat) {
    static const std::set<std::string> common = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                                                 "stream_options", "n", "user", "presence_penalty", "frequency_penalty",
                                                 "logprobs", "top_logprobs", "kscope", "ignore_eos", "stop_token_ids"};
    static const std::set<std::string> chat_only = {"messages", "tools", "tool_choice", "max_completion_tokens", "parallel_tool_calls"};
    static const std::set<std::string> comp_only = {"prompt", "echo", "suffix", "best_of"};
    for (auto it = j.begin(); it != j.end(); ++it) {
      const auto& k = it.key();
      if (!common.count(k) && !(chat ? chat_only : comp_only).count(k)) bad(k, "unknown field");
    }
    Gen g;
    g.chat = chat;
    if (j.contains("model") && j["model"].is_string() && j["model"] != opts_.model_name)
      throw HttpError(404, "model", fmt::format("model: '{}' is not served here (this server serves '{}')", j["model"].get<std::string>(), opts_.model_name));
    if (num(j, "n", 1, 1, 1) != 1) bad("n", "only n = 1 is supported");
    for (const char* k : {"presence_penalty", "frequency_penalty"})
      if (num(j, k, 0, -2, 2) != 0) bad(k, "penalties are not supported (send 0)");
    if (!chat && j.value("echo", false)) bad("echo", "not supported");
    if (!chat && j.contains("suffix") && !j["suffix"].is_null()) bad("suffix", "not supported");
    EngineRequest& r = g.req;
    const double maxt = chat && j.contains("max_completion_tokens") ? num(j, "max_completion_tokens", 16, 1, 1e9)
                                                                     : num(j, "max_tokens", chat ? 1024 : 16, 1, 1e9);
    r.max_new_tokens = static_cast<int64_t>(maxt);
    r.sampling.temperature = num(j, "temperature", 1.0, 0, 2);
    r.sampling.top_p = num(j, "top_p", 1.0, 1e-9, 1);
    r.sampling.top_k = static_cast<int64_t>(num(j, "top_k", 0, 0, 1e9));
    r.sampling.seed = j.contains("seed") ? static_cast<uint64_t>(num(j, "seed", 0, 0, 1.8e19)) : std::random_device{}();
    r.ignore_eos = j.value("ignore_eos", false);
    if (j.contains("stop") && !j["stop"].is_null()) {
      if (j["stop"].is_string()) g.stops.push_back(j["stop"].get<std::string>());
      else if (j["stop"].is_array()) {
        for (auto& s : j["stop"]) {
          if (!s.is_string() || s.get<std::string>().empty()) bad("stop", "expected non-empty strings");
          g.stops.push_back(s.get<std::string>());
        }
      } else bad("stop", "expected a string or a list of strings");
      if (g.stops.size() > 16) bad("stop", "at most 16 stop sequences");
    }
    if (j.contains("stop_token_ids")) {
      if (!j["stop_token_ids"].is_array()) bad("stop_token_ids", "expected a list of token ids");
      for (auto& x : j["stop_token_ids"]) {
        if (!x.is_number_integer()) bad("stop_token_ids", "expected integers");
        r.stop_tokens.push_back(x.get<int32_t>());
      }
    }
    g.stream = j.value("stream", false);
    if (j.contains("stream_options") && j["stream_options"].is_object()) g.include_usage = j["stream_options"].value("include_usage", false);
    if (chat) {
      if (j.contains("logprobs") && !j["logprobs"].is_boolean()) bad("logprobs", "expected true or false");
      g.want_logprobs = j.value("logprobs", false);
      r.top_logprobs = static_cast<int>(num(j, "top_logprobs", 0, 0, 20));
      if (r.top_logprobs > 0 && !g.want_logprobs) bad("top_logprobs", "needs logprobs: true");
      if (!j.contains("messages")) bad("messages", "required");
      ChatOptions o;
      if (j.contains("tools")) o.tools = j["tools"];
      const auto rc = render_chat(need_tok(), chat_, parse_messages(j["messages"]), o);
      r.prompt = rc.ids;
      r.layout.turns = rc.turns;
    } else {
      g.logprobs = static_cast<int>(num(j, "logprobs", -1, -1, 20));
      g.want_logprobs = g.logprobs >= 0;
      r.top_logprobs = std::max(0, g.logprobs);
      if (!j.contains("prompt")) bad("prompt", "required");
      const json& p = j["prompt"];
      if (p.is_string()) r.prompt = need_tok().encode(p.get<std::string>());
      else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
        for (auto& x : p) {
          if (!x.is_number_integer()) bad("prompt", "a token-id prompt must hold integers only");
          r.prompt.push_back(x.get<int32_t>());
        }
      } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
        r.prompt = need_tok().encode(p[0].get<std::string>());
      } else bad("prompt", "expected a string, one-string list, or a list of token ids (batches: send one request each)");
    }
    // the kscope extension: {"interventions": [...], "capture": {"sites", "positions", "reduction"}}
    if (j.contains("kscope")) {
      const json& k = j["kscope"];
      if (!k.is_object()) bad("kscope", "expected an object {interventions, capture}");
      for (auto it = k.begin(); it != k.end(); ++it)
        if (it.key() != "interventions" && it.key() != "capture") bad("kscope." + it.key(), "unknown field (expected interventions, capture)");
      if (k.contains("interventions")) {
        if (!k["interventions"].is_array()) bad("kscope.interventions", "expected a list");
        VectorCache vc(cfg);
        for (size_t i = 0; i < k["interventions"].size(); ++i) {
          json iv = k["interventions"][i];
          const std::string where = fmt::format("kscope.interventions[{}]", i);
          if (iv.is_object() && iv.contains("vector") && iv["vector"].is_string()) {
            // vectors by name from the server's vector directory, never by arbitrary path
            const std::string name = iv["vector"].get<std::string>();
            if (!std::regex_match(name, std::regex("[A-Za-z0-9_.-]{1,128}")) || name.find("..") != std::string::npos)
              bad(where + ".vector", "a vector name is letters, digits, '_', '-' and '.'");
            if (opts_.vectors_dir.empty()) bad(where + ".vector", "this server has no vector directory (--vectors): send the vector inline");
            const std::string path = opts_.vectors_dir + "/" + name + (name.size() > 12 && name.substr(name.size() - 12) == ".safetensors" ? "" : ".safetensors");
            if (!fs::exists(path)) bad(where + ".vector", "no vector named '" + name + "'");
            iv["vector"] = path;
          }
          r.interventions.push_back(intervention_from_json(iv, cfg, vc, where));
        }
      }
      if (k.contains("capture")) {
        const json& c = k["capture"];
        if (!c.is_object() || !c.contains("sites") || !c["sites"].is_array()) bad("kscope.capture.sites", "expected a list of sites");
        CaptureSpec spec;
        for (auto& s : c["sites"]) {
          if (!s.is_string()) bad("kscope.capture.sites", "expected site names");
          spec.sites.push_back(parse_site(s.get<std::string>(), cfg.num_hidden_layers));
        }
        if (spec.sites.size() > 64) bad("kscope.capture.sites", "at most 64 sites inline");
        spec.positions = PositionSpec::parse(c.value("positions", "response"));
        spec.reduction = parse_reduction(c.value("reduction", "mean"));
        r.capture = spec;
      }
    }
    return g;
  };

  // Runs a request to the end (non-streaming): records each token's alternatives, stops at a stop string as the
  // decoded text grows, and cancels past the timeout.
  using Tops = std::vector<std::vector<std::pair<int32_t, float>>>;
  auto run_blocking = [this](Gen g, Tops& tops, const httplib::Request& http_req) {
    auto ch = std::make_shared<Channel>();
    auto rec = std::make_shared<Tops>();
    auto sd = tok_ ? std::make_shared<StreamDecoder>(*tok_) : nullptr;
    auto acc = std::make_shared<std::string>();
    g.req.on_token = [rec, stops = g.stops, sd, acc](const TokenEvent& e) {
      rec->push_back(e.top);
      if (sd && !stops.empty()) {
        *acc += sd->push(e.token);
        for (auto& st : stops)
          if (acc->find(st) != std::string::npos) return false;
      }
      return true;
    };
    g.req.on_done = [ch](EngineResult r) {
      std::lock_guard<std::mutex> lk(ch->mu);
      ch->done = std::move(r);
      ch->cv.notify_all();
    };
    const uint64_t id = engine_->submit(std::move(g.req));
    const int fd = client_socket(http_req.remote_addr, http_req.remote_port, port_);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(opts_.request_timeout_s);
    std::unique_lock<std::mutex> lk(ch->mu);
    for (;;) {
      if (ch->cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return ch->done.has_value(); })) break;
      if (client_gone(fd)) {  // nobody to answer: stop generating for them
        engine_->cancel(id);
        ch->cv.wait(lk, [&] { return ch->done.has_value(); });
        throw HttpError(499, "", "the client closed the connection; the generation was cancelled");
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        engine_->cancel(id);
        ch->cv.wait(lk, [&] { return ch->done.has_value(); });
        throw HttpError(504, "", fmt::format("the request took longer than {} s and was cancelled", opts_.request_timeout_s));
      }
    }
    tops = *rec;
    return *ch->done;
  };

  // Text of a finished request with stop sequences applied; finish_reason "stop" when one matched.
  auto final_text = [this](const Gen& g, const EngineResult& r, std::string& finish) {
    finish = r.finish_reason == "cancelled" && !g.stops.empty() ? "stop" : r.finish_reason;
    if (!tok_) return std::string();
    std::string t = tok_->decode(r.tokens);
    size_t cut = std::string::npos;
    for (auto& s : g.stops) cut = std::min(cut, t.find(s));
    if (cut != std::string::npos) {
      t = t.substr(0, cut);
      finish = "stop";
    }
    if (finish.rfind("error", 0) == 0) throw HttpError(500, "", r.finish_reason);
    return t;
  };
  auto logprobs_json = [this](const Gen& g, const EngineResult& r, const std::vector<std::vector<std::pair<int32_t, float>>>& tops) {
    auto str = [&](int32_t id) { return tok_ ? tok_->token_display(id) : std::to_string(id); };
    if (g.chat) {
      json content = json::array();
      for (size_t i = 0; i < r.tokens.size(); ++i) {
        json top = json::array();
        if (i < tops.size())
          for (auto& [id, lp] : tops[i]) top.push_back({{"token", str(id)}, {"logprob", lp}, {"id", id}});
        content.push_back({{"token", str(r.tokens[i])}, {"logprob", r.logprobs[i]}, {"id", r.tokens[i]}, {"top_logprobs", top}});
      }
      return json({{"content", content}});
    }
    json toks = json::array(), lps = json::array(), top = json::array();
    for (size_t i = 0; i < r.tokens.size(); ++i) {
      toks.push_back(str(r.tokens[i]));
      lps.push_back(r.logprobs[i]);
      json t = json::object();
      if (i < tops.size())
        for (auto& [id, lp] : tops[i]) t[str(id)] = lp;
      top.push_back(t);
    }
    return json({{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", top}});
  };
  auto capture_json = [](const EngineResult& r) -> json {
    if (!r.capture) return nullptr;
    json c = {{"positions", r.capture->positions}, {"sites", json::object()}};
    for (auto& [site, rows] : r.capture->rows) {
      const int64_t w = r.capture->width.at(site);
      json m = json::array();
      for (size_t i = 0; i * w < rows.size(); ++i) m.push_back(std::vector<float>(rows.begin() + i * w, rows.begin() + (i + 1) * w));
      c["sites"][site] = m;
    }
    for (auto& [site, ids] : r.capture->router_ids) c["router"][site] = {{"experts", ids}, {"weights", r.capture->router_weights.at(site)}};
    return c;
  };

  auto handle = [this, body, build, run_blocking, final_text, logprobs_json, capture_json](bool chat) {
    return [=, this](const httplib::Request& req, httplib::Response& res) {
      Gen g = build(body(req), chat);
      const std::string id = new_id(chat ? "chatcmpl" : "cmpl");
      const int64_t created = now_s();
      const int64_t prompt_tokens = static_cast<int64_t>(g.req.prompt.size());
      if (!g.stream) {
        Tops tops;
        const EngineResult r = run_blocking(g, tops, req);
        std::string finish;
        const std::string text = final_text(g, r, finish);
        json choice = {{"index", 0}, {"finish_reason", finish}};
        if (chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
        else choice["text"] = text;
        choice["logprobs"] = g.want_logprobs ? logprobs_json(g, r, tops) : json(nullptr);
        json out = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"}, {"created", created},
                    {"model", opts_.model_name}, {"choices", {choice}},
                    {"usage", {{"prompt_tokens", prompt_tokens}, {"completion_tokens", r.tokens.size()},
                               {"total_tokens", prompt_tokens + static_cast<int64_t>(r.tokens.size())}}}};
        out["choices"][0]["token_ids"] = r.tokens;
        if (r.capture) out["kscope"] = {{"capture", capture_json(r)}};
        res.set_content(out.dump(), "application/json");
        return;
      }
      // streaming: server-sent events, one chunk per piece of text; a closed connection cancels the request
      if (!tok_) throw HttpError(400, "stream", "streaming needs the model's tokenizer");
      auto ch = std::make_shared<Channel>();
      auto stops = g.stops;
      g.req.on_token = [ch](const TokenEvent& e) {
        if (ch->cancelled) return false;
        std::lock_guard<std::mutex> lk(ch->mu);
        ch->events.push_back(e);
        ch->cv.notify_all();
        return true;
      };
      g.req.on_done = [ch](EngineResult r) {
        std::lock_guard<std::mutex> lk(ch->mu);
        ch->done = std::move(r);
        ch->cv.notify_all();
      };
      const uint64_t eid = engine_->submit(std::move(g.req));
      auto sd = std::make_shared<StreamDecoder>(*tok_);
      auto sent = std::make_shared<std::string>();   // text sent so far
      auto held = std::make_shared<std::string>();   // text held back while it could start a stop sequence
      auto first = std::make_shared<bool>(true);
      auto finished = std::make_shared<bool>(false);
      const bool chat_ = chat, want_lp = g.want_logprobs, usage = g.include_usage;
      const double timeout = opts_.request_timeout_s;
      const auto t_start = std::chrono::steady_clock::now();
      Engine* engine = engine_.get();
      const std::string model_name = opts_.model_name;
      const Tokenizer* tk = tok_.get();
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider("text/event-stream", [=](size_t, httplib::DataSink& sink) {
        auto chunk = [&](const json& delta_or_text, const json& finish, const json& lp) {
          json c = {{"id", id}, {"object", chat_ ? "chat.completion.chunk" : "text_completion"}, {"created", created}, {"model", model_name}};
          json choice = {{"index", 0}, {"finish_reason", finish}};
          if (chat_) choice["delta"] = delta_or_text;
          else choice["text"] = delta_or_text;
          choice["logprobs"] = lp;
          c["choices"] = {choice};
          const std::string s = "data: " + c.dump() + "\n\n";
          return sink.write(s.data(), s.size());
        };
        if (*finished) return false;
        if (*first && chat_) {
          *first = false;
          if (!chunk({{"role", "assistant"}, {"content", ""}}, nullptr, nullptr)) {
            ch->cancelled = true;
            engine->cancel(eid);
            return false;
          }
        }
        std::deque<TokenEvent> evs;
        std::optional<EngineResult> done;
        {
          std::unique_lock<std::mutex> lk(ch->mu);
          ch->cv.wait_for(lk, std::chrono::milliseconds(200), [&] { return !ch->events.empty() || ch->done.has_value(); });
          evs.swap(ch->events);
          if (ch->events.empty() && ch->done) done = ch->done;
        }
        if (!sink.is_writable()) {  // the client went away: stop generating for it
          ch->cancelled = true;
          engine->cancel(eid);
          return false;
        }
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count() > timeout) {
          ch->cancelled = true;
          engine->cancel(eid);
        }
        std::string stop_hit;
        for (const TokenEvent& e : evs) {
          *held += sd->push(e.token);
          // emit what can no longer be the start of a stop sequence
          size_t cut = std::string::npos;
          for (auto& s : stops) cut = std::min(cut, held->find(s));
          if (cut != std::string::npos) {
            held->resize(cut);
            stop_hit = "stop";
          }
          size_t keep = 0;
          if (stop_hit.empty())
            for (auto& s : stops)
              for (size_t k = std::min(s.size() - 1, held->size()); k > 0; --k)
                if (held->compare(held->size() - k, k, s, 0, k) == 0) {
                  keep = std::max(keep, k);
                  break;
                }
          const size_t emit = held->size() - keep;
          json lp = nullptr;
          if (want_lp) {
            json top = json::array();
            for (auto& [tid, l] : e.top) top.push_back({{"token", tk->token_display(tid)}, {"logprob", l}, {"id", tid}});
            lp = chat_ ? json({{"content", {{{"token", tk->token_display(e.token)}, {"logprob", e.logprob}, {"id", e.token}, {"top_logprobs", top}}}}})
                       : json({{"tokens", {tk->token_display(e.token)}}, {"token_logprobs", {e.logprob}}});
          }
          const std::string piece = held->substr(0, emit);
          held->erase(0, emit);
          *sent += piece;
          if (!chunk(chat_ ? json({{"content", piece}}) : json(piece), nullptr, lp)) {
            ch->cancelled = true;
            engine->cancel(eid);
            return false;
          }
          if (!stop_hit.empty()) {
            ch->cancelled = true;
            engine->cancel(eid);
            break;
          }
        }
        if (!stop_hit.empty() || done) {
          // wait for the engine to let go of the request, then close the stream
          EngineResult r;
          {
            std::unique_lock<std::mutex> lk(ch->mu);
            ch->cv.wait(lk, [&] { return ch->done.has_value(); });
            r = *ch->done;
          }
          std::string finish = !stop_hit.empty() ? "stop" : r.finish_reason;
          const std::string rest = *held + sd->finish();
          if (stop_hit.empty() && !rest.empty()) chunk(chat_ ? json({{"content", rest}}) : json(rest), nullptr, nullptr);
          chunk(chat_ ? json::object() : json(""), finish, nullptr);
          if (usage) {
            json u = {{"id", id}, {"object", chat_ ? "chat.completion.chunk" : "text_completion"}, {"created", created},
                      {"model", model_name}, {"choices", json::array()},
                      {"usage", {{"prompt_tokens", prompt_tokens}, {"completion_tokens", r.tokens.size()},
                                 {"total_tokens", prompt_tokens + static_cast<int64_t>(r.tokens.size())}}}};
            const std::string s = "data: " + u.dump() + "\n\n";
            sink.write(s.data(), s.size());
          }
          const std::string end = "data: [DONE]\n\n";
          sink.write(end.data(), end.size());
          *finished = true;
          sink.done();
        }
        return true;
      });
    };
  };
  S.Post("/v1/completions", handle(false));
  S.Post("/v1/chat/completions", handle(true));
}

}  // namespace kscope
