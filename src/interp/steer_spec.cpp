#include "interp/steer_spec.hpp"

#include <fstream>

#include "util/error.hpp"

namespace kscope {
using json = nlohmann::json;

const VectorFile& VectorCache::get(const std::string& path) {
  auto it = files_.find(path);
  if (it != files_.end()) return it->second;
  VectorFile v = VectorFile::load(path);
  v.check_model(cfg_, path);
  return files_.emplace(path, std::move(v)).first->second;
}

namespace {
double site_norm(const VectorCache& vc, const VectorFile* f, const std::string& site) {
  if (auto it = vc.norms_override.find(site); it != vc.norms_override.end()) return it->second;
  if (f)
    if (auto it = f->norms.find(site); it != f->norms.end()) return it->second;
  return 0.0;
}

double parse_number(const std::string& s, const std::string& where) {
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    if (used != s.size() || !std::isfinite(v)) throw std::invalid_argument("");
    return v;
  } catch (const std::exception&) {
    fail(ErrorKind::input, where, "'{}' is not a number", s);
  }
}
}  // namespace

Intervention parse_intervention_arg(const std::string& arg, const ModelConfig& cfg, VectorCache& vc) {
  const std::string where = "intervention '" + arg + "'";
  const auto at = arg.rfind('@');
  if (at == std::string::npos || at == 0)
    fail(ErrorKind::input, where, "expected FILE@SITE*COEF[:POSITIONS], FILE@SITE!ablate[:POSITIONS] or FILE@SITE=VALUE[:POSITIONS]");
  const std::string file = arg.substr(0, at);
  std::string rest = arg.substr(at + 1), positions = "all";
  if (const auto colon = rest.find(':'); colon != std::string::npos) {
    positions = rest.substr(colon + 1);
    rest = rest.substr(0, colon);
  }
  Intervention iv;
  const auto op_at = rest.find_first_of("*!=");
  if (op_at == std::string::npos) fail(ErrorKind::input, where, "missing *COEF, !ablate or =VALUE after the site");
  iv.site = parse_site(rest.substr(0, op_at), cfg.num_hidden_layers);
  const std::string val = rest.substr(op_at + 1);
  if (rest[op_at] == '*') {
    iv.op = InterventionOp::add;
    std::string c = val;
    if (!c.empty() && c.back() == 'n') {
      iv.relative = true;
      c.pop_back();
    }
    iv.coef = parse_number(c, where);
  } else if (rest[op_at] == '!') {
    if (val != "ablate") fail(ErrorKind::input, where, "'!{}': the only '!' operation is !ablate", val);
    iv.op = InterventionOp::ablate;
  } else {
    iv.op = InterventionOp::clamp;
    iv.coef = parse_number(val, where);
  }
  iv.positions = PositionSpec::parse(positions);
  const VectorFile& f = vc.get(file);
  iv.vector = f.at(iv.site.str(), file);
  iv.mean_norm = site_norm(vc, &f, iv.site.str());
  iv.label = arg;
  return iv;
}

Intervention intervention_from_json(const json& j, const ModelConfig& cfg, VectorCache& vc, const std::string& where) {
  if (!j.is_object()) fail(ErrorKind::input, where, "expected an object {{vector, site, op, coef, positions}}");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "vector" && it.key() != "site" && it.key() != "op" && it.key() != "coef" && it.key() != "relative" &&
        it.key() != "mean_norm" && it.key() != "positions")
      fail(ErrorKind::input, where + "." + it.key(), "unknown field (expected vector, site, op, coef, relative, mean_norm, positions)");
  Intervention iv;
  if (!j.contains("site") || !j["site"].is_string()) fail(ErrorKind::input, where + ".site", "required string");
  iv.site = parse_site(j["site"].get<std::string>(), cfg.num_hidden_layers);
  iv.op = parse_op(j.value("op", "add"));
  if (j.contains("coef")) {
    if (!j["coef"].is_number()) fail(ErrorKind::input, where + ".coef", "expected a number");
    iv.coef = j["coef"].get<double>();
  } else if (iv.op == InterventionOp::clamp) {
    fail(ErrorKind::input, where + ".coef", "clamp needs the value to clamp the projection to");
  }
  if (j.contains("relative")) {
    if (!j["relative"].is_boolean()) fail(ErrorKind::input, where + ".relative", "expected true or false");
    iv.relative = j["relative"].get<bool>();
  }
  if (j.contains("positions")) {
    if (!j["positions"].is_string()) fail(ErrorKind::input, where + ".positions", "expected a string like \"response[:5]\"");
    iv.positions = PositionSpec::parse(j["positions"].get<std::string>());
  }
  const VectorFile* f = nullptr;
  if (!j.contains("vector")) fail(ErrorKind::input, where + ".vector", "required: a vector file path or a list of numbers");
  if (j["vector"].is_string()) {
    const std::string path = j["vector"].get<std::string>();
    f = &vc.get(path);
    iv.vector = f->at(iv.site.str(), path);
  } else if (j["vector"].is_array()) {
    for (auto& x : j["vector"]) {
      if (!x.is_number()) fail(ErrorKind::input, where + ".vector", "expected numbers");
      iv.vector.push_back(x.get<float>());
    }
  } else {
    fail(ErrorKind::input, where + ".vector", "expected a vector file path or a list of numbers");
  }
  iv.mean_norm = site_norm(vc, f, iv.site.str());
  if (j.contains("mean_norm")) {
    if (!j["mean_norm"].is_number() || !(j["mean_norm"].get<double>() > 0))
      fail(ErrorKind::input, where + ".mean_norm", "expected a positive number");
    iv.mean_norm = j["mean_norm"].get<double>();
  }
  iv.label = where;
  return iv;
}

}  // namespace kscope
