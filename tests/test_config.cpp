// config.json: both dialects seen in the wild parse to the same math; bad values name the field.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "model/config.hpp"
#include "model/make_model.hpp"
#include "testutil.hpp"
#include "util/error.hpp"

using namespace kscope;
using json = nlohmann::json;

namespace {

json kimi_hub() { return json::parse(test::read_file(test::fixtures() + "/reference/kimi_bf16/config.json")); }
json dsv3_v5() { return json::parse(test::read_file(test::fixtures() + "/reference/dsv3_bf16/config.json")); }

void expect_field_error(const json& j, const std::string& field, const std::string& fragment = "") {
  try {
    parse_config(j.dump(), "config.json");
    FAIL() << "accepted a bad '" << field << "'";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(m.find("config.json"), std::string::npos) << m;
    EXPECT_NE(m.find("'" + field + "'"), std::string::npos) << "does not name the field: " << m;
    if (!fragment.empty()) {
      EXPECT_NE(m.find(fragment), std::string::npos) << m;
    }
  }
}

TEST(Config, kimi_hub_dialect_reads_every_math_field) {
  const auto c = parse_config(kimi_hub().dump(), "kimi");
  EXPECT_EQ(c.model_type, "kimi_k2");
  EXPECT_EQ(c.hidden_size, 160);
  ASSERT_TRUE(c.q_lora_rank.has_value());
  EXPECT_EQ(*c.q_lora_rank, 96);
  EXPECT_EQ(c.kv_lora_rank, 64);
  EXPECT_EQ(c.qk_head_dim(), 48);
  EXPECT_EQ(c.n_group, 1);
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope.theta, 50000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.rope.beta_fast, 1.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 64);
  EXPECT_TRUE(c.rope.interleave);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.827);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c.quant.method, QuantMethod::none);
  // mscale == mscale_all_dim: cos/sin unscaled, softmax scale gets mscale^2
  EXPECT_DOUBLE_EQ(c.rope_attention_factor(), 1.0);
  const double m = 0.1 * std::log(32.0) + 1.0;
  EXPECT_NEAR(c.attention_scale(), m * m / std::sqrt(48.0), 1e-12);
}

TEST(Config, transformers5_dialect_reads_rope_parameters_and_null_q_lora) {
  const auto c = parse_config(dsv3_v5().dump(), "dsv3");
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_FALSE(c.q_lora_rank.has_value());
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.first_k_dense_replace, 2);
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 40.0);
  EXPECT_DOUBLE_EQ(c.rope.mscale, 0.9);
  EXPECT_DOUBLE_EQ(c.rope.mscale_all_dim, 0.8);
  const double f = (0.1 * 0.9 * std::log(40.0) + 1) / (0.1 * 0.8 * std::log(40.0) + 1);
  EXPECT_NEAR(c.rope_attention_factor(), f, 1e-12);
}

TEST(Config, the_two_dialects_of_one_model_are_the_same_math) {
  json hub = dsv3_v5();
  const json params = hub["rope_parameters"];
  hub.erase("rope_parameters");
  hub.erase("head_dim");
  hub.erase("qk_head_dim");
  hub["rope_theta"] = params["rope_theta"];
  json scaling = params;
  scaling.erase("rope_theta");
  scaling.erase("rope_type");
  scaling["type"] = "yarn";
  hub["rope_scaling"] = scaling;
  const auto a = parse_config(dsv3_v5().dump(), "v5"), b = parse_config(hub.dump(), "hub");
  EXPECT_EQ(a.identity_hash(), b.identity_hash());
  EXPECT_EQ(a.rope_inv_freq(), b.rope_inv_freq());
  EXPECT_EQ(a.attention_scale(), b.attention_scale());
}

TEST(Config, yarn_inverse_frequencies_blend_interpolation_and_extrapolation) {
  const auto c = parse_config(dsv3_v5().dump(), "dsv3");
  const auto inv = c.rope_inv_freq();
  ASSERT_EQ(inv.size(), 8u);
  // HF's rule by hand: dim 16, base 1e4, orig 64, beta 32/1 -> low = max(floor(neg), 0) = 0, high = ceil(1.72..) = 2
  const double dim = 16, base = 1e4;
  auto corr = [&](double rot) { return dim * std::log(64 / (rot * 2 * M_PI)) / (2 * std::log(base)); };
  const double low = std::max(std::floor(corr(32)), 0.0), high = std::min(std::ceil(corr(1)), dim - 1);
  for (int i = 0; i < 8; ++i) {
    const double pf = std::pow(base, 2 * i / dim);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double want = (1 / (40 * pf)) * ramp + (1 / pf) * (1 - ramp);
    EXPECT_NEAR(inv[i], want, 1e-6 * want) << i;
  }
  EXPECT_EQ(inv[0], 1.0);               // fully extrapolated (original frequency)
  EXPECT_NEAR(inv[7], 1.0 / (40 * std::pow(base, 14 / dim)), 1e-9);  // fully interpolated
}

TEST(Config, quantization_configs_of_both_shipped_formats_parse) {
  const auto fp8 = parse_config(test::read_file(test::fixtures() + "/reference/dsv3_fp8/config.json"), "fp8");
  EXPECT_EQ(fp8.quant.method, QuantMethod::fp8_block);
  EXPECT_EQ(fp8.quant.block_out, 128);
  const auto int4 = parse_config(test::read_file(test::fixtures() + "/reference/kimi_int4/config.json"), "int4");
  EXPECT_EQ(int4.quant.method, QuantMethod::int4_pack);
  EXPECT_EQ(int4.quant.group_size, 32);
  EXPECT_TRUE(int4.quant.ignored("lm_head"));
  EXPECT_TRUE(int4.quant.ignored("model.layers.1.self_attn.q_a_proj"));
  EXPECT_TRUE(int4.quant.ignored("model.layers.1.mlp.shared_experts.up_proj"));
  EXPECT_TRUE(int4.quant.ignored("model.layers.0.mlp.down_proj"));
  EXPECT_FALSE(int4.quant.ignored("model.layers.1.mlp.experts.3.down_proj"));
}

TEST(Config, unsupported_or_contradictory_values_name_the_field) {
  auto j = kimi_hub();
  j["model_type"] = "llama";
  expect_field_error(j, "model_type", "llama");
  j = kimi_hub();
  j.erase("hidden_size");
  expect_field_error(j, "hidden_size", "missing");
  j = kimi_hub();
  j["hidden_size"] = "big";
  expect_field_error(j, "hidden_size");
  j = kimi_hub();
  j["num_key_value_heads"] = 2;
  expect_field_error(j, "num_key_value_heads");
  j = kimi_hub();
  j["scoring_func"] = "relu";
  expect_field_error(j, "scoring_func", "relu");
  j = kimi_hub();
  j["topk_method"] = "magic";
  expect_field_error(j, "topk_method");
  j = kimi_hub();
  j["n_group"] = 3;
  expect_field_error(j, "n_group", "divide");
  j = kimi_hub();
  j["topk_group"] = 2;
  expect_field_error(j, "topk_group");
  j = kimi_hub();
  j["num_experts_per_tok"] = 99;
  expect_field_error(j, "num_experts_per_tok");
  j = kimi_hub();
  j["hidden_act"] = "gelu";
  expect_field_error(j, "hidden_act");
  j = kimi_hub();
  j["rope_scaling"]["type"] = "longrope";
  expect_field_error(j, "rope_scaling.type", "longrope");
  j = kimi_hub();
  j["rope_scaling"]["rope_type"] = "linear";  // both spellings present and different
  expect_field_error(j, "rope_scaling.rope_type", "contradicts");
  j = kimi_hub();
  j["rope_scaling"].erase("original_max_position_embeddings");
  expect_field_error(j, "rope_scaling.original_max_position_embeddings");
  j = dsv3_v5();
  j["rope_theta"] = 12345.0;  // contradicts rope_parameters.rope_theta
  expect_field_error(j, "rope_theta", "contradicts");
  j = dsv3_v5();
  j["qk_head_dim"] = 50;
  expect_field_error(j, "qk_head_dim");
  j = kimi_hub();
  j["eos_token_id"] = 100000;
  expect_field_error(j, "eos_token_id", "vocabulary");
  j = kimi_hub();
  j["qk_rope_head_dim"] = 15;
  expect_field_error(j, "qk_rope_head_dim", "even");
  j = kimi_hub();
  j["quantization_config"] = {{"quant_method", "gptq"}};
  expect_field_error(j, "quantization_config.quant_method", "gptq");
  j = kimi_hub();
  j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128}}};
  expect_field_error(j, "quantization_config.weight_block_size");
  j = json::parse(test::read_file(test::fixtures() + "/reference/kimi_int4/config.json"));
  j["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8;
  expect_field_error(j, "quantization_config.config_groups.group_0.weights.num_bits");
  j = json::parse(test::read_file(test::fixtures() + "/reference/kimi_int4/config.json"));
  j["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = false;
  expect_field_error(j, "quantization_config.config_groups.group_0.weights.symmetric");
  EXPECT_THROW(parse_config("{not json", "x"), Error);
}

}  // namespace

namespace {

TEST(Config, make_model_presets_have_the_published_dimensions) {
  kscope::MakeModelSpec s;
  s.preset = "kimi-k2-slice";
  s.layers = 3;
  auto c = parse_config(kscope::preset_config(s).dump(), "k2");
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.n_routed_experts, 384);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.num_attention_heads, 64);
  EXPECT_EQ(*c.q_lora_rank, 1536);
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.vocab_size, 163840);
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  s.preset = "dsv3-slice";
  s.layers = 0;
  c = parse_config(kscope::preset_config(s).dump(), "dsv3");
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.num_attention_heads, 128);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  s.format = kscope::StoredFormat::int4;
  c = parse_config(kscope::preset_config(s).dump(), "dsv3");
  EXPECT_EQ(c.quant.method, QuantMethod::int4_pack);
  EXPECT_TRUE(c.quant.ignored("model.layers.5.self_attn.kv_b_proj"));
}

}  // namespace
