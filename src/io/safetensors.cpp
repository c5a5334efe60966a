#include "io/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "util/error.hpp"
#include "util/numeric.hpp"

namespace kscope {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxHeader = 100ull << 20;  // the format's own limit on header size

struct DTypeDesc {
  DType d;
  const char* name;
  size_t size;
};
constexpr DTypeDesc kDTypes[] = {
    {DType::F32, "F32", 4},       {DType::F16, "F16", 2}, {DType::BF16, "BF16", 2}, {DType::F8_E4M3, "F8_E4M3", 1},
    {DType::I8, "I8", 1},         {DType::I32, "I32", 4}, {DType::I64, "I64", 8},   {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},
};
}  // namespace

const char* dtype_name(DType d) {
  for (auto& x : kDTypes)
    if (x.d == d) return x.name;
  return "?";
}
size_t dtype_size(DType d) {
  for (auto& x : kDTypes)
    if (x.d == d) return x.size;
  return 0;
}
DType parse_dtype(const std::string& s, const std::string& where) {
  for (auto& x : kDTypes)
    if (s == x.name) return x.d;
  fail(ErrorKind::format, where, "unknown dtype '{}' (expected one of F32, F16, BF16, F8_E4M3, I8, I32, I64, U8, BOOL)",
       s);
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}
std::string TensorInfo::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(ErrorKind::io, path, "cannot open: {}", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(ErrorKind::io, path, "cannot stat: {}", std::strerror(errno));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(ErrorKind::format, path, "truncated: {} bytes, a safetensors file starts with an 8-byte header length", size_);
  }
  map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail(ErrorKind::io, path, "mmap failed: {}", std::strerror(errno));
  }
  try {
    const auto* base = static_cast<const uint8_t*>(map_);
    uint64_t hlen = 0;
    std::memcpy(&hlen, base, 8);  // little-endian on every platform we build for
    if (hlen > kMaxHeader) fail(ErrorKind::format, path, "header length {} exceeds the 100 MiB limit", hlen);
    if (hlen > size_ - 8)
      fail(ErrorKind::format, path, "truncated: header length {} but only {} bytes follow", hlen, size_ - 8);
    json h;
    try {
      h = json::parse(base + 8, base + 8 + hlen);
    } catch (const json::exception& e) {
      fail(ErrorKind::format, path, "header is not valid JSON: {}", e.what());
    }
    if (!h.is_object()) fail(ErrorKind::format, path, "header must be a JSON object");
    const size_t data_start = 8 + hlen;
    const size_t data_size = size_ - data_start;
    struct Span {
      size_t b, e;
      std::string name;
    };
    std::vector<Span> spans;
    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      if (name == "__metadata__") {
        if (!it->is_object()) fail(ErrorKind::format, path, "__metadata__ must be an object of strings");
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (!m->is_string()) fail(ErrorKind::format, path, "__metadata__.{} must be a string", m.key());
          metadata_[m.key()] = m->get<std::string>();
        }
        continue;
      }
      const std::string where = path + ": tensor '" + name + "'";
      const json& e = *it;
      if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
        fail(ErrorKind::format, where, "entry must have dtype, shape and data_offsets");
      if (!e["dtype"].is_string()) fail(ErrorKind::format, where, "dtype must be a string");
      TensorInfo t;
      t.name = name;
      t.file = path;
      t.dtype = parse_dtype(e["dtype"].get<std::string>(), where);
      if (!e["shape"].is_array()) fail(ErrorKind::format, where, "shape must be an array of non-negative integers");
      unsigned __int128 numel = 1;
      for (auto& d : e["shape"]) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0)
          fail(ErrorKind::format, where, "shape must be an array of non-negative integers");
        t.shape.push_back(d.get<int64_t>());
        numel *= static_cast<uint64_t>(t.shape.back());
        if (numel > (static_cast<unsigned __int128>(1) << 62)) fail(ErrorKind::format, where, "shape too large");
      }
      const auto& off = e["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        fail(ErrorKind::format, where, "data_offsets must be [begin, end] with non-negative integers");
      const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
      if (b > en) fail(ErrorKind::format, where, "data_offsets [{}, {}] has begin after end", b, en);
      if (en > data_size)
        fail(ErrorKind::format, where, "data_offsets end {} is past the end of the data ({} bytes; file truncated?)", en,
             data_size);
      const auto expect = static_cast<uint64_t>(numel) * dtype_size(t.dtype);
      if (en - b != expect)
        fail(ErrorKind::format, where, "holds {} bytes but shape {} of {} needs {}", en - b, t.shape_str(),
             dtype_name(t.dtype), expect);
      t.data = base + data_start + b;
      t.nbytes = en - b;
      spans.push_back({b, en, name});
      tensors_.emplace(name, std::move(t));
    }
    // The data region must be covered exactly once, in order (as the reference implementation requires).
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.b < b.b || (a.b == b.b && a.e < b.e); });
    size_t cursor = 0;
    for (auto& s : spans) {
      if (s.b < cursor)
        fail(ErrorKind::format, path, "tensor '{}' at [{}, {}) overlaps the tensor before it (ends at {})", s.name, s.b,
             s.e, cursor);
      if (s.b > cursor)
        fail(ErrorKind::format, path, "gap of {} bytes before tensor '{}' at offset {}: data is not contiguous", s.b - cursor,
             s.name, s.b);
      cursor = s.e;
    }
    if (cursor != data_size)
      fail(ErrorKind::format, path, "{} trailing bytes after the last tensor (data region is {} bytes)", data_size - cursor,
           data_size);
  } catch (...) {
    munmap(map_, size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, size_);
}

TensorStore TensorStore::open(const std::string& path) {
  TensorStore st;
  st.root_ = path;
  std::vector<std::string> files;
  std::map<std::string, std::string> expected_file;  // tensor -> shard, from the index
  if (fs::is_directory(path)) {
    const auto index = fs::path(path) / "model.safetensors.index.json";
    const auto single = fs::path(path) / "model.safetensors";
    if (fs::exists(index)) {
      json j;
      std::ifstream in(index);
      try {
        j = json::parse(in);
      } catch (const json::exception& e) {
        fail(ErrorKind::format, index.string(), "not valid JSON: {}", e.what());
      }
      if (!j.contains("weight_map") || !j["weight_map"].is_object())
        fail(ErrorKind::format, index.string(), "missing object field 'weight_map'");
      std::set<std::string> uniq;
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        if (!it->is_string()) fail(ErrorKind::format, index.string(), "weight_map['{}'] must be a file name", it.key());
        const auto f = it->get<std::string>();
        if (f.find('/') != std::string::npos || f == ".." )
          fail(ErrorKind::format, index.string(), "weight_map['{}'] = '{}' must name a file in the directory", it.key(), f);
        expected_file[it.key()] = f;
        uniq.insert(f);
      }
      for (auto& f : uniq) files.push_back((fs::path(path) / f).string());
    } else if (fs::exists(single)) {
      files.push_back(single.string());
    } else {
      fail(ErrorKind::io, path, "no model.safetensors or model.safetensors.index.json in this directory");
    }
  } else if (fs::exists(path)) {
    files.push_back(path);
  } else {
    fail(ErrorKind::io, path, "no such file or directory");
  }
  for (auto& f : files) {
    if (!fs::exists(f)) fail(ErrorKind::io, f, "shard named in model.safetensors.index.json is missing");
    st.files_.push_back(std::make_unique<SafetensorsFile>(f));
    for (auto& [name, info] : st.files_.back()->tensors()) {
      auto [it, inserted] = st.index_.emplace(name, &info);
      if (!inserted) fail(ErrorKind::format, f, "tensor '{}' is also in {}", name, it->second->file);
    }
  }
  for (auto& [name, f] : expected_file) {
    auto it = st.index_.find(name);
    if (it == st.index_.end())
      fail(ErrorKind::weights, (fs::path(path) / f).string(), "index lists tensor '{}' but the shard does not hold it", name);
    if (fs::path(it->second->file).filename() != f)
      fail(ErrorKind::format, it->second->file, "index puts tensor '{}' in {}, but it is here", name, f);
  }
  return st;
}

const TensorInfo* TensorStore::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}
const TensorInfo& TensorStore::get(const std::string& name) const {
  auto* t = find(name);
  if (!t) fail(ErrorKind::weights, root_, "missing tensor '{}'", name);
  return *t;
}
size_t TensorStore::total_bytes() const {
  size_t n = 0;
  for (auto& [k, t] : index_) n += t->nbytes;
  return n;
}

// ------------------------------------------------------------------------------------------- writer
SafetensorsWriter::SafetensorsWriter(std::string path, std::map<std::string, std::string> metadata)
    : path_(std::move(path)), metadata_(std::move(metadata)) {}

SafetensorsWriter::~SafetensorsWriter() {
  if (fp_) {
    std::fclose(static_cast<FILE*>(fp_));
    std::remove((path_ + ".tmp").c_str());
  }
}

void SafetensorsWriter::declare(const std::string& name, DType dtype, std::vector<int64_t> shape) {
  KSCOPE_CHECK(!fp_, internal, path_, "declare('{}') after writing started", name);
  int64_t n = 1;
  for (auto s : shape) {
    KSCOPE_CHECK(s >= 0, input, path_, "tensor '{}' has a negative dimension", name);
    n *= s;
  }
  for (auto& d : decls_) KSCOPE_CHECK(d.name != name, input, path_, "tensor '{}' declared twice", name);
  decls_.push_back({name, dtype, std::move(shape), static_cast<size_t>(n) * dtype_size(dtype)});
}

void SafetensorsWriter::open_file() {
  json h = json::object();
  if (!metadata_.empty()) h["__metadata__"] = metadata_;
  size_t off = 0;
  for (auto& d : decls_) {
    h[d.name] = {{"dtype", dtype_name(d.dtype)}, {"shape", d.shape}, {"data_offsets", {off, off + d.nbytes}}};
    off += d.nbytes;
  }
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');  // align the data region to 8 bytes
  const std::string tmp = path_ + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail(ErrorKind::io, tmp, "cannot create: {}", std::strerror(errno));
  fp_ = f;
  const uint64_t len = hs.size();
  if (std::fwrite(&len, 8, 1, f) != 1 || std::fwrite(hs.data(), 1, hs.size(), f) != hs.size())
    fail(ErrorKind::io, tmp, "write failed: {}", std::strerror(errno));
  cur_ = 0;
  cur_written_ = 0;
}

void SafetensorsWriter::write(const void* data, size_t nbytes) {
  if (!fp_) open_file();
  while (cur_ < decls_.size() && decls_[cur_].nbytes == cur_written_) {
    ++cur_;
    cur_written_ = 0;
  }
  KSCOPE_CHECK(cur_ < decls_.size(), internal, path_, "more bytes written than declared");
  KSCOPE_CHECK(cur_written_ + nbytes <= decls_[cur_].nbytes, internal, path_,
               "tensor '{}': {} bytes written, declared {}", decls_[cur_].name, cur_written_ + nbytes,
               decls_[cur_].nbytes);
  if (nbytes && std::fwrite(data, 1, nbytes, static_cast<FILE*>(fp_)) != nbytes)
    fail(ErrorKind::io, path_ + ".tmp", "write failed: {}", std::strerror(errno));
  cur_written_ += nbytes;
}

void SafetensorsWriter::finish() {
  if (!fp_) open_file();
  while (cur_ < decls_.size() && decls_[cur_].nbytes == cur_written_) {
    ++cur_;
    cur_written_ = 0;
  }
  KSCOPE_CHECK(cur_ == decls_.size(), internal, path_, "tensor '{}' was not fully written", decls_[cur_].name);
  FILE* f = static_cast<FILE*>(fp_);
  fp_ = nullptr;
  if (std::fflush(f) != 0 || fsync(fileno(f)) != 0) {
    std::fclose(f);
    fail(ErrorKind::io, path_ + ".tmp", "flush failed: {}", std::strerror(errno));
  }
  std::fclose(f);
  if (std::rename((path_ + ".tmp").c_str(), path_.c_str()) != 0)
    fail(ErrorKind::io, path_, "rename from .tmp failed: {}", std::strerror(errno));
  finished_ = true;
}

void write_safetensors(const std::string& path, const std::map<std::string, OwnedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter w(path, metadata);
  for (auto& [name, t] : tensors) w.declare(name, t.dtype, t.shape);
  for (auto& [name, t] : tensors) w.write(t.bytes.data(), t.bytes.size());
  w.finish();
}

std::vector<float> to_f32(const TensorInfo& t) {
  const int64_t n = t.numel();
  std::vector<float> out(static_cast<size_t>(n));
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(out.data(), t.data, n * 4);
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = bf16_to_f32(v);
      }
      break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, t.data + 2 * i, 2);
        out[i] = f16_to_f32(v);
      }
      break;
    case DType::F8_E4M3: {
      const auto& lut = fp8_e4m3_table();
      for (int64_t i = 0; i < n; ++i) out[i] = lut[t.data[i]];
      break;
    }
    default:
      fail(ErrorKind::weights, t.file + ": tensor '" + t.name + "'", "dtype {} is not a float type",
           dtype_name(t.dtype));
  }
  return out;
}

}  // namespace kscope
