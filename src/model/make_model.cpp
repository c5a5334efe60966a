#include "model/make_model.hpp"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "io/safetensors.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"
#include "model/quantize.hpp"
#include "tokenizer/tokenizer.hpp"
#include "util/error.hpp"
#include "util/numeric.hpp"
#include "util/thread_pool.hpp"

namespace kscope {
namespace fs = std::filesystem;
using json = nlohmann::json;

StoredFormat parse_stored_format(const std::string& s) {
  if (s == "bf16") return StoredFormat::bf16;
  if (s == "fp8") return StoredFormat::fp8;
  if (s == "int4") return StoredFormat::int4;
  fail(ErrorKind::input, "--format", "'{}' is not a format (expected bf16, fp8 or int4)", s);
}

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> n = {"tiny", "dsv3-tiny", "mid", "kimi-k2-slice", "dsv3-slice"};
  return n;
}

json quantization_config_json(StoredFormat f) {
  if (f == StoredFormat::fp8)
    return {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  if (f == StoredFormat::int4)
    return {{"config_groups",
             {{"group_0",
               {{"input_activations", nullptr}, {"output_activations", nullptr}, {"targets", {"Linear"}},
                {"weights", {{"actorder", nullptr}, {"block_structure", nullptr}, {"dynamic", false}, {"group_size", 32},
                             {"num_bits", 4}, {"observer", "minmax"}, {"observer_kwargs", json::object()},
                             {"strategy", "group"}, {"symmetric", true}, {"type", "int"}}}}}}},
            {"format", "pack-quantized"},
            {"ignore", {"lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"}},
            {"kv_cache_scheme", nullptr},
            {"quant_method", "compressed-tensors"},
            {"quantization_status", "compressed"}};
  return nullptr;
}

bool stored_quantized(const std::string& n, StoredFormat f) {
  const bool proj = n.rfind("model.layers.", 0) == 0 && n.size() > 7 && n.substr(n.size() - 7) == ".weight" &&
                    n.find("_proj.") != std::string::npos;
  if (f == StoredFormat::fp8) return proj;
  if (f == StoredFormat::int4) return proj && n.find(".mlp.experts.") != std::string::npos;
  return false;
}

json preset_config(const MakeModelSpec& spec) {
  json c = {
      {"architectures", {"DeepseekV3ForCausalLM"}},
      {"attention_bias", false},
      {"hidden_act", "silu"},
      {"initializer_range", 0.02},
      {"moe_layer_freq", 1},
      {"norm_topk_prob", true},
      {"num_nextn_predict_layers", 0},
      {"rms_norm_eps", 1e-6},
      {"scoring_func", "sigmoid"},
      {"topk_method", "noaux_tc"},
      {"tie_word_embeddings", false},
      {"torch_dtype", "bfloat16"},
      {"use_cache", true},
      {"kscope_preset", spec.preset},
      {"kscope_seed", spec.seed},
  };
  auto kimi_rope = [&](double orig) {
    c["rope_theta"] = 50000.0;
    c["rope_scaling"] = {{"type", "yarn"}, {"factor", 32.0}, {"beta_fast", 1.0}, {"beta_slow", 1.0},
                         {"mscale", 1.0}, {"mscale_all_dim", 1.0}, {"original_max_position_embeddings", orig}};
  };
  auto dsv3_rope = [&](double orig) {
    c["rope_theta"] = 10000.0;
    c["rope_scaling"] = {{"type", "yarn"}, {"factor", 40.0}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                         {"mscale", 1.0}, {"mscale_all_dim", 1.0}, {"original_max_position_embeddings", orig}};
  };
  const std::string& p = spec.preset;
  if (p == "tiny" || p == "kimi-k2-slice" || p == "mid") {
    c["model_type"] = "kimi_k2";
    c["n_group"] = 1;
    c["topk_group"] = 1;
    c["routed_scaling_factor"] = 2.827;
    c["n_shared_experts"] = 1;
    c["first_k_dense_replace"] = 1;
    c["bos_token_id"] = 1;
    c["eos_token_id"] = 2;
    c["pad_token_id"] = 0;
    if (p == "tiny") {
      c.update({{"vocab_size", 512}, {"hidden_size", 256}, {"intermediate_size", 512}, {"moe_intermediate_size", 128},
                {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 4},
                {"q_lora_rank", 128}, {"kv_lora_rank", 64}, {"qk_nope_head_dim", 32}, {"qk_rope_head_dim", 16},
                {"v_head_dim", 32}, {"n_routed_experts", 16}, {"num_experts_per_tok", 4},
                {"max_position_embeddings", 4096}});
      kimi_rope(256);
    } else if (p == "mid") {
      c.update({{"vocab_size", 32000}, {"hidden_size", 1024}, {"intermediate_size", 2816}, {"moe_intermediate_size", 256},
                {"num_hidden_layers", 8}, {"num_attention_heads", 16}, {"num_key_value_heads", 16},
                {"q_lora_rank", 384}, {"kv_lora_rank", 128}, {"qk_nope_head_dim", 64}, {"qk_rope_head_dim", 32},
                {"v_head_dim", 64}, {"n_routed_experts", 64}, {"num_experts_per_tok", 6},
                {"max_position_embeddings", 8192}});
      kimi_rope(1024);
    } else {  // true Kimi-K2 dimensions, one dense layer then MoE layers
      c.update({{"vocab_size", 163840}, {"hidden_size", 7168}, {"intermediate_size", 18432}, {"moe_intermediate_size", 2048},
                {"num_hidden_layers", 2}, {"num_attention_heads", 64}, {"num_key_value_heads", 64},
                {"q_lora_rank", 1536}, {"kv_lora_rank", 512}, {"qk_nope_head_dim", 128}, {"qk_rope_head_dim", 64},
                {"v_head_dim", 128}, {"n_routed_experts", 384}, {"num_experts_per_tok", 8},
                {"max_position_embeddings", 131072}, {"bos_token_id", 163584}, {"eos_token_id", 163585},
                {"pad_token_id", 163839}});
      kimi_rope(4096);
    }
  } else if (p == "dsv3-tiny" || p == "dsv3-slice") {
    c["model_type"] = "deepseek_v3";
    c["routed_scaling_factor"] = 2.5;
    c["n_shared_experts"] = 1;
    c["bos_token_id"] = 0;
    c["eos_token_id"] = 1;
    c["q_lora_rank"] = nullptr;
    if (p == "dsv3-tiny") {
      c.update({{"vocab_size", 512}, {"hidden_size", 192}, {"intermediate_size", 384}, {"moe_intermediate_size", 64},
                {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 4},
                {"kv_lora_rank", 64}, {"qk_nope_head_dim", 32}, {"qk_rope_head_dim", 16}, {"v_head_dim", 32},
                {"n_routed_experts", 16}, {"num_experts_per_tok", 4}, {"n_group", 4}, {"topk_group", 2},
                {"first_k_dense_replace", 2}, {"max_position_embeddings", 4096}});
      dsv3_rope(256);
    } else {  // true DeepSeek-V3 dimensions (q_lora 1536 as shipped)
      c.update({{"vocab_size", 129280}, {"hidden_size", 7168}, {"intermediate_size", 18432}, {"moe_intermediate_size", 2048},
                {"num_hidden_layers", 4}, {"num_attention_heads", 128}, {"num_key_value_heads", 128},
                {"q_lora_rank", 1536}, {"kv_lora_rank", 512}, {"qk_nope_head_dim", 128}, {"qk_rope_head_dim", 64},
                {"v_head_dim", 128}, {"n_routed_experts", 256}, {"num_experts_per_tok", 8}, {"n_group", 8},
                {"topk_group", 4}, {"first_k_dense_replace", 3}, {"max_position_embeddings", 163840}});
      dsv3_rope(4096);
    }
  } else {
    fail(ErrorKind::input, "--preset", "unknown preset '{}' (expected tiny, dsv3-tiny, mid, kimi-k2-slice or dsv3-slice)", p);
  }
  if (spec.layers > 0) {
    c["num_hidden_layers"] = spec.layers;
    if (c["first_k_dense_replace"].get<int64_t>() > spec.layers) c["first_k_dense_replace"] = spec.layers;
  }
  if (spec.experts > 0) {
    c["n_routed_experts"] = spec.experts;
    const int64_t g = c.value("n_group", 1);
    if (spec.experts % g) fail(ErrorKind::input, "--experts", "{} is not a multiple of n_group {}", spec.experts, g);
  }
  if (spec.vocab > 0) c["vocab_size"] = spec.vocab;
  if (spec.format != StoredFormat::bf16) c["quantization_config"] = quantization_config_json(spec.format);
  return c;
}

namespace {

enum class Kind { linear, embed, norm, bias };
struct Planned {
  std::string name;  // module name for linears, tensor name otherwise
  Kind kind;
  int64_t out, in;   // vectors: out = length
  bool quantized;    // linear stored quantized
  uint64_t bytes;
};

uint64_t name_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull ^ (seed * 0x9e3779b97f4a7c15ull);
  for (unsigned char c : name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::vector<Planned> plan(const ModelConfig& cfg, StoredFormat fmt) {
  std::vector<Planned> v;
  const int64_t H = cfg.hidden_size, nh = cfg.num_attention_heads;
  auto lin = [&](const std::string& m, int64_t out, int64_t in, bool quantizable_fp8, bool routed_expert) {
    const bool q = (fmt == StoredFormat::fp8 && quantizable_fp8) || (fmt == StoredFormat::int4 && routed_expert);
    uint64_t b;
    if (!q) b = out * in * 2;
    else if (fmt == StoredFormat::fp8) b = out * in + ((out + 127) / 128) * ((in + 127) / 128) * 4;
    else b = out * ((in + 7) / 8) * 4 + out * ((in + 31) / 32) * 2 + 2 * 4;
    v.push_back({m, Kind::linear, out, in, q, b});
  };
  auto vec = [&](const std::string& n, int64_t len, Kind k) { v.push_back({n, k, len, 0, false, static_cast<uint64_t>(len) * (k == Kind::bias ? 4 : 2)}); };
  v.push_back({"model.embed_tokens.weight", Kind::embed, cfg.vocab_size, H, false, static_cast<uint64_t>(cfg.vocab_size * H * 2)});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    vec(p + ".input_layernorm.weight", H, Kind::norm);
    vec(p + ".post_attention_layernorm.weight", H, Kind::norm);
    const int64_t qdim = nh * cfg.qk_head_dim();
    if (cfg.q_lora_rank) {
      lin(p + ".self_attn.q_a_proj", *cfg.q_lora_rank, H, true, false);
      vec(p + ".self_attn.q_a_layernorm.weight", *cfg.q_lora_rank, Kind::norm);
      lin(p + ".self_attn.q_b_proj", qdim, *cfg.q_lora_rank, true, false);
    } else {
      lin(p + ".self_attn.q_proj", qdim, H, true, false);
    }
    lin(p + ".self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, H, true, false);
    vec(p + ".self_attn.kv_a_layernorm.weight", cfg.kv_lora_rank, Kind::norm);
    lin(p + ".self_attn.kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, true, false);
    lin(p + ".self_attn.o_proj", H, nh * cfg.v_head_dim, true, false);
    auto mlp = [&](const std::string& m, int64_t I, bool routed) {
      lin(m + ".gate_proj", I, H, true, routed);
      lin(m + ".up_proj", I, H, true, routed);
      lin(m + ".down_proj", H, I, true, routed);
    };
    if (cfg.is_moe_layer(l)) {
      lin(p + ".mlp.gate", cfg.n_routed_experts, H, false, false);
      vec(p + ".mlp.gate.e_score_correction_bias", cfg.n_routed_experts, Kind::bias);
      for (int64_t e = 0; e < cfg.n_routed_experts; ++e) mlp(p + ".mlp.experts." + std::to_string(e), cfg.moe_intermediate_size, true);
      if (cfg.n_shared_experts) mlp(p + ".mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts, false);
    } else {
      mlp(p + ".mlp", cfg.intermediate_size, false);
    }
  }
  vec("model.norm.weight", H, Kind::norm);
  v.push_back({"lm_head", Kind::linear, cfg.vocab_size, H, false, static_cast<uint64_t>(cfg.vocab_size * H * 2)});
  return v;
}

std::vector<uint8_t> bf16_bytes(const std::vector<float>& f) {
  std::vector<uint8_t> b(f.size() * 2);
  for (size_t i = 0; i < f.size(); ++i) {
    const uint16_t h = f32_to_bf16(f[i]);
    std::memcpy(b.data() + 2 * i, &h, 2);
  }
  return b;
}

}  // namespace

namespace {
// Sizes the vocabulary and special ids from a tokenizer and copies its files into out_dir.
void attach_tokenizer(const std::string& tok_dir, const std::string& out_dir, json& c) {
  const auto t = Tokenizer::load(tok_dir);
  int64_t vocab;
  auto id = [&](const char* s) -> json {
    auto v = t->token_id(s);
    return v ? json(*v) : json(nullptr);
  };
  if (t->kind() == Tokenizer::Kind::tiktoken) {
    vocab = t->size() - 2;
    c["bos_token_id"] = id("[BOS]");
    json eos = json::array();
    for (const char* s : {"<|im_end|>", "[EOS]"})
      if (auto v = t->token_id(s)) eos.push_back(*v);
    c["eos_token_id"] = eos;
    c["pad_token_id"] = id("[PAD]");
  } else {
    vocab = (t->size() + 127) / 128 * 128;
    c["bos_token_id"] = id("<｜begin▁of▁sentence｜>");
    c["eos_token_id"] = id("<｜end▁of▁sentence｜>");
    c["pad_token_id"] = id("<｜end▁of▁sentence｜>");
  }
  c["vocab_size"] = vocab;
  fs::create_directories(out_dir);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "tiktoken.model"}) {
    const fs::path src = fs::path(tok_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, fs::path(out_dir) / f, fs::copy_options::overwrite_existing);
  }
}
}  // namespace

void make_model(const std::string& out_dir, const MakeModelSpec& spec,
                const std::function<void(uint64_t, uint64_t)>& progress) {
  json cj = preset_config(spec);
  fs::create_directories(out_dir);
  if (!spec.tokenizer_dir.empty()) attach_tokenizer(spec.tokenizer_dir, out_dir, cj);
  const std::string cfg_path = (fs::path(out_dir) / "config.json").string();
  {
    std::ofstream f(cfg_path + ".tmp");
    f << cj.dump(2) << "\n";
    if (!f) fail(ErrorKind::io, cfg_path, "write failed");
  }
  fs::rename(cfg_path + ".tmp", cfg_path);
  const ModelConfig cfg = parse_config(cj.dump(), cfg_path);
  const auto items = plan(cfg, spec.format);

  // shard assignment by size, in order
  std::vector<std::vector<size_t>> shards(1);
  uint64_t cur = 0, total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    if (cur > 0 && cur + items[i].bytes > spec.shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += items[i].bytes;
    total += items[i].bytes;
  }
  json weight_map = json::object();
  uint64_t done = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string fname = shards.size() == 1 ? "model.safetensors"
                                                 : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards.size());
    SafetensorsWriter w((fs::path(out_dir) / fname).string(), {{"format", "pt"}});
    for (size_t i : shards[s]) {
      const Planned& p = items[i];
      std::vector<std::string> names;
      if (p.kind != Kind::linear) {
        w.declare(p.name, p.kind == Kind::bias ? DType::F32 : DType::BF16, p.kind == Kind::embed ? std::vector<int64_t>{p.out, p.in} : std::vector<int64_t>{p.out});
        names.push_back(p.name);
      } else if (!p.quantized) {
        w.declare(p.name + ".weight", DType::BF16, {p.out, p.in});
        names.push_back(p.name + ".weight");
      } else if (spec.format == StoredFormat::fp8) {
        w.declare(p.name + ".weight", DType::F8_E4M3, {p.out, p.in});
        w.declare(p.name + ".weight_scale_inv", DType::F32, {(p.out + 127) / 128, (p.in + 127) / 128});
        names = {p.name + ".weight", p.name + ".weight_scale_inv"};
      } else {
        w.declare(p.name + ".weight_packed", DType::I32, {p.out, (p.in + 7) / 8});
        w.declare(p.name + ".weight_scale", DType::BF16, {p.out, (p.in + 31) / 32});
        w.declare(p.name + ".weight_shape", DType::I32, {2});
        names = {p.name + ".weight_packed", p.name + ".weight_scale", p.name + ".weight_shape"};
      }
      for (auto& n : names) weight_map[n] = fname;
    }
    // Tensors are made in parallel, a pool-sized batch at a time (each from its own name-seeded generator, so the
    // bytes do not depend on the thread count), and written in order.
    const auto make = [&](const Planned& p) {
      std::vector<std::vector<uint8_t>> out;  // one part per declared tensor
      auto put = [&out](const void* d, size_t n) {
        out.emplace_back(n);
        std::memcpy(out.back().data(), d, n);
      };
      std::mt19937_64 rng(name_seed(spec.seed, p.name));
      std::normal_distribution<float> nd(0.0f, 1.0f);
      const int64_t numel = p.kind == Kind::linear || p.kind == Kind::embed ? p.out * p.in : p.out;
      std::vector<float> f(numel);
      const float stdv = p.kind == Kind::linear ? 1.0f / std::sqrt(static_cast<float>(p.in)) : p.kind == Kind::embed ? 1.0f : 0.1f;
      for (auto& x : f) x = nd(rng) * stdv;
      if (p.kind == Kind::norm)
        for (auto& x : f) x += 1.0f;
      if (p.kind == Kind::bias) {
        put(f.data(), f.size() * 4);
      } else if (!p.quantized) {
        const auto b = bf16_bytes(f);
        put(b.data(), b.size());
      } else if (spec.format == StoredFormat::fp8) {
        for (auto& x : f) x = bf16_to_f32(f32_to_bf16(x));  // quantize from the bf16 master, as checkpoints are made
        std::vector<uint8_t> q;
        std::vector<float> sc;
        quantize_fp8_block(f.data(), p.out, p.in, 128, 128, q, sc);
        put(q.data(), q.size());
        put(sc.data(), sc.size() * 4);
      } else {
        for (auto& x : f) x = bf16_to_f32(f32_to_bf16(x));
        std::vector<int32_t> q;
        std::vector<uint16_t> sc;
        quantize_int4_group(f.data(), p.out, p.in, 32, q, sc);
        const int32_t shape[2] = {static_cast<int32_t>(p.out), static_cast<int32_t>(p.in)};
        put(q.data(), q.size() * 4);
        put(sc.data(), sc.size() * 2);
        put(shape, 8);
      }
      return out;
    };
    ThreadPool& pool = ThreadPool::global();
    const size_t batch = std::max<size_t>(1, pool.size());
    for (size_t b0 = 0; b0 < shards[s].size(); b0 += batch) {
      const size_t nb = std::min(batch, shards[s].size() - b0);
      std::vector<std::vector<std::vector<uint8_t>>> blobs(nb);
      pool.parallel_for(static_cast<int64_t>(nb), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t j = lo; j < hi; ++j) blobs[j] = make(items[shards[s][b0 + j]]);
      });
      for (size_t j = 0; j < nb; ++j) {
        for (auto& part : blobs[j]) w.write(part.data(), part.size());
        blobs[j] = {};
        done += items[shards[s][b0 + j]].bytes;
        if (progress) progress(done, total);
      }
    }
    w.finish();
  }
  if (shards.size() > 1) {
    const std::string ip = (fs::path(out_dir) / "model.safetensors.index.json").string();
    std::ofstream f(ip + ".tmp");
    f << json({{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}).dump(2) << "\n";
    f.close();
    fs::rename(ip + ".tmp", ip);
  }
}

}  // namespace kscope

namespace kscope {

void quantize_checkpoint(const std::string& in_dir, const std::string& out_dir, StoredFormat f,
                         const std::function<void(uint64_t, uint64_t)>& progress) {
  if (f == StoredFormat::bf16) fail(ErrorKind::input, "--format", "quantize writes fp8 or int4");
  const ModelConfig cfg = load_config(in_dir);
  if (cfg.quant.method != QuantMethod::none)
    fail(ErrorKind::input, in_dir, "is already quantized: quantize an unquantized (BF16/F16/F32) checkpoint");
  ModelWeights::load(cfg, in_dir);  // the source must be a valid checkpoint
  const TensorStore st = TensorStore::open(in_dir);
  if (fs::exists(out_dir) && !fs::is_empty(out_dir))
    fail(ErrorKind::input, out_dir, "directory is not empty");
  fs::create_directories(out_dir);
  // config: the source's, plus the quantization_config
  json cj = json::parse(std::ifstream(fs::path(in_dir) / "config.json"));
  cj["quantization_config"] = quantization_config_json(f);
  {
    std::ofstream o(fs::path(out_dir) / "config.json");
    o << cj.dump(2) << "\n";
  }
  for (const char* t : {"tokenizer.json", "tokenizer_config.json", "tiktoken.model", "generation_config.json"})
    if (fs::exists(fs::path(in_dir) / t)) fs::copy_file(fs::path(in_dir) / t, fs::path(out_dir) / t);
  // one shard per source shard, same tensor order
  uint64_t total = 0, done = 0;
  for (auto& [n, t] : st.all()) total += t->nbytes;
  json weight_map = json::object();
  const bool sharded = st.files().size() > 1;
  for (const auto& file : st.files()) {
    const std::string fname = fs::path(file->path()).filename().string();
    SafetensorsWriter w((fs::path(out_dir) / fname).string(), {{"format", "pt"}});
    for (auto& [name, t] : file->tensors()) {
      const std::string stem = name.substr(0, name.size() - 7);
      if (!stored_quantized(name, f)) {
        w.declare(name, t.dtype, t.shape);
        weight_map[name] = fname;
      } else if (f == StoredFormat::fp8) {
        w.declare(name, DType::F8_E4M3, t.shape);
        w.declare(stem + ".weight_scale_inv", DType::F32, {(t.shape[0] + 127) / 128, (t.shape[1] + 127) / 128});
        weight_map[name] = weight_map[stem + ".weight_scale_inv"] = fname;
      } else {
        if (t.shape[1] % 32) fail(ErrorKind::input, t.file + ": tensor '" + name + "'", "input dim {} is not a multiple of the group size 32", t.shape[1]);
        w.declare(stem + ".weight_packed", DType::I32, {t.shape[0], (t.shape[1] + 7) / 8});
        w.declare(stem + ".weight_scale", DType::BF16, {t.shape[0], (t.shape[1] + 31) / 32});
        w.declare(stem + ".weight_shape", DType::I32, {2});
        weight_map[stem + ".weight_packed"] = weight_map[stem + ".weight_scale"] = weight_map[stem + ".weight_shape"] = fname;
      }
    }
    for (auto& [name, t] : file->tensors()) {
      if (!stored_quantized(name, f)) {
        w.write(t.data, t.nbytes);
      } else {
        const std::vector<float> v = to_f32(t);
        const int64_t out = t.shape[0], in = t.shape[1];
        if (f == StoredFormat::fp8) {
          std::vector<uint8_t> q;
          std::vector<float> s;
          quantize_fp8_block(v.data(), out, in, 128, 128, q, s);
          w.write(q.data(), q.size());
          w.write(s.data(), s.size() * 4);
        } else {
          std::vector<int32_t> q;
          std::vector<uint16_t> s;
          quantize_int4_group(v.data(), out, in, 32, q, s);
          const int32_t shape[2] = {static_cast<int32_t>(out), static_cast<int32_t>(in)};
          w.write(q.data(), q.size() * 4);
          w.write(s.data(), s.size() * 2);
          w.write(shape, 8);
        }
      }
      done += t.nbytes;
      if (progress) progress(done, total);
    }
    w.finish();
  }
  if (sharded) {
    std::ofstream o(fs::path(out_dir) / "model.safetensors.index.json");
    o << json({{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}).dump(2) << "\n";
  }
  const ModelConfig qc = load_config(out_dir);
  ModelWeights::load(qc, out_dir);  // what we wrote must load
}

}  // namespace kscope
