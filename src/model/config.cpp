#include "model/config.hpp"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "util/error.hpp"

namespace kscope {
using json = nlohmann::json;

namespace {

struct Reader {
  const json& j;
  std::string src;

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail(ErrorKind::config, src, "field '{}': {}", field, what);
  }
  bool present(const std::string& k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t integer(const std::string& k, std::optional<int64_t> def = std::nullopt, int64_t min = 0) const {
    if (!present(k)) {
      if (def) return *def;
      bad(k, "required integer is missing");
    }
    if (!j[k].is_number_integer()) {
      if (j[k].is_number_float() && std::floor(j[k].get<double>()) == j[k].get<double>()) return j[k].get<double>();
      bad(k, "expected an integer, got " + j[k].dump());
    }
    const auto v = j[k].get<int64_t>();
    if (v < min) bad(k, "expected an integer >= " + std::to_string(min) + ", got " + std::to_string(v));
    return v;
  }
  std::optional<int64_t> opt_integer(const std::string& k, int64_t min = 0) const {
    if (!present(k)) return std::nullopt;
    return integer(k, std::nullopt, min);
  }
  double number(const std::string& k, std::optional<double> def = std::nullopt) const {
    if (!present(k)) {
      if (def) return *def;
      bad(k, "required number is missing");
    }
    if (!j[k].is_number()) bad(k, "expected a number, got " + j[k].dump());
    return j[k].get<double>();
  }
  bool boolean(const std::string& k, bool def) const {
    if (!present(k)) return def;
    if (!j[k].is_boolean()) bad(k, "expected true or false, got " + j[k].dump());
    return j[k].get<bool>();
  }
  std::string string(const std::string& k, std::optional<std::string> def = std::nullopt) const {
    if (!present(k)) {
      if (def) return *def;
      bad(k, "required string is missing");
    }
    if (!j[k].is_string()) bad(k, "expected a string, got " + j[k].dump());
    return j[k].get<std::string>();
  }
};

double yarn_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

RopeConfig parse_rope(const json& j, const Reader& r) {
  RopeConfig rc;
  // transformers-5 dialect: rope_parameters {rope_type, rope_theta, ...}; hub dialect: rope_scaling + rope_theta.
  const bool has_params = r.present("rope_parameters");
  const bool has_scaling = r.present("rope_scaling");
  const json* p = nullptr;
  std::string pname;
  if (has_params) {
    p = &j["rope_parameters"];
    pname = "rope_parameters";
  } else if (has_scaling) {
    p = &j["rope_scaling"];
    pname = "rope_scaling";
  }
  if (p && !p->is_object()) r.bad(pname, "expected an object");
  // theta
  std::optional<double> theta_top;
  if (r.present("rope_theta")) theta_top = r.number("rope_theta");
  std::optional<double> theta_p;
  if (p && p->contains("rope_theta") && !(*p)["rope_theta"].is_null()) {
    if (!(*p)["rope_theta"].is_number()) r.bad(pname + ".rope_theta", "expected a number");
    theta_p = (*p)["rope_theta"].get<double>();
  }
  if (theta_top && theta_p && std::fabs(*theta_top - *theta_p) > 1e-9 * std::fabs(*theta_top))
    r.bad("rope_theta", fmt::format("{} contradicts {}.rope_theta = {}", *theta_top, pname, *theta_p));
  rc.theta = theta_p ? *theta_p : theta_top ? *theta_top : 10000.0;
  if (rc.theta <= 1.0) r.bad("rope_theta", "must be > 1");
  if (has_params && has_scaling && !j["rope_scaling"].is_null() && j["rope_scaling"] != j["rope_parameters"]) {
    // transformers-5 keeps only rope_parameters; both present and different is ambiguous.
    const json& s = j["rope_scaling"];
    for (auto it = s.begin(); it != s.end(); ++it) {
      std::string key = it.key() == "type" ? "rope_type" : it.key();
      if (p->contains(key) && (*p)[key] != *it)
        r.bad("rope_scaling." + it.key(), fmt::format("{} contradicts rope_parameters.{} = {}", it->dump(), key,
                                                      (*p)[key].dump()));
    }
  }
  if (p) {
    std::string type = "default", type_key = "rope_type";
    for (const char* k : {"type", "rope_type"}) {  // "type" is the old name of "rope_type"
      if (!p->contains(k) || (*p)[k].is_null()) continue;
      if (!(*p)[k].is_string()) r.bad(pname + "." + k, "expected a string");
      const std::string t = (*p)[k].get<std::string>();
      if (std::string(k) == "rope_type" && p->contains("type") && (*p)["type"].is_string() && (*p)["type"] != t)
        r.bad(pname + ".rope_type", fmt::format("'{}' contradicts {}.type = {}", t, pname, (*p)["type"].dump()));
      type = t;
      type_key = k;
    }
    if (type != "default" && type != "yarn")
      r.bad(pname + "." + type_key, "'" + type + "' is not supported (expected default or yarn)");
    rc.type = type;
    auto num = [&](const char* k, std::optional<double> def) -> std::optional<double> {
      if (!p->contains(k) || (*p)[k].is_null()) return def;
      if (!(*p)[k].is_number()) r.bad(pname + "." + k, "expected a number, got " + (*p)[k].dump());
      return (*p)[k].get<double>();
    };
    if (type == "yarn") {
      const auto orig = num("original_max_position_embeddings", std::nullopt);
      if (!orig || *orig <= 0) r.bad(pname + ".original_max_position_embeddings", "yarn needs a positive value");
      rc.original_max_position_embeddings = static_cast<int64_t>(*orig);
      auto factor = num("factor", std::nullopt);
      if (!factor) factor = static_cast<double>(r.integer("max_position_embeddings", std::nullopt, 1)) / *orig;
      if (*factor < 1.0) r.bad(pname + ".factor", "yarn factor must be >= 1");
      rc.factor = *factor;
      // HF: `get("beta_fast") or 32` -- zero or null falls back to the paper's defaults
      const double bf = num("beta_fast", 0.0).value(), bs = num("beta_slow", 0.0).value();
      rc.beta_fast = bf != 0.0 ? bf : 32.0;
      rc.beta_slow = bs != 0.0 ? bs : 1.0;
      rc.mscale = num("mscale", 0.0).value();
      rc.mscale_all_dim = num("mscale_all_dim", 0.0).value();
      rc.attention_factor = num("attention_factor", std::nullopt);
      if (p->contains("truncate") && !(*p)["truncate"].is_null()) {
        if (!(*p)["truncate"].is_boolean()) r.bad(pname + ".truncate", "expected true or false");
        rc.truncate = (*p)["truncate"].get<bool>();
      }
    }
  }
  rc.interleave = r.boolean("rope_interleave", true);
  return rc;
}

QuantConfig parse_quant(const json& j, const Reader& r) {
  QuantConfig q;
  if (!r.present("quantization_config")) return q;
  const json& c = j["quantization_config"];
  if (!c.is_object()) r.bad("quantization_config", "expected an object");
  Reader qr{c, r.src};
  const std::string method = qr.string("quant_method", std::string{});
  if (method == "fp8") {
    q.method = QuantMethod::fp8_block;
    const std::string fmtname = qr.string("fmt", std::string("e4m3"));
    if (fmtname != "e4m3") r.bad("quantization_config.fmt", "'" + fmtname + "' is not supported (expected e4m3)");
    if (!c.contains("weight_block_size") || !c["weight_block_size"].is_array() || c["weight_block_size"].size() != 2 ||
        !c["weight_block_size"][0].is_number_integer() || !c["weight_block_size"][1].is_number_integer())
      r.bad("quantization_config.weight_block_size", "expected [block_out, block_in] integers");
    q.block_out = c["weight_block_size"][0].get<int>();
    q.block_in = c["weight_block_size"][1].get<int>();
    if (q.block_out <= 0 || q.block_in <= 0) r.bad("quantization_config.weight_block_size", "blocks must be positive");
    const std::string act = qr.string("activation_scheme", std::string("dynamic"));
    if (act != "dynamic")
      r.bad("quantization_config.activation_scheme", "'" + act + "' is not supported (expected dynamic)");
  } else if (method == "compressed-tensors") {
    q.method = QuantMethod::int4_pack;
    const std::string format = qr.string("format", std::string{});
    if (format != "pack-quantized")
      r.bad("quantization_config.format", "'" + format + "' is not supported (expected pack-quantized)");
    if (!c.contains("config_groups") || !c["config_groups"].is_object() || c["config_groups"].size() != 1)
      r.bad("quantization_config.config_groups", "expected exactly one group");
    const json& g = c["config_groups"].begin().value();
    const std::string gname = "quantization_config.config_groups." + c["config_groups"].begin().key();
    if (!g.contains("weights") || !g["weights"].is_object()) r.bad(gname + ".weights", "missing");
    if (g.contains("input_activations") && !g["input_activations"].is_null())
      r.bad(gname + ".input_activations", "activation quantization is not supported (expected null)");
    const json& w = g["weights"];
    Reader wr{w, r.src};
    if (wr.integer("num_bits", std::nullopt, 1) != 4) r.bad(gname + ".weights.num_bits", "expected 4");
    if (wr.string("type", std::string("int")) != "int") r.bad(gname + ".weights.type", "expected int");
    if (!wr.boolean("symmetric", false)) r.bad(gname + ".weights.symmetric", "expected true (asymmetric is not supported)");
    if (wr.string("strategy", std::string("group")) != "group") r.bad(gname + ".weights.strategy", "expected group");
    q.group_size = static_cast<int>(wr.integer("group_size", std::nullopt, 1));
    if (q.group_size % 8 != 0) r.bad(gname + ".weights.group_size", "must be a multiple of 8");
    if (w.contains("actorder") && !w["actorder"].is_null())
      r.bad(gname + ".weights.actorder", "activation ordering is not supported (expected null)");
    if (c.contains("ignore")) {
      if (!c["ignore"].is_array()) r.bad("quantization_config.ignore", "expected a list of module names");
      for (auto& e : c["ignore"]) {
        if (!e.is_string()) r.bad("quantization_config.ignore", "expected strings");
        const auto s = e.get<std::string>();
        if (s.rfind("re:", 0) == 0) {
          try {
            q.ignore_re.emplace_back(s.substr(3));
          } catch (const std::regex_error&) {
            r.bad("quantization_config.ignore", "invalid regex '" + s + "'");
          }
        }
        q.ignore.push_back(s);
      }
    }
  } else {
    r.bad("quantization_config.quant_method", "'" + method + "' is not supported (expected fp8 or compressed-tensors)");
  }
  return q;
}

}  // namespace

bool QuantConfig::ignored(const std::string& module) const {
  for (auto& s : ignore)
    if (s == module) return true;
  for (auto& re : ignore_re)
    if (std::regex_match(module, re)) return true;
  return false;
}

ModelConfig parse_config(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(ErrorKind::config, source, "not valid JSON: {}", e.what());
  }
  if (!j.is_object()) fail(ErrorKind::config, source, "expected a JSON object");
  Reader r{j, source};
  ModelConfig c;
  c.source = source;
  c.model_type = r.string("model_type");
  if (c.model_type != "deepseek_v3" && c.model_type != "kimi_k2")
    r.bad("model_type", "'" + c.model_type + "' is not supported (expected deepseek_v3 or kimi_k2)");
  if (r.present("architectures")) {
    bool ok = false;
    if (!j["architectures"].is_array()) r.bad("architectures", "expected a list");
    for (auto& a : j["architectures"]) ok |= a == "DeepseekV3ForCausalLM";
    if (!ok) r.bad("architectures", j["architectures"].dump() + " does not include DeepseekV3ForCausalLM");
  }
  const std::string act = r.string("hidden_act", std::string("silu"));
  if (act != "silu") r.bad("hidden_act", "'" + act + "' is not supported (expected silu)");
  if (r.boolean("attention_bias", false)) r.bad("attention_bias", "true is not supported (DeepSeek-V3 has none)");

  c.vocab_size = r.integer("vocab_size", std::nullopt, 1);
  c.hidden_size = r.integer("hidden_size", std::nullopt, 1);
  c.intermediate_size = r.integer("intermediate_size", std::nullopt, 1);
  c.num_hidden_layers = r.integer("num_hidden_layers", std::nullopt, 1);
  c.num_attention_heads = r.integer("num_attention_heads", std::nullopt, 1);
  const int64_t kvh = r.integer("num_key_value_heads", c.num_attention_heads, 1);
  if (kvh != c.num_attention_heads)
    r.bad("num_key_value_heads", fmt::format("{} differs from num_attention_heads {}; MLA has one latent per token",
                                             kvh, c.num_attention_heads));
  c.q_lora_rank = r.opt_integer("q_lora_rank", 1);
  c.kv_lora_rank = r.integer("kv_lora_rank", std::nullopt, 1);
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim", std::nullopt, 0);
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim", std::nullopt, 2);
  if (c.qk_rope_head_dim % 2) r.bad("qk_rope_head_dim", "must be even");
  c.v_head_dim = r.integer("v_head_dim", std::nullopt, 1);
  if (r.present("qk_head_dim") && r.integer("qk_head_dim") != c.qk_head_dim())
    r.bad("qk_head_dim", fmt::format("{} != qk_nope_head_dim + qk_rope_head_dim = {}", r.integer("qk_head_dim"),
                                     c.qk_head_dim()));
  if (r.present("head_dim") && r.integer("head_dim") != c.qk_rope_head_dim)
    r.bad("head_dim", fmt::format("{} != qk_rope_head_dim {} (transformers-5 sets head_dim to the rope dim)",
                                  r.integer("head_dim"), c.qk_rope_head_dim));

  c.n_routed_experts = r.integer("n_routed_experts", int64_t{0}, 0);
  c.n_shared_experts = r.integer("n_shared_experts", int64_t{0}, 0);
  c.first_k_dense_replace = r.integer("first_k_dense_replace", int64_t{0}, 0);
  c.moe_layer_freq = r.integer("moe_layer_freq", int64_t{1}, 1);
  if (c.n_routed_experts > 0) {
    c.moe_intermediate_size = r.integer("moe_intermediate_size", std::nullopt, 1);
    c.num_experts_per_tok = r.integer("num_experts_per_tok", std::nullopt, 1);
    if (c.num_experts_per_tok > c.n_routed_experts)
      r.bad("num_experts_per_tok", fmt::format("{} > n_routed_experts {}", c.num_experts_per_tok, c.n_routed_experts));
    c.n_group = r.integer("n_group", int64_t{1}, 1);
    c.topk_group = r.integer("topk_group", int64_t{1}, 1);
    if (c.n_routed_experts % c.n_group)
      r.bad("n_group", fmt::format("{} does not divide n_routed_experts {}", c.n_group, c.n_routed_experts));
    if (c.topk_group > c.n_group) r.bad("topk_group", fmt::format("{} > n_group {}", c.topk_group, c.n_group));
    if (c.num_experts_per_tok > c.topk_group * (c.n_routed_experts / c.n_group))
      r.bad("num_experts_per_tok", fmt::format("{} experts cannot be chosen from topk_group {} groups of {}",
                                               c.num_experts_per_tok, c.topk_group, c.n_routed_experts / c.n_group));
    const std::string tm = r.string("topk_method", std::string("noaux_tc"));
    if (tm == "noaux_tc") c.topk_method = TopkMethod::noaux_tc;
    else if (tm == "greedy") c.topk_method = TopkMethod::greedy;
    else if (tm == "group_limited_greedy") c.topk_method = TopkMethod::group_limited_greedy;
    else r.bad("topk_method", "'" + tm + "' is not supported (expected noaux_tc, greedy or group_limited_greedy)");
    if (c.topk_method == TopkMethod::noaux_tc && c.n_group > 1 && c.n_routed_experts / c.n_group < 2)
      r.bad("n_group", "noaux_tc scores each group by its top-2 experts: groups need at least 2 experts");
    const std::string sf = r.string("scoring_func", std::string("sigmoid"));
    if (sf == "sigmoid") c.scoring_func = ScoringFunc::sigmoid;
    else if (sf == "softmax") c.scoring_func = ScoringFunc::softmax;
    else r.bad("scoring_func", "'" + sf + "' is not supported (expected sigmoid or softmax)");
    c.norm_topk_prob = r.boolean("norm_topk_prob", true);
    c.routed_scaling_factor = r.number("routed_scaling_factor", 1.0);
    if (!(c.routed_scaling_factor > 0)) r.bad("routed_scaling_factor", "must be positive");
    if (c.first_k_dense_replace > c.num_hidden_layers)
      r.bad("first_k_dense_replace", fmt::format("{} > num_hidden_layers {}", c.first_k_dense_replace,
                                                 c.num_hidden_layers));
  }
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  if (!(c.rms_norm_eps > 0)) r.bad("rms_norm_eps", "must be positive");
  c.max_position_embeddings = r.integer("max_position_embeddings", std::nullopt, 1);
  c.rope = parse_rope(j, r);
  c.bos_token_id = r.opt_integer("bos_token_id");
  c.pad_token_id = r.opt_integer("pad_token_id");
  if (r.present("eos_token_id")) {
    const json& e = j["eos_token_id"];
    if (e.is_number_integer()) c.eos_token_ids.push_back(e.get<int64_t>());
    else if (e.is_array()) {
      for (auto& x : e) {
        if (!x.is_number_integer()) r.bad("eos_token_id", "expected an integer or a list of integers");
        c.eos_token_ids.push_back(x.get<int64_t>());
      }
    } else r.bad("eos_token_id", "expected an integer or a list of integers");
  }
  for (auto id : c.eos_token_ids)
    if (id < 0 || id >= c.vocab_size) r.bad("eos_token_id", fmt::format("{} is outside the vocabulary [0, {})", id, c.vocab_size));
  if (c.bos_token_id && *c.bos_token_id >= c.vocab_size) r.bad("bos_token_id", "outside the vocabulary");
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.num_nextn_predict_layers = r.integer("num_nextn_predict_layers", int64_t{0}, 0);
  c.quant = parse_quant(j, r);
  return c;
}

ModelConfig load_config(const std::string& model_dir) {
  const auto path = (std::filesystem::path(model_dir) / "config.json").string();
  std::ifstream in(path);
  if (!in) fail(ErrorKind::io, path, "cannot open (is '{}' an HF checkpoint directory?)", model_dir);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), path);
}

double ModelConfig::rope_attention_factor() const {
  if (rope.type != "yarn") return 1.0;
  if (rope.attention_factor) return *rope.attention_factor;
  if (rope.mscale != 0.0 && rope.mscale_all_dim != 0.0)
    return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim);
  return yarn_mscale(rope.factor, 1.0);
}

std::vector<double> ModelConfig::rope_inv_freq() const {
  const int64_t dim = qk_rope_head_dim;
  std::vector<double> inv(dim / 2);
  std::vector<float> pos_freq(dim / 2);
  // HF computes these in float32; we round each step the same way.
  for (int64_t i = 0; i < dim / 2; ++i) {
    pos_freq[i] = std::pow(static_cast<float>(rope.theta), static_cast<float>(2 * i) / static_cast<float>(dim));
    inv[i] = 1.0f / pos_freq[i];
  }
  if (rope.type != "yarn") return inv;
  auto corr_dim = [&](double rot) {
    return (dim * std::log(rope.original_max_position_embeddings / (rot * 2 * M_PI))) / (2 * std::log(rope.theta));
  };
  double low = corr_dim(rope.beta_fast), high = corr_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float extrap = 1.0f / pos_freq[i];
    const float interp = 1.0f / (static_cast<float>(rope.factor) * pos_freq[i]);
    float ramp = static_cast<float>((static_cast<float>(i) - low) / (high - low));
    ramp = std::min(1.0f, std::max(0.0f, ramp));
    const float extrap_factor = 1.0f - ramp;
    inv[i] = interp * (1.0f - extrap_factor) + extrap * extrap_factor;
  }
  return inv;
}

double ModelConfig::attention_scale() const {
  double s = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope.type != "default" && rope.mscale_all_dim != 0.0) {
    const double m = yarn_mscale(rope.factor, rope.mscale_all_dim);
    s *= m * m;
  }
  return s;
}

std::string ModelConfig::identity_hash() const {
  // FNV-1a over a canonical text of the math-changing fields.
  const std::string s = fmt::format(
      "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}", vocab_size, hidden_size,
      intermediate_size, moe_intermediate_size, num_hidden_layers, num_attention_heads, q_lora_rank.value_or(0),
      kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, n_routed_experts, n_shared_experts,
      num_experts_per_tok, n_group, topk_group, static_cast<int>(topk_method), static_cast<int>(scoring_func),
      norm_topk_prob, routed_scaling_factor, first_k_dense_replace, moe_layer_freq, rms_norm_eps, rope.type, rope.theta,
      rope.factor, rope.interleave, tie_word_embeddings, rope.original_max_position_embeddings);
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return fmt::format("{:016x}", h);
}

}  // namespace kscope
