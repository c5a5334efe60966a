#include "interp/vectors.hpp"

#include <cstring>
#include <cmath>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.hpp"
#include "util/error.hpp"
#include "util/numeric.hpp"

namespace kscope {
using json = nlohmann::json;

const char* const kSiteConvention = "kscope-1 (L.resid_pre = input of block L, L.resid_post = output of block L)";

VectorFile VectorFile::load(const std::string& path) {
  {
    std::ifstream f(path, std::ios::binary);
    char magic[4] = {};
    f.read(magic, 4);
    if (f && std::memcmp(magic, "GGUF", 4) == 0)
      fail(ErrorKind::input, path, "is a GGUF control vector: import it first (kscope vectors import-gguf)");
  }
  SafetensorsFile st(path);
  VectorFile v;
  v.meta = st.metadata();
  if (!v.meta.count("site_convention"))
    fail(ErrorKind::format, path, "no site_convention in its metadata: not a kscope vector file");
  for (auto& [name, t] : st.tensors()) {
    if (t.shape.size() != 1) fail(ErrorKind::format, path, "tensor '{}' has shape {} (expected one vector [d])", name, t.shape_str());
    auto f = to_f32(t);
    for (float x : f)
      if (!std::isfinite(x)) fail(ErrorKind::format, path, "tensor '{}' holds a non-finite value", name);
    v.vectors[name] = std::move(f);
  }
  if (auto it = v.meta.find("norms"); it != v.meta.end()) {
    try {
      const json n = json::parse(it->second);
      for (auto& [k, x] : n.items()) v.norms[k] = x.get<double>();
    } catch (const json::exception& e) {
      fail(ErrorKind::format, path, "metadata 'norms' is not a JSON object of numbers: {}", e.what());
    }
  }
  return v;
}

void VectorFile::save(const std::string& path) const {
  std::map<std::string, OwnedTensor> t;
  for (auto& [site, f] : vectors) {
    OwnedTensor o{DType::F32, {static_cast<int64_t>(f.size())}, {}};
    o.bytes.resize(f.size() * 4);
    std::memcpy(o.bytes.data(), f.data(), o.bytes.size());
    t[site] = std::move(o);
  }
  auto m = meta;
  m["site_convention"] = kSiteConvention;
  if (!norms.empty()) m["norms"] = json(norms).dump();
  write_safetensors(path, t, m);
}

void VectorFile::check_model(const ModelConfig& cfg, const std::string& path) const {
  const auto conv = meta.find("site_convention");
  if (conv == meta.end() || conv->second != kSiteConvention)
    fail(ErrorKind::input, path, "site convention '{}' is not this kscope's '{}'", conv == meta.end() ? "" : conv->second,
         kSiteConvention);
  const auto id = meta.find("model_identity");
  if (id == meta.end() || id->second != cfg.identity_hash())
    fail(ErrorKind::input, path, "was made for model identity {}, this model is {}", id == meta.end() ? "(none)" : id->second,
         cfg.identity_hash());
}

const std::vector<float>& VectorFile::at(const std::string& site, const std::string& path) const {
  auto it = vectors.find(site);
  if (it == vectors.end()) {
    std::string have;
    for (auto& [k, v] : vectors) have += (have.empty() ? "" : ", ") + k;
    fail(ErrorKind::input, path, "has no vector for site '{}' (it has: {})", site, have);
  }
  return it->second;
}

// ------------------------------------------------------------------------------------------------ GGUF
namespace {
enum : uint32_t { kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kString, kArray, kU64, kI64, kF64 };

struct GgufOut {
  std::string buf;
  template <typename T>
  void put(T v) { buf.append(reinterpret_cast<const char*>(&v), sizeof v); }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    buf += s;
  }
};

struct GgufIn {
  std::string data;
  size_t p = 0;
  std::string path;
  template <typename T>
  T get() {
    if (p + sizeof(T) > data.size()) fail(ErrorKind::format, path, "truncated at byte {}", p);
    T v;
    std::memcpy(&v, data.data() + p, sizeof v);
    p += sizeof v;
    return v;
  }
  std::string str() {
    const uint64_t n = get<uint64_t>();
    if (n > data.size() - p) fail(ErrorKind::format, path, "string length {} past the end (byte {})", n, p);
    std::string s = data.substr(p, n);
    p += n;
    return s;
  }
  size_t scalar_size(uint32_t t) {
    switch (t) {
      case kU8: case kI8: case kBool: return 1;
      case kU16: case kI16: return 2;
      case kU32: case kI32: case kF32: return 4;
      case kU64: case kI64: case kF64: return 8;
    }
    fail(ErrorKind::format, path, "unknown GGUF value type {}", t);
  }
  json value(uint32_t t) {
    switch (t) {
      case kString: return str();
      case kU32: return get<uint32_t>();
      case kI32: return get<int32_t>();
      case kF32: return get<float>();
      case kU64: return get<uint64_t>();
      case kI64: return get<int64_t>();
      case kBool: return get<uint8_t>() != 0;
      case kArray: {
        const uint32_t et = get<uint32_t>();
        const uint64_t n = get<uint64_t>();
        json a = json::array();
        for (uint64_t i = 0; i < n; ++i) a.push_back(value(et));
        return a;
      }
      default: {
        const size_t s = scalar_size(t);
        if (p + s > data.size()) fail(ErrorKind::format, path, "truncated");
        p += s;
        return nullptr;
      }
    }
  }
};
}  // namespace

void export_control_vector_gguf(const VectorFile& v, const std::string& path, const std::string& model_hint) {
  std::map<int64_t, const std::vector<float>*> dirs;
  for (auto& [site, f] : v.vectors) {
    const auto dot = site.find('.');
    if (dot == std::string::npos || site.substr(dot + 1) != "resid_post")
      fail(ErrorKind::input, path, "control vectors hold L.resid_post directions only; '{}' cannot be exported", site);
    dirs[std::stoll(site.substr(0, dot))] = &f;
  }
  if (dirs.empty()) fail(ErrorKind::input, path, "no resid_post vectors to export");
  GgufOut o;
  o.put<uint32_t>(0x46554747);  // "GGUF"
  o.put<uint32_t>(3);
  o.put<uint64_t>(dirs.size());
  o.put<uint64_t>(3);
  o.str("general.architecture");
  o.put<uint32_t>(kString);
  o.str("controlvector");
  o.str("controlvector.model_hint");
  o.put<uint32_t>(kString);
  o.str(model_hint);
  o.str("controlvector.layer_count");
  o.put<uint32_t>(kU32);
  o.put<uint32_t>(static_cast<uint32_t>(dirs.size()));
  uint64_t off = 0;
  for (auto& [layer, f] : dirs) {
    o.str("direction." + std::to_string(layer));
    o.put<uint32_t>(1);
    o.put<uint64_t>(f->size());
    o.put<uint32_t>(0);  // GGML_TYPE_F32
    o.put<uint64_t>(off);
    off += (f->size() * 4 + 31) / 32 * 32;
  }
  while (o.buf.size() % 32) o.buf.push_back('\0');
  for (auto& [layer, f] : dirs) {
    o.buf.append(reinterpret_cast<const char*>(f->data()), f->size() * 4);
    while (o.buf.size() % 32) o.buf.push_back('\0');
  }
  std::ofstream out(path + ".tmp", std::ios::binary);
  out << o.buf;
  out.close();
  if (!out) fail(ErrorKind::io, path, "write failed");
  std::rename((path + ".tmp").c_str(), path.c_str());
}

VectorFile import_control_vector_gguf(const std::string& path, const ModelConfig& cfg) {
  GgufIn in;
  in.path = path;
  {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(ErrorKind::io, path, "cannot open");
    std::stringstream ss;
    ss << f.rdbuf();
    in.data = ss.str();
  }
  if (in.get<uint32_t>() != 0x46554747) fail(ErrorKind::format, path, "not a GGUF file");
  const uint32_t version = in.get<uint32_t>();
  if (version < 2 || version > 3) fail(ErrorKind::format, path, "GGUF version {} (expected 2 or 3)", version);
  const uint64_t n_tensors = in.get<uint64_t>(), n_kv = in.get<uint64_t>();
  uint64_t alignment = 32;
  std::string arch;
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = in.str();
    const json v = in.value(in.get<uint32_t>());
    if (key == "general.alignment" && v.is_number_unsigned()) alignment = v.get<uint64_t>();
    if (key == "general.architecture" && v.is_string()) arch = v.get<std::string>();
  }
  if (arch != "controlvector") fail(ErrorKind::format, path, "general.architecture is '{}' (expected controlvector)", arch);
  struct Info {
    std::string name;
    uint64_t n, off;
    uint32_t type;
  };
  std::vector<Info> infos;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    Info t;
    t.name = in.str();
    const uint32_t nd = in.get<uint32_t>();
    t.n = 1;
    for (uint32_t d = 0; d < nd; ++d) t.n *= in.get<uint64_t>();
    t.type = in.get<uint32_t>();
    t.off = in.get<uint64_t>();
    if (t.type != 0 && t.type != 1) fail(ErrorKind::format, path, "tensor '{}' has ggml type {} (expected F32 or F16)", t.name, t.type);
    infos.push_back(t);
  }
  const size_t base = (in.p + alignment - 1) / alignment * alignment;
  VectorFile v;
  for (const Info& t : infos) {
    if (t.name.rfind("direction.", 0) != 0) fail(ErrorKind::format, path, "unexpected tensor '{}'", t.name);
    const int64_t layer = std::stoll(t.name.substr(10));
    if (layer < 0 || layer >= cfg.num_hidden_layers)
      fail(ErrorKind::input, path, "'{}' is for layer {}, the model has {}", t.name, layer, cfg.num_hidden_layers);
    if (static_cast<int64_t>(t.n) != cfg.hidden_size)
      fail(ErrorKind::input, path, "'{}' has {} values, the model's hidden size is {}", t.name, t.n, cfg.hidden_size);
    const size_t bytes = t.n * (t.type == 0 ? 4 : 2);
    if (base + t.off + bytes > in.data.size()) fail(ErrorKind::format, path, "tensor '{}' runs past the end", t.name);
    std::vector<float> f(t.n);
    const char* src = in.data.data() + base + t.off;
    for (uint64_t i = 0; i < t.n; ++i) {
      if (t.type == 0) std::memcpy(&f[i], src + 4 * i, 4);
      else {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        f[i] = f16_to_f32(h);
      }
    }
    v.vectors[std::to_string(layer) + ".resid_post"] = std::move(f);
  }
  v.meta["model_identity"] = cfg.identity_hash();
  v.meta["site_convention"] = kSiteConvention;
  v.meta["method"] = "imported";
  v.meta["source"] = "control-vector GGUF " + path + " (direction.N -> N.resid_post)";
  return v;
}

}  // namespace kscope
