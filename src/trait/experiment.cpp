#include "trait/experiment.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "runtime/sampler.hpp"
#include "store/activation_store.hpp"
#include "util/error.hpp"
#include "util/numeric.hpp"

namespace kscope {
using json = nlohmann::json;
namespace fs = std::filesystem;

void write_atomic(const std::string& path, const std::string& text) {
  if (auto parent = fs::path(path).parent_path(); !parent.empty()) fs::create_directories(parent);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    f.flush();
    if (!f) fail(ErrorKind::io, tmp, "write failed");
  }
  const int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(ErrorKind::io, path, "cannot rename {} into place: {}", tmp, ec.message());
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::io, path, "cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string hash_json(const json& j) {
  const std::string s = j.dump();
  return fmt::format("{:016x}", fnv1a64(s.data(), s.size()));
}

// ---- JSONL log ----

JsonlLog::JsonlLog(std::string path) : path_(std::move(path)) {
  if (auto parent = fs::path(path_).parent_path(); !parent.empty()) fs::create_directories(parent);
  if (!fs::exists(path_)) return;
  const std::string text = read_file(path_);
  size_t good = 0;  // bytes of complete, parseable lines
  for (size_t i = 0; i < text.size();) {
    const size_t nl = text.find('\n', i);
    if (nl == std::string::npos) break;  // a torn last line
    try {
      lines_.push_back(json::parse(text.substr(i, nl - i)));
    } catch (const std::exception& e) {
      fail(ErrorKind::format, path_, "line {} is not JSON ({}); the log is damaged", lines_.size() + 1, e.what());
    }
    i = good = nl + 1;
  }
  if (good < text.size()) fs::resize_file(path_, good);  // cut the torn line so appends start clean
}

void JsonlLog::append(const json& j) { append_all({j}); }

void JsonlLog::append_all(const std::vector<json>& js) {
  if (js.empty()) return;
  std::string s;
  for (auto& j : js) s += j.dump() + "\n";
  const int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) fail(ErrorKind::io, path_, "cannot open for appending");
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t w = ::write(fd, s.data() + off, s.size() - off);
    if (w <= 0) {
      ::close(fd);
      fail(ErrorKind::io, path_, "append failed");
    }
    off += w;
  }
  ::fsync(fd);
  ::close(fd);
  lines_.insert(lines_.end(), js.begin(), js.end());
}

void JsonlLog::clear() {
  std::ofstream(path_, std::ios::trunc);
  lines_.clear();
}

// ---- stages ----

StageLog::StageLog(std::string dir) : path_(dir + "/stages.json") {
  fs::create_directories(dir);
  if (fs::exists(path_)) {
    try {
      j_ = json::parse(read_file(path_));
    } catch (const std::exception& e) {
      fail(ErrorKind::format, path_, "not valid JSON: {}", e.what());
    }
  }
  if (!j_.is_object()) j_ = json::object();
}

bool StageLog::up_to_date(const std::string& stage, const std::string& inputs) const {
  return j_.contains(stage) && j_[stage].value("inputs", "") == inputs && j_[stage].value("done", false);
}

std::string StageLog::started(const std::string& stage) const { return j_.contains(stage) ? j_[stage].value("inputs", "") : ""; }

void StageLog::start(const std::string& stage, const std::string& inputs) {
  j_[stage] = {{"inputs", inputs}, {"done", false}};
  save();
}

void StageLog::finish(const std::string& stage, const std::string& inputs, const json& summary) {
  j_[stage] = {{"inputs", inputs}, {"done", true}, {"summary", summary}};
  save();
}

json StageLog::summary(const std::string& stage) const {
  return j_.contains(stage) ? j_[stage].value("summary", json::object()) : json::object();
}

void StageLog::save() const { write_atomic(path_, j_.dump(2) + "\n"); }

// ---- layers and sites ----

std::vector<int64_t> parse_layers(const std::string& spec, int64_t L) {
  std::set<int64_t> out;
  auto layer_of = [&](std::string t, const std::string& part) -> int64_t {
    const bool pct = !t.empty() && t.back() == '%';
    if (pct) t.pop_back();
    double v;
    try {
      size_t used = 0;
      v = std::stod(t, &used);
      if (used != t.size()) throw std::invalid_argument("trailing");
    } catch (...) {
      fail(ErrorKind::input, "--layers", "'{}' is not a layer, a percentage or a range (e.g. 12, 30%-60%, 10-20, all)", part);
    }
    const int64_t l = pct ? static_cast<int64_t>(std::llround(v / 100.0 * (L - 1))) : static_cast<int64_t>(v);
    if (!pct && v != std::floor(v)) fail(ErrorKind::input, "--layers", "'{}': a layer number is an integer", part);
    if (l < 0 || l >= L) fail(ErrorKind::input, "--layers", "'{}' is outside the model's layers 0..{}", part, L - 1);
    return l;
  };
  std::stringstream ss(spec);
  std::string part;
  while (std::getline(ss, part, ',')) {
    part.erase(0, part.find_first_not_of(' '));
    part.erase(part.find_last_not_of(' ') + 1);
    if (part.empty()) continue;
    if (part == "all") {
      for (int64_t l = 0; l < L; ++l) out.insert(l);
      continue;
    }
    const size_t dash = part.find('-', 1);
    if (dash != std::string::npos) {
      const int64_t a = layer_of(part.substr(0, dash), part), b = layer_of(part.substr(dash + 1), part);
      if (b < a) fail(ErrorKind::input, "--layers", "'{}': the range is empty", part);
      for (int64_t l = a; l <= b; ++l) out.insert(l);
    } else {
      out.insert(layer_of(part, part));
    }
  }
  if (out.empty()) fail(ErrorKind::input, "--layers", "no layers in '{}'", spec);
  return {out.begin(), out.end()};
}

std::vector<Site> parse_site_list(const std::string& spec, const ModelConfig& cfg, const std::string& kind) {
  const int64_t L = cfg.num_hidden_layers;
  std::vector<Site> out;
  std::string layer_part;
  std::stringstream ss(spec);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty()) continue;
    if (part.rfind("*.", 0) == 0) {
      for (int64_t l = 0; l < L; ++l) out.push_back(parse_site(std::to_string(l) + part.substr(1), L));
    } else if (part.find('.') != std::string::npos || part == "embed" || part == "final_norm") {
      out.push_back(parse_site(part, L));
    } else {
      layer_part += (layer_part.empty() ? "" : ",") + part;
    }
  }
  if (!layer_part.empty())
    for (int64_t l : parse_layers(layer_part, L)) out.push_back(parse_site(std::to_string(l) + "." + kind, L));
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  if (out.empty()) fail(ErrorKind::input, "--sites", "no sites in '{}'", spec);
  return out;
}

std::vector<int32_t> render_prompt(const Tokenizer& tok, ChatFormat chat, const std::string& style, const std::string& system,
                                   const std::string& text) {
  if (style == "document") return tok.encode(system.empty() ? text : system + text);
  std::vector<ChatMessage> m;
  if (!system.empty()) m.push_back({"system", system, "", {}, "", ""});
  m.push_back({"user", text, "", {}, "", ""});
  return render_chat(tok, chat, m).ids;
}

std::vector<double> mean_logliks(Model& model, const std::vector<std::vector<int32_t>>& prompts,
                                 const std::vector<std::vector<int32_t>>& responses, int64_t batch) {
  const int64_t V = model.config().vocab_size;
  std::vector<double> out(prompts.size(), 0.0);
  const int64_t budget = int64_t{1} << 26;  // logit floats per forward pass (256 MB)
  for (size_t b = 0; b < prompts.size();) {
    std::vector<std::vector<int32_t>> full;
    std::vector<size_t> idx;
    int64_t rows = 0;
    for (size_t i = b; i < prompts.size() && static_cast<int64_t>(idx.size()) < batch; ++i) {
      const int64_t n = prompts[i].size() + responses[i].size();
      if (!idx.empty() && (rows + n) * V > budget) break;
      rows += n;
      idx.push_back(i);
    }
    std::vector<KvCache> caches;
    caches.reserve(idx.size());
    std::vector<ForwardItem> items;
    for (size_t i : idx) {
      std::vector<int32_t> f = prompts[i];
      f.insert(f.end(), responses[i].begin(), responses[i].end());
      full.push_back(std::move(f));
    }
    for (size_t k = 0; k < idx.size(); ++k) {
      caches.push_back(model.new_cache());
      items.push_back({&caches.back(), full[k].data(), static_cast<int64_t>(full[k].size()), true});
    }
    std::vector<std::vector<float>> logits;
    model.forward(items, logits);
    for (size_t k = 0; k < idx.size(); ++k) {
      const size_t i = idx[k];
      const int64_t T = prompts[i].size();
      double ll = 0;
      for (size_t j = 0; j < responses[i].size(); ++j) ll += log_softmax_at(logits[k].data() + (T - 1 + j) * V, V, responses[i][j]);
      out[i] = responses[i].empty() ? 0.0 : ll / responses[i].size();
    }
    b = idx.back() + 1;
  }
  return out;
}

// ---- plots ----

std::string html_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else if (c == '\'') o += "&#39;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

namespace {
const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

std::string panel(const Plot& p, int ox, int oy) {
  const int L = 60, T = 30, PW = p.width - 80, PH = p.height - 75;
  double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
  auto fy = [&](double y) { return p.log_y ? std::log10(std::max(y, 1e-12)) : y; };
  for (auto& s : p.series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      xlo = std::min(xlo, s.x[i]);
      xhi = std::max(xhi, s.x[i]);
      ylo = std::min(ylo, fy(s.y[i]));
      yhi = std::max(yhi, fy(s.y[i]));
    }
  for (double h : p.hlines) {
    ylo = std::min(ylo, fy(h));
    yhi = std::max(yhi, fy(h));
  }
  for (auto& b : p.bands) {
    xlo = std::min(xlo, b.x0);
    xhi = std::max(xhi, b.x1);
  }
  if (!std::isfinite(xlo)) xlo = 0, xhi = 1, ylo = 0, yhi = 1;
  if (xhi == xlo) xhi = xlo + 1;
  if (yhi == ylo) yhi = ylo + 1;
  const double pad = (yhi - ylo) * 0.05;
  ylo -= pad;
  yhi += pad;
  auto X = [&](double x) { return ox + L + (x - xlo) / (xhi - xlo) * PW; };
  auto Y = [&](double y) { return oy + T + PH - (fy(y) - ylo) / (yhi - ylo) * PH; };
  auto Yr = [&](double fyv) { return oy + T + PH - (fyv - ylo) / (yhi - ylo) * PH; };
  std::string s;
  s += fmt::format("<text x='{}' y='{}' text-anchor='middle' font-size='12'>{}</text>\n", ox + L + PW / 2, oy + 16, html_escape(p.title));
  for (auto& b : p.bands) {
    s += fmt::format("<rect x='{:.1f}' y='{}' width='{:.1f}' height='{}' fill='{}' opacity='0.35'/>\n", X(b.x0), oy + T,
                     std::max(0.5, X(b.x1) - X(b.x0)), PH, b.color.empty() ? "#eee" : b.color);
    if (!b.label.empty())
      s += fmt::format("<text x='{:.1f}' y='{}' font-size='9' fill='#444'>{}</text>\n", X(b.x0) + 2, oy + T + 10, html_escape(b.label));
  }
  s += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#999'/>\n", ox + L, oy + T, PW, PH);
  for (int i = 0; i <= 4; ++i) {
    const double fv = ylo + (yhi - ylo) * i / 4, xv = xlo + (xhi - xlo) * i / 4;
    const double shown = p.log_y ? std::pow(10.0, fv) : fv;
    s += fmt::format("<text x='{}' y='{:.1f}' text-anchor='end' font-size='10'>{:.3g}</text>\n", ox + L - 4, Yr(fv) + 4, shown);
    s += fmt::format("<text x='{:.1f}' y='{}' text-anchor='middle' font-size='10'>{:.3g}</text>\n", X(xv), oy + T + PH + 13, xv);
  }
  s += fmt::format("<text x='{}' y='{}' text-anchor='middle' font-size='11'>{}</text>\n", ox + L + PW / 2, oy + T + PH + 28, html_escape(p.xlabel));
  s += fmt::format("<text x='{}' y='{}' text-anchor='middle' font-size='11' transform='rotate(-90 {} {})'>{}</text>\n", ox + 14,
                   oy + T + PH / 2, ox + 14, oy + T + PH / 2, html_escape(p.ylabel));
  for (double h : p.hlines)
    s += fmt::format("<line x1='{}' x2='{}' y1='{:.1f}' y2='{:.1f}' stroke='#555' stroke-dasharray='4,3'/>\n", ox + L, ox + L + PW, Y(h), Y(h));
  for (size_t k = 0; k < p.series.size(); ++k) {
    const auto& se = p.series[k];
    const char* c = kColors[k % 10];
    std::string pts;
    for (size_t i = 0; i < se.x.size(); ++i)
      if (std::isfinite(se.y[i])) pts += fmt::format("{:.1f},{:.1f} ", X(se.x[i]), Y(se.y[i]));
    s += fmt::format("<polyline points='{}' fill='none' stroke='{}' stroke-width='1.6'{}/>\n", pts, c, se.dashed ? " stroke-dasharray='5,3'" : "");
    if (se.points && se.x.size() <= 60)
      for (size_t i = 0; i < se.x.size(); ++i)
        if (std::isfinite(se.y[i])) s += fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='2.5' fill='{}'/>\n", X(se.x[i]), Y(se.y[i]), c);
    s += fmt::format("<text x='{}' y='{}' font-size='10' fill='{}'>{}</text>\n", ox + L + PW + 4 - 70, oy + T + 12 + 12 * static_cast<int>(k), c,
                     html_escape(se.name));
  }
  return s;
}
}  // namespace

std::string Plot::svg() const { return svg_panels({*this}, ""); }

std::string svg_panels(const std::vector<Plot>& panels, const std::string& title) {
  int W = 0, H = 0;
  for (auto& p : panels) {
    W += p.width;
    H = std::max(H, p.height);
  }
  const int top = title.empty() ? 0 : 22;
  std::string s = fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif'>\n"
                              "<rect width='100%' height='100%' fill='white'/>\n", W, H + top);
  if (!title.empty()) s += fmt::format("<text x='{}' y='16' text-anchor='middle' font-size='14'>{}</text>\n", W / 2, html_escape(title));
  int x = 0;
  for (auto& p : panels) {
    s += panel(p, x, top);
    x += p.width;
  }
  return s + "</svg>\n";
}

std::vector<int64_t> parse_exclude_dims(const std::string& spec) {
  std::vector<int64_t> out;
  if (spec.empty()) return out;
  if (fs::exists(spec)) {
    json j;
    try {
      j = json::parse(read_file(spec));
      for (auto& d : j.at("recommended_exclude")) out.push_back(d.get<int64_t>());
    } catch (const std::exception& e) {
      fail(ErrorKind::format, spec, "expected a massive-activation report with 'recommended_exclude' (kscope massive): {}", e.what());
    }
  } else {
    std::stringstream ss(spec);
    std::string t;
    while (std::getline(ss, t, ',')) {
      try {
        size_t used = 0;
        const long long v = std::stoll(t, &used);
        if (used != t.size() || v < 0) throw std::invalid_argument("x");
        out.push_back(v);
      } catch (...) {
        fail(ErrorKind::input, "--exclude-dims", "'{}' is neither a file nor a comma list of dimensions", spec);
      }
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace kscope
