// Errors: every user-facing failure is a kiln::Error whose message is one line naming the file or field.
// The CLI catches it, prints "kiln: <message>" and exits non-zero.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kiln {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Concatenates its arguments with operator<<: str("tensor ", name, " has ", n, " elements").
template <class... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// A shape as the messages print it: "[2, 3]".
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); i++) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(str(args...));
}

}  // namespace kiln

// KILN_CHECK(cond, "file ", path, ": message") throws kiln::Error when cond is false.
#define KILN_CHECK(cond, ...)                \
  do {                                       \
    if (!(cond)) ::kiln::fail(__VA_ARGS__);  \
  } while (0)
