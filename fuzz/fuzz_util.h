// Shared by the fuzz targets: what counts as a correct answer to hostile input. A loader may accept the input
// or throw kiln::Error whose message is one line naming the file; anything else (another exception type, a
// message spanning lines or not naming the file, a broken invariant) aborts, which libFuzzer reports as a crash
// and saves the input. Sanitizer findings (out-of-bounds, overflow, leak, huge allocation) abort on their own.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

#include "core/error.h"

namespace kiln::fuzz {

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what.c_str());
  std::abort();
}

#define FUZZ_CHECK(cond, ...)                                       \
  do {                                                              \
    if (!(cond)) ::kiln::fuzz::die(::kiln::str(#cond ": ", __VA_ARGS__)); \
  } while (0)

// Runs f(); true if it returned, false if it threw a well-formed kiln::Error (one line, naming `needle`
// unless needle is empty).
template <class F>
bool accepts(F&& f, std::string_view needle) {
  try {
    f();
    return true;
  } catch (const Error& e) {
    const std::string m = e.what();
    // KILN_FUZZ_VERBOSE=1: print every refusal (to see why a seed is refused).
    static const bool verbose = std::getenv("KILN_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "refused: %s\n", m.c_str());
    FUZZ_CHECK(m.find('\n') == std::string::npos && m.find('\r') == std::string::npos, "message is not one line: ", m);
    FUZZ_CHECK(needle.empty() || m.find(needle) != std::string::npos, "message does not name ", needle, ": ", m);
    return false;
  } catch (const std::exception& e) {
    die(str("non-kiln exception ", typeid(e).name(), ": ", e.what()));
  } catch (...) {
    die("non-std exception");
  }
}

// The input split at NUL bytes (which no JSON text contains) into up to n parts; missing parts are empty.
inline std::vector<std::string> split_parts(const uint8_t* data, size_t size, size_t n) {
  std::vector<std::string> parts(n);
  size_t k = 0;
  for (size_t i = 0; i < size; i++) {
    if (data[i] == 0 && k + 1 < n) {
      k++;
      continue;
    }
    parts[k] += char(data[i]);
  }
  return parts;
}

}  // namespace kiln::fuzz
