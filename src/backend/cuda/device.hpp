// What CUDA devices this process sees (name, memory); used by `kscope info` to plan memory.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kscope {

struct CudaDevice {
  int index = 0;
  std::string name;
  int sm_major = 0, sm_minor = 0, multiprocessors = 0;
  uint64_t total_bytes = 0, free_bytes = 0;
};

// Empty when the driver or devices are absent (e.g. a CPU-only machine); never throws.
std::vector<CudaDevice> cuda_devices();

}  // namespace kscope
