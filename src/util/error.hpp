// Typed errors: every failure names the file, tensor or field and what was expected.
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace kscope {

enum class ErrorKind { io, format, config, weights, input, unsupported, resource, internal };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string where, std::string what)
      : std::runtime_error(where.empty() ? what : where + ": " + what), kind_(kind), where_(std::move(where)) {}
  ErrorKind kind() const { return kind_; }
  const std::string& where() const { return where_; }

 private:
  ErrorKind kind_;
  std::string where_;
};

template <typename... Args>
[[noreturn]] void fail(ErrorKind kind, const std::string& where, fmt::format_string<Args...> f, Args&&... args) {
  throw Error(kind, where, fmt::format(f, std::forward<Args>(args)...));
}

#define KSCOPE_CHECK(cond, kind, where, ...)                          \
  do {                                                                \
    if (!(cond)) ::kscope::fail(::kscope::ErrorKind::kind, where, __VA_ARGS__); \
  } while (0)

}  // namespace kscope
