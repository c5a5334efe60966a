// safetensors: validated reader over mmap (one file or a sharded index), and a streaming writer.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace kscope {

enum class DType { F32, F16, BF16, F8_E4M3, I8, I32, I64, U8, BOOL };

const char* dtype_name(DType d);
size_t dtype_size(DType d);
// Throws Error(format) naming `where` for a dtype string this reader does not know.
DType parse_dtype(const std::string& s, const std::string& where);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping
  size_t nbytes = 0;
  std::string file;  // path of the file holding it, for messages

  int64_t numel() const;
  std::string shape_str() const;
};

// One mmapped .safetensors file with a fully validated header.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t file_size() const { return size_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory (model.safetensors, or model.safetensors.index.json + shards),
// or of a single file path.
class TensorStore {
 public:
  static TensorStore open(const std::string& path);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // Throws Error(weights) naming the tensor and the checkpoint when absent.
  const TensorInfo& get(const std::string& name) const;
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, const TensorInfo*>& all() const { return index_; }
  const std::string& root() const { return root_; }
  size_t total_bytes() const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::string root_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

// Streaming writer: declare every tensor first, then write their bytes in declaration order.
// Writes to `path + ".tmp"` and renames on finish(), so a reader never sees a partial file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::string path, std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  void declare(const std::string& name, DType dtype, std::vector<int64_t> shape);
  // Bytes of the next declared tensor (must be exactly its size); may be called in pieces.
  void write(const void* data, size_t nbytes);
  void finish();

 private:
  void open_file();
  struct Decl {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    size_t nbytes;
  };
  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::vector<Decl> decls_;
  void* fp_ = nullptr;
  size_t cur_ = 0, cur_written_ = 0;
  bool finished_ = false;
};

// Convenience: write whole in-memory tensors at once.
struct OwnedTensor {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
void write_safetensors(const std::string& path, const std::map<std::string, OwnedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Reads a tensor of any float dtype into fp32.
std::vector<float> to_f32(const TensorInfo& t);

}  // namespace kscope
