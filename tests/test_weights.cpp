// Weights kept in their stored format: dequantization matches independent decoders; a checkpoint that
// contradicts its config is refused with the tensor named; make-model output loads in every format.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "model/make_model.hpp"
#include "model/model.hpp"
#include "model/quantize.hpp"
#include "backend/cpu/cpu_backend.hpp"
#include "testutil.hpp"
#include "util/error.hpp"
#include "util/numeric.hpp"

using namespace kscope;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::map<std::string, OwnedTensor> read_all(const std::string& file) {
  SafetensorsFile f(file);
  std::map<std::string, OwnedTensor> m;
  for (auto& [n, t] : f.tensors()) m[n] = {t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)};
  return m;
}

// A small dsv3-shaped checkpoint in `fmt`, one file.
std::string make(const test::TempDir& d, const std::string& fmt, const std::string& preset = "dsv3-tiny") {
  MakeModelSpec s;
  s.preset = preset;
  s.format = parse_stored_format(fmt);
  s.seed = 3;
  s.shard_bytes = 1ull << 40;
  const std::string out = d.str() + "/" + preset + "-" + fmt;
  make_model(out, s);
  return out;
}

void expect_load_error(const std::string& dir, std::initializer_list<std::string> fragments) {
  try {
    Model::load(dir);
    FAIL() << "loaded a broken checkpoint";
  } catch (const Error& e) {
    for (auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << "missing '" << f << "' in: " << e.what();
  }
}

TEST(Weights, int4_rows_decode_as_compressed_tensors_packs_them) {
  // Independent decoder, written from the compressed-tensors format: column block j of 8 in int32 j, element
  // 8j+i in bits 4i, stored q+8.
  const int64_t out = 3, in = 72;  // in is not a multiple of 32: the last group is partial
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> w(out * in);
  for (auto& x : w) x = nd(rng);
  std::vector<int32_t> packed;
  std::vector<uint16_t> scale;
  quantize_int4_group(w.data(), out, in, 32, packed, scale);
  ASSERT_EQ(packed.size(), static_cast<size_t>(out * 9));
  ASSERT_EQ(scale.size(), static_cast<size_t>(out * 3));
  TensorInfo pt{"p", DType::I32, {out, 9}, reinterpret_cast<const uint8_t*>(packed.data()), packed.size() * 4, "mem"};
  TensorInfo st{"s", DType::BF16, {out, 3}, reinterpret_cast<const uint8_t*>(scale.data()), scale.size() * 2, "mem"};
  Linear l;
  l.out = out;
  l.in = in;
  l.format = WeightFormat::int4_group;
  l.weight = &pt;
  l.scale = &st;
  l.group = 32;
  std::vector<float> row(in);
  double err2 = 0, ref2 = 0;
  for (int64_t r = 0; r < out; ++r) {
    l.dequant_row(r, row.data());
    for (int64_t c = 0; c < in; ++c) {
      const uint32_t word = static_cast<uint32_t>(packed[r * 9 + c / 8]);
      const int q = static_cast<int>((word >> (4 * (c % 8))) & 0xf) - 8;
      const float want = q * bf16_to_f32(scale[r * 3 + c / 32]);
      ASSERT_EQ(row[c], want) << r << "," << c;
      err2 += (row[c] - w[r * in + c]) * (row[c] - w[r * in + c]);
      ref2 += w[r * in + c] * w[r * in + c];
    }
  }
  // 4-bit symmetric with amax/7.5 steps: the rounding error is at most half a step, ~0.1 of the rms
  EXPECT_LT(std::sqrt(err2 / ref2), 0.15);
  EXPECT_GT(std::sqrt(err2 / ref2), 0.01);  // and it is really quantized
}

TEST(Weights, fp8_rows_use_the_scale_of_their_128x128_block_including_partial_edges) {
  const int64_t out = 200, in = 150;  // partial blocks on both edges
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  std::vector<float> w(out * in);
  for (int64_t i = 0; i < out * in; ++i) w[i] = nd(rng) * (1 + (i % in) / 40);  // blocks of different range
  std::vector<uint8_t> q;
  std::vector<float> s;
  quantize_fp8_block(w.data(), out, in, 128, 128, q, s);
  ASSERT_EQ(s.size(), 4u);
  TensorInfo qt{"q", DType::F8_E4M3, {out, in}, q.data(), q.size(), "mem"};
  TensorInfo stt{"s", DType::F32, {2, 2}, reinterpret_cast<const uint8_t*>(s.data()), s.size() * 4, "mem"};
  Linear l;
  l.out = out;
  l.in = in;
  l.format = WeightFormat::fp8_block;
  l.weight = &qt;
  l.scale = &stt;
  l.block_out = l.block_in = 128;
  std::vector<float> row(in);
  for (int64_t r : {0L, 127L, 128L, 199L}) {
    l.dequant_row(r, row.data());
    for (int64_t c = 0; c < in; ++c) {
      ASSERT_EQ(row[c], fp8_e4m3_to_f32(q[r * in + c]) * s[(r / 128) * 2 + c / 128]);
      ASSERT_NEAR(row[c], w[r * in + c], std::fabs(w[r * in + c]) * 0.0625 + s[(r / 128) * 2 + c / 128] * 0.002);
    }
  }
}

TEST(Weights, make_model_output_loads_in_every_format_and_runs) {
  test::TempDir d;
  for (std::string fmt : {"bf16", "fp8", "int4"}) {
    const auto dir = make(d, fmt);
    auto m = Model::load(dir);
    KvCache c = m->new_cache();
    std::vector<int32_t> ids = {1, 5, 9, 200};
    std::vector<ForwardItem> items{{&c, ids.data(), 4, true}};
    std::vector<std::vector<float>> logits;
    m->forward(items, logits);
    ASSERT_EQ(logits[0].size(), 4u * 512);
    double norm = 0;
    for (float x : logits[0]) {
      ASSERT_TRUE(std::isfinite(x));
      norm += x * x;
    }
    EXPECT_GT(norm, 0) << fmt;
    const auto& moe = *m->weights().layers[2].moe;
    EXPECT_EQ(moe.experts[0].gate.format, fmt == "bf16" ? WeightFormat::dense : fmt == "fp8" ? WeightFormat::fp8_block : WeightFormat::int4_group);
    // int4 (Kimi-Thinking style) keeps attention and shared experts in bf16; fp8 quantizes them
    EXPECT_EQ(m->weights().layers[2].attn.o_proj.format, fmt == "fp8" ? WeightFormat::fp8_block : WeightFormat::dense);
    EXPECT_EQ(moe.router.format, WeightFormat::dense);
  }
}

TEST(Weights, quantized_linears_stay_within_their_formats_rounding_of_the_bf16_source) {
  // make-model quantizes every format from the same bf16 master weights (same seed and tensor name), so a
  // quantized linear differs from its bf16 twin only by the format's rounding. For Gaussian weights:
  //   e4m3 keeps 3 mantissa bits: relative rounding error <= 1/16 per weight, ~3% rms;
  //   int4 with s = amax/7.5 over 32 weights (amax ~ 2.1 sigma): step ~0.28 sigma, rms error ~0.08 sigma.
  // On y = W x with random x the relative error of y is the weights' rms relative error.
  test::TempDir d;
  auto bf = Model::load(make(d, "bf16")), f8 = Model::load(make(d, "fp8")), i4 = Model::load(make(d, "int4"));
  CpuBackend be;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  std::vector<float> x(4 * 192);
  for (auto& v : x) v = nd(rng);
  auto y = [&](const Linear& l) {
    std::vector<float> out(4 * l.out);
    be.linear(l, x.data(), 4, out.data());
    return out;
  };
  const auto& ref = bf->weights().layers[2].moe->experts[7].gate;
  const double e8 = test::rel_err(y(f8->weights().layers[2].moe->experts[7].gate), y(ref));
  const double e4 = test::rel_err(y(i4->weights().layers[2].moe->experts[7].gate), y(ref));
  EXPECT_GT(e8, 0.01);
  EXPECT_LT(e8, 0.05);
  EXPECT_GT(e4, 0.04);
  EXPECT_LT(e4, 0.15);
  // attention stays bf16 in the int4 (Kimi-K2-Thinking) layout: bit-identical
  ASSERT_EQ(i4->weights().layers[2].attn.kv_a_proj.format, WeightFormat::dense);
  EXPECT_EQ(y(i4->weights().layers[2].attn.kv_a_proj), y(bf->weights().layers[2].attn.kv_a_proj));
}

TEST(Weights, missing_extra_and_misshapen_tensors_are_named) {
  test::TempDir d;
  const auto dir = make(d, "bf16");
  const auto file = dir + "/model.safetensors";
  const auto orig = read_all(file);

  auto t = orig;
  t.erase("model.layers.1.self_attn.kv_b_proj.weight");
  write_safetensors(file, t);
  expect_load_error(dir, {"missing tensor", "model.layers.1.self_attn.kv_b_proj.weight"});

  t = orig;
  t["model.layers.0.mlp.extra.weight"] = t["model.norm.weight"];
  write_safetensors(file, t);
  expect_load_error(dir, {"unexpected", "model.layers.0.mlp.extra.weight"});

  t = orig;
  auto& o = t["model.layers.3.self_attn.o_proj.weight"];
  o.shape = {o.shape[1], o.shape[0]};  // transposed
  write_safetensors(file, t);
  expect_load_error(dir, {"model.layers.3.self_attn.o_proj.weight", "shape [128, 192]", "[192, 128]"});

  t = orig;
  t["model.layers.0.input_layernorm.weight"].dtype = DType::I32;
  t["model.layers.0.input_layernorm.weight"].bytes.resize(192 * 4);
  write_safetensors(file, t);
  expect_load_error(dir, {"model.layers.0.input_layernorm.weight", "I32"});

  t = orig;
  t["model.layers.2.mlp.experts.0.up_proj.weight"].dtype = DType::I8;
  t["model.layers.2.mlp.experts.0.up_proj.weight"].bytes.resize(64 * 192);
  write_safetensors(file, t);
  expect_load_error(dir, {"model.layers.2.mlp.experts.0.up_proj.weight", "I8", "not a weight format"});

  t = orig;  // MTP layer tensors after the last layer are skipped, but only if the config declares them
  t["model.layers.4.eh_proj.weight"] = t["model.norm.weight"];
  write_safetensors(file, t);
  expect_load_error(dir, {"model.layers.4.eh_proj.weight"});
  auto cfg = json::parse(test::read_file(dir + "/config.json"));
  cfg["num_nextn_predict_layers"] = 1;
  test::write_file(dir + "/config.json", cfg.dump());
  EXPECT_EQ(Model::load(dir)->weights().ignored, std::vector<std::string>{"model.layers.4.eh_proj.weight"});
}

TEST(Weights, a_config_that_contradicts_the_weights_is_refused) {
  test::TempDir d;
  const auto dir = make(d, "bf16");
  auto cfg = json::parse(test::read_file(dir + "/config.json"));
  auto bad = cfg;
  bad["hidden_size"] = 256;
  test::write_file(dir + "/config.json", bad.dump());
  expect_load_error(dir, {"model.embed_tokens.weight", "[512, 192]", "[512, 256]"});
  bad = cfg;
  bad["q_lora_rank"] = 96;  // the checkpoint has q_proj, not q_a/q_b
  test::write_file(dir + "/config.json", bad.dump());
  expect_load_error(dir, {"model.layers.0.self_attn.q_proj.weight", "q_lora_rank is 96"});
  bad = cfg;
  bad["tie_word_embeddings"] = true;
  test::write_file(dir + "/config.json", bad.dump());
  expect_load_error(dir, {"lm_head.weight", "tie_word_embeddings"});
  bad = cfg;
  bad["first_k_dense_replace"] = 3;  // layer 2 holds experts, config says dense
  test::write_file(dir + "/config.json", bad.dump());
  expect_load_error(dir, {"model.layers.2.mlp.gate_proj.weight"});

  const auto fp8 = make(d, "fp8");
  cfg = json::parse(test::read_file(fp8 + "/config.json"));
  cfg.erase("quantization_config");
  test::write_file(fp8 + "/config.json", cfg.dump());
  expect_load_error(fp8, {"F8_E4M3", "no fp8 quantization_config"});

  const auto int4 = make(d, "int4");
  cfg = json::parse(test::read_file(int4 + "/config.json"));
  cfg["quantization_config"]["ignore"].push_back("re:.*experts.*");
  test::write_file(int4 + "/config.json", cfg.dump());
  expect_load_error(int4, {"quantization_config.ignore", "experts"});

  // int4 weight_shape that disagrees with the config
  cfg["quantization_config"]["ignore"].erase(cfg["quantization_config"]["ignore"].size() - 1);
  test::write_file(int4 + "/config.json", cfg.dump());
  auto t = read_all(int4 + "/model.safetensors");
  int32_t wrong[2] = {64, 200};
  std::memcpy(t["model.layers.3.mlp.experts.5.gate_proj.weight_shape"].bytes.data(), wrong, 8);
  write_safetensors(int4 + "/model.safetensors", t);
  expect_load_error(int4, {"model.layers.3.mlp.experts.5.gate_proj.weight_shape", "[64, 200]"});
}

TEST(Weights, tied_embeddings_use_the_embedding_as_lm_head) {
  test::TempDir d;
  const auto dir = make(d, "bf16");
  auto t = read_all(dir + "/model.safetensors");
  t.erase("lm_head.weight");
  write_safetensors(dir + "/model.safetensors", t);
  auto cfg = json::parse(test::read_file(dir + "/config.json"));
  cfg["tie_word_embeddings"] = true;
  test::write_file(dir + "/config.json", cfg.dump());
  auto m = Model::load(dir);
  EXPECT_EQ(m->weights().lm_head.weight, m->weights().embed);
}

TEST(Weights, sharded_make_model_output_has_an_index_and_loads) {
  test::TempDir d;
  MakeModelSpec s;
  s.preset = "tiny";
  s.shard_bytes = 1 << 20;
  make_model(d.str() + "/sh", s);
  EXPECT_TRUE(fs::exists(d.str() + "/sh/model.safetensors.index.json"));
  int shards = 0;
  for (auto& e : fs::directory_iterator(d.str() + "/sh")) shards += e.path().extension() == ".safetensors";
  EXPECT_GT(shards, 2);
  EXPECT_NO_THROW(Model::load(d.str() + "/sh"));
}

}  // namespace

namespace {

TEST(Quantize, kscope_quantize_reproduces_the_reference_quantizers_tensor_for_tensor) {
  // The fp8/int4 fixtures were quantized from the bf16 ones by scripts/reference/make_fixtures.py (the values HF's
  // golden outputs were computed from); kscope quantize must write exactly the same tensors.
  test::TempDir d;
  for (std::string arch : {"kimi", "dsv3"})
    for (std::string fmt : {"fp8", "int4"}) {
      const std::string out = d.str() + "/" + arch + "_" + fmt;
      quantize_checkpoint(test::fixtures() + "/reference/" + arch + "_bf16", out, parse_stored_format(fmt));
      const auto ours = TensorStore::open(out), ref = TensorStore::open(test::fixtures() + "/reference/" + arch + "_" + fmt);
      ASSERT_EQ(ours.all().size(), ref.all().size()) << arch << " " << fmt;
      int quantized = 0;
      for (auto& [name, t] : ref.all()) {
        const TensorInfo* o = ours.find(name);
        ASSERT_NE(o, nullptr) << name;
        EXPECT_EQ(o->dtype, t->dtype) << name;
        EXPECT_EQ(o->shape, t->shape) << name;
        ASSERT_EQ(o->nbytes, t->nbytes) << name;
        EXPECT_EQ(std::memcmp(o->data, t->data, t->nbytes), 0) << arch << " " << fmt << ": " << name;
        quantized += t->dtype == DType::F8_E4M3 || t->dtype == DType::I32;
      }
      EXPECT_GT(quantized, 10);
      // and it loads with the config's quantization_config
      EXPECT_NO_THROW(Model::load(out));
    }
  EXPECT_THROW(quantize_checkpoint(test::fixtures() + "/reference/kimi_fp8", d.str() + "/again", StoredFormat::int4), Error);
}

}  // namespace
