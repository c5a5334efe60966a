#include "model/weights.hpp"

#include <cstring>
#include <set>

#include "util/error.hpp"
#include "util/numeric.hpp"

namespace kscope {

const char* format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::dense: return "dense";
    case WeightFormat::fp8_block: return "fp8-block";
    case WeightFormat::int4_group: return "int4-group";
  }
  return "?";
}

namespace {

inline float load_scalar(const TensorInfo& t, int64_t i) {
  switch (t.dtype) {
    case DType::F32: {
      float f;
      std::memcpy(&f, t.data + 4 * i, 4);
      return f;
    }
    case DType::BF16: {
      uint16_t v;
      std::memcpy(&v, t.data + 2 * i, 2);
      return bf16_to_f32(v);
    }
    case DType::F16: {
      uint16_t v;
      std::memcpy(&v, t.data + 2 * i, 2);
      return f16_to_f32(v);
    }
    default: return 0.0f;  // callers validated the dtype
  }
}

std::string where(const TensorInfo& t) { return t.file + ": tensor '" + t.name + "'"; }

bool is_float(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

void expect_shape(const TensorInfo& t, std::vector<int64_t> shape) {
  if (t.shape != shape) {
    TensorInfo tmp;
    tmp.shape = shape;
    fail(ErrorKind::weights, where(t), "shape {} but the config implies {}", t.shape_str(), tmp.shape_str());
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Loader {
  const ModelConfig& cfg;
  const TensorStore& st;
  std::set<std::string> used;

  const TensorInfo& get(const std::string& name) {
    used.insert(name);
    return st.get(name);
  }

  Linear linear(const std::string& m, int64_t out, int64_t in) {
    Linear l;
    l.name = m;
    l.out = out;
    l.in = in;
    if (const TensorInfo* w = st.find(m + ".weight")) {
      used.insert(w->name);
      expect_shape(*w, {out, in});
      if (w->dtype == DType::F8_E4M3) {
        if (cfg.quant.method != QuantMethod::fp8_block)
          fail(ErrorKind::weights, where(*w),
               "is F8_E4M3 but {} has no fp8 quantization_config (weight_block_size unknown)", cfg.source);
        l.format = WeightFormat::fp8_block;
        l.block_out = cfg.quant.block_out;
        l.block_in = cfg.quant.block_in;
        const std::string sname = m + ".weight_scale_inv";
        if (!st.has(sname)) fail(ErrorKind::weights, where(*w), "FP8 weight without its '{}'", sname);
        const TensorInfo& s = get(sname);
        if (s.dtype != DType::F32 && s.dtype != DType::BF16)
          fail(ErrorKind::weights, where(s), "dtype {} (expected F32)", dtype_name(s.dtype));
        expect_shape(s, {ceil_div(out, l.block_out), ceil_div(in, l.block_in)});
        l.scale = &s;
      } else if (is_float(w->dtype)) {
        l.format = WeightFormat::dense;
      } else {
        fail(ErrorKind::weights, where(*w), "dtype {} is not a weight format (expected F32, F16, BF16 or F8_E4M3)",
             dtype_name(w->dtype));
      }
      l.weight = w;
      return l;
    }
    if (const TensorInfo* p = st.find(m + ".weight_packed")) {
      used.insert(p->name);
      if (cfg.quant.method != QuantMethod::int4_pack)
        fail(ErrorKind::weights, where(*p), "is pack-quantized but {} has no compressed-tensors quantization_config",
             cfg.source);
      if (cfg.quant.ignored(m))
        fail(ErrorKind::weights, where(*p), "is quantized but quantization_config.ignore lists module '{}'", m);
      if (p->dtype != DType::I32) fail(ErrorKind::weights, where(*p), "dtype {} (expected I32)", dtype_name(p->dtype));
      l.format = WeightFormat::int4_group;
      l.group = cfg.quant.group_size;
      expect_shape(*p, {out, ceil_div(in, 8)});
      const std::string sn = m + ".weight_scale", shn = m + ".weight_shape";
      if (!st.has(sn)) fail(ErrorKind::weights, where(*p), "packed weight without its '{}'", sn);
      if (!st.has(shn)) fail(ErrorKind::weights, where(*p), "packed weight without its '{}'", shn);
      const TensorInfo& s = get(sn);
      if (!is_float(s.dtype)) fail(ErrorKind::weights, where(s), "dtype {} (expected BF16, F16 or F32)", dtype_name(s.dtype));
      expect_shape(s, {out, ceil_div(in, l.group)});
      const TensorInfo& shp = get(shn);
      if ((shp.dtype != DType::I32 && shp.dtype != DType::I64) || shp.numel() != 2)
        fail(ErrorKind::weights, where(shp), "expected 2 integers (I32 or I64)");
      int64_t dims[2];
      for (int i = 0; i < 2; ++i) {
        if (shp.dtype == DType::I32) {
          int32_t v;
          std::memcpy(&v, shp.data + 4 * i, 4);
          dims[i] = v;
        } else {
          std::memcpy(&dims[i], shp.data + 8 * i, 8);
        }
      }
      if (dims[0] != out || dims[1] != in)
        fail(ErrorKind::weights, where(shp), "says [{}, {}] but the config implies [{}, {}]", dims[0], dims[1], out, in);
      l.weight = p;
      l.scale = &s;
      return l;
    }
    fail(ErrorKind::weights, st.root(), "missing tensor '{}.weight' (or '{}.weight_packed')", m, m);
  }

  std::vector<float> vec(const std::string& name, int64_t n) {
    used.insert(name);
    return load_vector(st, name, n);
  }

  MlpWeights mlp(const std::string& m, int64_t inter) {
    const int64_t H = cfg.hidden_size;
    return {linear(m + ".gate_proj", inter, H), linear(m + ".up_proj", inter, H), linear(m + ".down_proj", H, inter)};
  }
};

}  // namespace

void Linear::dequant_row(int64_t row, float* dst) const {
  switch (format) {
    case WeightFormat::dense: {
      const uint8_t* base = weight->data;
      if (weight->dtype == DType::F32) {
        std::memcpy(dst, base + row * in * 4, in * 4);
      } else if (weight->dtype == DType::BF16) {
        // mmapped safetensors data is 8-byte aligned and bf16 tensors start at even offsets
        const auto* p = reinterpret_cast<const uint16_t*>(base + row * in * 2);
        auto* d = reinterpret_cast<uint32_t*>(dst);
        for (int64_t i = 0; i < in; ++i) d[i] = static_cast<uint32_t>(p[i]) << 16;  // vectorizes
      } else {
        const auto* p = reinterpret_cast<const uint16_t*>(base + row * in * 2);
        for (int64_t i = 0; i < in; ++i) dst[i] = f16_to_f32(p[i]);
      }
      return;
    }
    case WeightFormat::fp8_block: {
      const float* lut = fp8_e4m3_table().data();
      const uint8_t* q = weight->data + row * in;
      const int64_t nbi = (in + block_in - 1) / block_in;
      const int64_t srow = (row / block_out) * nbi;
      for (int64_t bi = 0; bi < nbi; ++bi) {
        const float s = load_scalar(*scale, srow + bi);
        const int64_t e = std::min(in, (bi + 1) * block_in);
        for (int64_t i = bi * block_in; i < e; ++i) dst[i] = lut[q[i]] * s;
      }
      return;
    }
    case WeightFormat::int4_group: {
      const int64_t ncols = (in + 7) / 8;
      const uint8_t* p = weight->data + row * ncols * 4;
      const int64_t ng = (in + group - 1) / group;
      for (int64_t g = 0; g < ng; ++g) {
        const float s = load_scalar(*scale, row * ng + g);
        const int64_t e = std::min(in, (g + 1) * group);
        for (int64_t i = g * group; i < e; i += 8) {
          uint32_t word;
          std::memcpy(&word, p + (i / 8) * 4, 4);
          const int64_t m = std::min<int64_t>(8, e - i);
          for (int64_t k = 0; k < m; ++k) dst[i + k] = static_cast<float>(static_cast<int>((word >> (4 * k)) & 15u) - 8) * s;
        }
      }
      return;
    }
  }
}

std::vector<float> load_vector(const TensorStore& st, const std::string& name, int64_t n) {
  const TensorInfo& t = st.get(name);
  if (!is_float(t.dtype)) fail(ErrorKind::weights, where(t), "dtype {} (expected a float type)", dtype_name(t.dtype));
  if (t.shape != std::vector<int64_t>{n}) fail(ErrorKind::weights, where(t), "shape {} but the config implies [{}]", t.shape_str(), n);
  return to_f32(t);
}

ModelWeights ModelWeights::load(const ModelConfig& cfg, const std::string& path) {
  ModelWeights mw;
  mw.store = TensorStore::open(path);
  Loader L{cfg, mw.store, {}};
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size, nh = cfg.num_attention_heads;

  mw.embed = &L.get("model.embed_tokens.weight");
  if (!is_float(mw.embed->dtype))
    fail(ErrorKind::weights, where(*mw.embed), "dtype {} (expected F32, F16 or BF16)", dtype_name(mw.embed->dtype));
  expect_shape(*mw.embed, {V, H});
  if (cfg.tie_word_embeddings) {
    if (mw.store.has("lm_head.weight"))
      fail(ErrorKind::weights, mw.store.get("lm_head.weight").file,
           "tensor 'lm_head.weight' present but tie_word_embeddings is true in {}", cfg.source);
    mw.lm_head.name = "model.embed_tokens";
    mw.lm_head.out = V;
    mw.lm_head.in = H;
    mw.lm_head.weight = mw.embed;
  } else {
    mw.lm_head = L.linear("lm_head", V, H);
  }
  mw.final_norm = L.vec("model.norm.weight", H);

  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    LayerWeights lw;
    lw.input_norm = L.vec(p + ".input_layernorm.weight", H);
    lw.post_attention_norm = L.vec(p + ".post_attention_layernorm.weight", H);
    auto& a = lw.attn;
    const int64_t qdim = nh * cfg.qk_head_dim();
    if (cfg.q_lora_rank) {
      if (mw.store.has(p + ".self_attn.q_proj.weight"))
        fail(ErrorKind::weights, mw.store.get(p + ".self_attn.q_proj.weight").file,
             "tensor '{}.self_attn.q_proj.weight' present but q_lora_rank is {} in {}", p, *cfg.q_lora_rank, cfg.source);
      a.q_a_proj = L.linear(p + ".self_attn.q_a_proj", *cfg.q_lora_rank, H);
      a.q_a_norm = L.vec(p + ".self_attn.q_a_layernorm.weight", *cfg.q_lora_rank);
      a.q_b_proj = L.linear(p + ".self_attn.q_b_proj", qdim, *cfg.q_lora_rank);
    } else {
      a.q_proj = L.linear(p + ".self_attn.q_proj", qdim, H);
    }
    a.kv_a_proj = L.linear(p + ".self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, H);
    a.kv_a_norm = L.vec(p + ".self_attn.kv_a_layernorm.weight", cfg.kv_lora_rank);
    a.kv_b_proj = L.linear(p + ".self_attn.kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank);
    a.o_proj = L.linear(p + ".self_attn.o_proj", H, nh * cfg.v_head_dim);
    if (cfg.is_moe_layer(l)) {
      MoeWeights m;
      m.router = L.linear(p + ".mlp.gate", cfg.n_routed_experts, H);
      if (m.router.format != WeightFormat::dense)
        fail(ErrorKind::weights, m.router.weight->file, "router '{}.mlp.gate.weight' must be unquantized", p);
      const std::string bias = p + ".mlp.gate.e_score_correction_bias";
      if (mw.store.has(bias)) m.score_bias = L.vec(bias, cfg.n_routed_experts);
      else if (cfg.topk_method == TopkMethod::noaux_tc)
        fail(ErrorKind::weights, mw.store.root(), "missing tensor '{}' (topk_method noaux_tc needs it)", bias);
      m.experts.reserve(cfg.n_routed_experts);
      for (int64_t e = 0; e < cfg.n_routed_experts; ++e)
        m.experts.push_back(L.mlp(p + ".mlp.experts." + std::to_string(e), cfg.moe_intermediate_size));
      if (cfg.n_shared_experts > 0)
        m.shared = L.mlp(p + ".mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts);
      lw.moe = std::move(m);
    } else {
      lw.mlp = L.mlp(p + ".mlp", cfg.intermediate_size);
    }
    mw.layers.push_back(std::move(lw));
  }

  // Every tensor must be accounted for: MTP layers (after the last layer) are known and skipped.
  std::vector<std::string> unexpected;
  for (auto& [name, t] : mw.store.all()) {
    if (L.used.count(name)) continue;
    if (name.rfind("model.layers.", 0) == 0) {
      const int64_t li = std::atoll(name.c_str() + 13);
      if (li >= cfg.num_hidden_layers && li < cfg.num_hidden_layers + cfg.num_nextn_predict_layers) {
        mw.ignored.push_back(name);
        continue;
      }
    }
    unexpected.push_back(name);
  }
  if (!unexpected.empty()) {
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 5; ++i) list += (i ? ", " : "") + unexpected[i];
    if (unexpected.size() > 5) list += fmt::format(" and {} more", unexpected.size() - 5);
    fail(ErrorKind::weights, mw.store.root(), "{} unexpected tensor(s) the config does not use: {}", unexpected.size(),
         list);
  }
  return mw;
}

}  // namespace kscope
