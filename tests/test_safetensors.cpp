// safetensors: round trips, sharded indexes, and a clear error for every kind of lying or broken file.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.hpp"
#include "testutil.hpp"
#include "util/error.hpp"
#include "util/numeric.hpp"

using namespace kscope;
using json = nlohmann::json;

namespace {

// Writes a file with an arbitrary header and data region (for building broken files).
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream f(path, std::ios::binary);
  const uint64_t n = header.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f << header;
  std::string data(data_bytes, '\x01');
  f << data;
}

// Expects opening to throw an Error whose message contains every fragment.
void expect_error(const std::string& path, std::initializer_list<std::string> fragments) {
  try {
    SafetensorsFile f(path);
    FAIL() << "opened a broken file: " << path;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "error does not name the file: " << msg;
    for (auto& fr : fragments) EXPECT_NE(msg.find(fr), std::string::npos) << "missing '" << fr << "' in: " << msg;
  }
}

OwnedTensor f32_tensor(std::vector<int64_t> shape, float start) {
  OwnedTensor t{DType::F32, shape, {}};
  int64_t n = 1;
  for (auto s : shape) n *= s;
  t.bytes.resize(n * 4);
  for (int64_t i = 0; i < n; ++i) {
    const float v = start + i;
    std::memcpy(t.bytes.data() + 4 * i, &v, 4);
  }
  return t;
}

TEST(Safetensors, written_tensors_read_back_bit_exact_with_metadata) {
  test::TempDir d;
  const std::string p = d.str() + "/a.safetensors";
  std::map<std::string, OwnedTensor> ts;
  ts["x"] = f32_tensor({2, 3}, 1.5f);
  ts["y"] = {DType::BF16, {4}, {1, 2, 3, 4, 5, 6, 7, 8}};
  ts["z"] = {DType::I8, {3}, {9, 8, 7}};
  ts["empty"] = {DType::F32, {0, 5}, {}};
  write_safetensors(p, ts, {{"format", "pt"}});
  SafetensorsFile f(p);
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  for (auto& [name, t] : ts) {
    const auto& r = f.tensors().at(name);
    EXPECT_EQ(r.dtype, t.dtype);
    EXPECT_EQ(r.shape, t.shape);
    ASSERT_EQ(r.nbytes, t.bytes.size());
    EXPECT_EQ(0, std::memcmp(r.data, t.bytes.data(), r.nbytes)) << name;
  }
  EXPECT_EQ(to_f32(f.tensors().at("x"))[5], 6.5f);
  // the header is padded so the data region starts 8-byte aligned
  const std::string raw = test::read_file(p);
  uint64_t hlen;
  std::memcpy(&hlen, raw.data(), 8);
  EXPECT_EQ((8 + hlen) % 8, 0u);
}

TEST(Safetensors, every_dtype_is_read) {
  test::TempDir d;
  std::map<std::string, OwnedTensor> ts;
  for (auto [name, dt] : std::vector<std::pair<std::string, DType>>{{"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
                                                                   {"F8_E4M3", DType::F8_E4M3}, {"I8", DType::I8}, {"I32", DType::I32},
                                                                   {"I64", DType::I64}, {"U8", DType::U8}, {"BOOL", DType::BOOL}})
    ts[name] = {dt, {3}, std::vector<uint8_t>(3 * dtype_size(dt), 1)};
  write_safetensors(d.str() + "/all.safetensors", ts);
  SafetensorsFile f(d.str() + "/all.safetensors");
  for (auto& [name, t] : f.tensors()) EXPECT_STREQ(dtype_name(t.dtype), name.c_str());
}

TEST(Safetensors, half_and_fp8_conversions_are_exact) {
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  for (uint32_t h = 0; h < 0x7c00; ++h) ASSERT_EQ(f32_to_f16(f16_to_f32(h)), h) << h;  // every finite f16 round-trips
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), 448.0f);   // largest finite
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_TRUE(std::isnan(fp8_e4m3_to_f32(0x7f)));
  for (int c = 0; c < 0x7f; ++c) {
    ASSERT_EQ(f32_to_fp8_e4m3(fp8_e4m3_to_f32(c)), c);
    ASSERT_EQ(f32_to_fp8_e4m3(-fp8_e4m3_to_f32(c)), c | 0x80);
  }
  EXPECT_EQ(f32_to_fp8_e4m3(1000.0f), 0x7e);  // saturates
  // halfway between 1.0 (0x38) and 1.125 (0x39) rounds to the even code
  EXPECT_EQ(f32_to_fp8_e4m3(1.0625f), 0x38);
  EXPECT_EQ(f32_to_fp8_e4m3(1.1875f), 0x3a);
}

TEST(Safetensors, truncated_file_is_refused) {
  test::TempDir d;
  const std::string p = d.str() + "/t.safetensors";
  write_raw(p, R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  expect_error(p, {"tensor 'a'", "past the end"});
  test::write_file(p, "abc");
  expect_error(p, {"truncated"});
  write_raw(p, R"({"a":1})", 0);
  std::ofstream(p, std::ios::binary | std::ios::trunc).write("\xff\xff\x00\x00\x00\x00\x00\x00{}", 10);
  expect_error(p, {"header length"});
}

TEST(Safetensors, header_that_lies_about_sizes_or_offsets_is_refused) {
  test::TempDir d;
  const std::string p = d.str() + "/l.safetensors";
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12);
  expect_error(p, {"tensor 'a'", "shape [2, 2]", "needs 16"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  expect_error(p, {"overlaps"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8);
  expect_error(p, {"gap", "'a'"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8);
  expect_error(p, {"trailing"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8);
  expect_error(p, {"begin after end"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4);
  expect_error(p, {"non-negative"});
}

TEST(Safetensors, malformed_header_json_and_unknown_dtypes_are_refused) {
  test::TempDir d;
  const std::string p = d.str() + "/m.safetensors";
  write_raw(p, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", 4);
  expect_error(p, {"not valid JSON"});
  write_raw(p, R"({"a":{"dtype":"Q4_K","shape":[1],"data_offsets":[0,4]}})", 4);
  expect_error(p, {"unknown dtype 'Q4_K'", "tensor 'a'"});
  write_raw(p, R"({"a":{"dtype":"F32","shape":[1]}})", 4);
  expect_error(p, {"data_offsets"});
  write_raw(p, R"([1,2,3])", 0);
  expect_error(p, {"JSON object"});
  write_raw(p, R"({"__metadata__":{"k":1}})", 0);
  expect_error(p, {"__metadata__"});
}

TEST(Safetensors, sharded_checkpoint_is_read_through_its_index) {
  test::TempDir d;
  std::map<std::string, OwnedTensor> a, b;
  a["w1"] = f32_tensor({2}, 0);
  b["w2"] = f32_tensor({3}, 10);
  write_safetensors(d.str() + "/model-00001-of-00002.safetensors", a);
  write_safetensors(d.str() + "/model-00002-of-00002.safetensors", b);
  json idx = {{"metadata", {{"total_size", 20}}},
              {"weight_map", {{"w1", "model-00001-of-00002.safetensors"}, {"w2", "model-00002-of-00002.safetensors"}}}};
  test::write_file(d.str() + "/model.safetensors.index.json", idx.dump());
  auto st = TensorStore::open(d.str());
  EXPECT_EQ(to_f32(st.get("w2"))[2], 12.0f);
  EXPECT_EQ(st.all().size(), 2u);
  // an index that names a tensor the shard lacks
  idx["weight_map"]["w3"] = "model-00002-of-00002.safetensors";
  test::write_file(d.str() + "/model.safetensors.index.json", idx.dump());
  try {
    TensorStore::open(d.str());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'w3'"), std::string::npos) << e.what();
  }
  // an index that names a missing shard
  idx["weight_map"].erase("w3");
  idx["weight_map"]["w4"] = "model-00003-of-00003.safetensors";
  test::write_file(d.str() + "/model.safetensors.index.json", idx.dump());
  try {
    TensorStore::open(d.str());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model-00003-of-00003.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, a_tensor_in_two_shards_is_refused) {
  test::TempDir d;
  std::map<std::string, OwnedTensor> a;
  a["w"] = f32_tensor({2}, 0);
  write_safetensors(d.str() + "/s1.safetensors", a);
  write_safetensors(d.str() + "/s2.safetensors", a);
  json idx = {{"weight_map", {{"w", "s1.safetensors"}, {"v", "s2.safetensors"}}}};
  test::write_file(d.str() + "/model.safetensors.index.json", idx.dump());
  EXPECT_THROW(TensorStore::open(d.str()), Error);
}

TEST(Safetensors, writer_is_atomic_and_checks_sizes) {
  test::TempDir d;
  const std::string p = d.str() + "/w.safetensors";
  {
    SafetensorsWriter w(p);
    w.declare("a", DType::F32, {4});
    const float x[2] = {1, 2};
    w.write(x, 8);
    EXPECT_THROW(w.finish(), Error);  // only half written
  }
  EXPECT_FALSE(std::filesystem::exists(p));
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  SafetensorsWriter w(p);
  w.declare("a", DType::F32, {1});
  const float x[2] = {1, 2};
  EXPECT_THROW(w.write(x, 8), Error);  // more than declared
}

}  // namespace
