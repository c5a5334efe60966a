#include "trait/dataset.hpp"

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "store/activation_store.hpp"
#include "util/error.hpp"

#ifndef KSCOPE_TRAITS_DIR
#define KSCOPE_TRAITS_DIR "traits"
#endif

namespace kscope {
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string need_string(const json& j, const std::string& key, const std::string& path, const std::string& where) {
  if (!j.contains(key)) fail(ErrorKind::format, path, "{}: missing field '{}'", where, key);
  if (!j[key].is_string() || j[key].get<std::string>().empty())
    fail(ErrorKind::format, path, "{}: field '{}' must be a non-empty string", where, key);
  return j[key].get<std::string>();
}

std::vector<std::string> string_list(const json& j, const std::string& key, const std::string& path) {
  std::vector<std::string> out;
  if (!j.contains(key)) return out;
  if (!j[key].is_array()) fail(ErrorKind::format, path, "field '{}' must be a list of strings", key);
  for (size_t i = 0; i < j[key].size(); ++i) {
    if (!j[key][i].is_string() || j[key][i].get<std::string>().empty())
      fail(ErrorKind::format, path, "{}[{}] must be a non-empty string", key, i);
    out.push_back(j[key][i].get<std::string>());
  }
  return out;
}

}  // namespace

TraitDataset TraitDataset::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::io, path, "cannot open the trait dataset");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    fail(ErrorKind::format, path, "not valid JSON: {}", e.what());
  }
  if (!j.is_object()) fail(ErrorKind::format, path, "a trait dataset is a JSON object");
  static const std::set<std::string> known = {"name", "definition", "style", "instructions", "questions", "pairs",
                                              "eval_questions", "judge", "scorer", "coherence", "steer", "thresholds",
                                              "description", "notes"};
  for (auto& [k, v] : j.items())
    if (!known.count(k)) fail(ErrorKind::format, path, "unknown field '{}'", k);
  TraitDataset d;
  d.path = path;
  d.hash = fmt::format("{:016x}", fnv1a64(text.data(), text.size()));
  d.name = need_string(j, "name", path, "dataset");
  d.definition = need_string(j, "definition", path, "dataset");
  d.style = j.value("style", "instruct");
  if (d.style != "instruct" && d.style != "document")
    fail(ErrorKind::format, path, "field 'style' must be 'instruct' or 'document' (got '{}')", d.style);
  const auto questions = string_list(j, "questions", path);
  if (j.contains("instructions")) {
    if (d.style != "instruct") fail(ErrorKind::format, path, "'instructions' needs style 'instruct'");
    if (!j["instructions"].is_array() || j["instructions"].empty())
      fail(ErrorKind::format, path, "'instructions' must be a non-empty list of {{pos, neg}}");
    if (questions.empty()) fail(ErrorKind::format, path, "'instructions' need 'questions' to cross with");
    std::vector<std::pair<std::string, std::string>> ins;
    for (size_t i = 0; i < j["instructions"].size(); ++i) {
      const std::string w = fmt::format("instructions[{}]", i);
      ins.push_back({need_string(j["instructions"][i], "pos", path, w), need_string(j["instructions"][i], "neg", path, w)});
    }
    for (size_t q = 0; q < questions.size(); ++q)
      for (auto& [p, n] : ins) d.pairs.push_back({p, n, questions[q], static_cast<int64_t>(q)});
  }
  if (j.contains("pairs")) {
    if (!j["pairs"].is_array()) fail(ErrorKind::format, path, "'pairs' must be a list");
    for (size_t i = 0; i < j["pairs"].size(); ++i) {
      const std::string w = fmt::format("pairs[{}]", i);
      TraitPair p{need_string(j["pairs"][i], "pos", path, w), need_string(j["pairs"][i], "neg", path, w), "", static_cast<int64_t>(i)};
      if (d.style == "instruct") p.question = need_string(j["pairs"][i], "question", path, w);
      d.pairs.push_back(p);
    }
  }
  if (d.pairs.empty()) fail(ErrorKind::format, path, "no pairs: give 'instructions' + 'questions' or 'pairs'");
  d.eval_questions = string_list(j, "eval_questions", path);
  if (d.eval_questions.empty()) fail(ErrorKind::format, path, "missing field 'eval_questions' (held-out questions to steer on)");
  for (const auto& q : d.eval_questions)
    for (const auto& p : d.pairs)
      if (p.question == q) fail(ErrorKind::format, path, "evaluation question also used for extraction: \"{}\"", q);
  if (j.contains("judge")) {
    const json& jj = j["judge"];
    if (!jj.is_object()) fail(ErrorKind::format, path, "'judge' must be an object {{trait, coherence, on_topic}}");
    for (auto& [k, v] : jj.items()) {
      if (!v.is_string()) fail(ErrorKind::format, path, "judge.{} must be a template string", k);
      if (k == "trait") d.rubric.trait_template = v;
      else if (k == "coherence") d.rubric.coherence_template = v;
      else if (k == "on_topic") d.rubric.on_topic_template = v;
      else fail(ErrorKind::format, path, "unknown field 'judge.{}' (expected trait, coherence, on_topic)", k);
    }
    // check the templates now, not mid-run
    try {
      d.rubric.trait("t", "d", "q", "a");
      d.rubric.coherence("q", "a");
      d.rubric.on_topic("q", "a");
    } catch (const Error& e) {
      fail(ErrorKind::format, path, "judge: {}", e.what());
    }
  }
  d.scorer = j.value("scorer", "");
  d.coherence = j.value("coherence", "judge");
  if (d.coherence != "judge" && d.coherence != "loglik")
    fail(ErrorKind::format, path, "field 'coherence' must be 'judge' or 'loglik' (got '{}')", d.coherence);
  const std::string steer = j.value("steer", "increase");
  if (steer != "increase" && steer != "decrease")
    fail(ErrorKind::format, path, "field 'steer' must be 'increase' or 'decrease' (got '{}')", steer);
  d.steer_sign = steer == "increase" ? 1 : -1;
  if (j.contains("thresholds")) {
    const json& t = j["thresholds"];
    for (auto& [k, v] : t.items()) {
      if (!v.is_number()) fail(ErrorKind::format, path, "thresholds.{} must be a number", k);
      if (k == "pos_min") d.pos_min = v.get<double>();
      else if (k == "neg_max") d.neg_max = v.get<double>();
      else if (k == "coherence_min") d.coherence_min = v.get<double>();
      else fail(ErrorKind::format, path, "unknown field 'thresholds.{}' (expected pos_min, neg_max, coherence_min)", k);
    }
  }
  return d;
}

std::string traits_dir() {
  if (const char* e = std::getenv("KSCOPE_TRAITS"); e && *e) return e;
  if (fs::is_directory("traits")) return "traits";
  return KSCOPE_TRAITS_DIR;
}

std::vector<std::string> shipped_traits() {
  std::vector<std::string> out;
  const std::string d = traits_dir();
  if (!fs::is_directory(d)) return out;
  for (auto& e : fs::directory_iterator(d))
    if (e.path().extension() == ".json") out.push_back(e.path().stem().string());
  std::sort(out.begin(), out.end());
  return out;
}

TraitDataset TraitDataset::find(const std::string& s) {
  if (fs::exists(s) && fs::is_regular_file(s)) return load(s);
  const std::string p = traits_dir() + "/" + s + ".json";
  if (fs::exists(p)) return load(p);
  std::string known;
  for (auto& t : shipped_traits()) known += (known.empty() ? "" : ", ") + t;
  fail(ErrorKind::input, "--trait", "'{}' is neither a file nor a shipped trait in {} (known: {})", s, traits_dir(), known);
}

json TraitDataset::describe() const {
  std::set<int64_t> qs;
  for (auto& p : pairs) qs.insert(p.question_index);
  return {{"name", name}, {"style", style}, {"pairs", pairs.size()}, {"questions", qs.size()},
          {"eval_questions", eval_questions.size()}, {"steer", steer_sign > 0 ? "increase" : "decrease"},
          {"scorer", scorer}, {"coherence", coherence}, {"path", path}, {"hash", hash}, {"definition", definition}};
}

}  // namespace kscope
