// Helpers for the weight-file tests: scratch directories, raw file crafting, the Python peer
// (tests/peer/safetensors_peer.py) and the value formula both sides compute independently.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"

namespace kiln::test {

// A fresh directory under /tmp, removed at the end of the test.
struct ScratchDir {
  std::filesystem::path path;
  explicit ScratchDir(const std::string& tag) {
    path = std::filesystem::temp_directory_path() / ("kiln_io_" + tag + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::permissions(path, std::filesystem::perms::owner_all, std::filesystem::perm_options::add, ec);
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A safetensors file from a literal header and data section (header length written as given).
inline std::string safetensors_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; i++) out[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return out + header + data;
}

// Runs the peer with Debian's Python; returns its exit status (0 = the peer agrees).
inline int run_peer(const std::string& args) {
  std::string cmd = "/usr/bin/python3 " KILN_SOURCE_DIR "/tests/peer/safetensors_peer.py " + args;
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

// The peer's formula (see the docstring of safetensors_peer.py), written again here.
inline uint32_t fnv1a(const std::string& s) {
  uint32_t h = 2166136261u;
  for (unsigned char c : s) h = (h ^ c) * 16777619u;
  return h;
}
inline uint32_t mix(uint32_t seed, uint32_t i) { return i * 2654435761u + seed * 40503u + 12345u; }
inline float formula(const std::string& name, uint32_t i) {
  uint32_t h = mix(fnv1a(name), i);
  int m = 512 + int((h >> 3) & 511), e = 10 + int((h >> 13) & 3);
  return float(((h >> 20) & 1) ? -1.0 : 1.0) * std::ldexp(float(m), -e);
}
// Nearest bf16 with ties to even, by frexp and nearbyint (the default rounding mode is half-to-even),
// independent of the bit trick in core/dtype.h.
inline float bf16_reference(float v) {
  if (v == 0.0f) return v;
  int e;
  double mant = std::frexp(double(v), &e);
  return float(std::ldexp(std::nearbyint(mant * 256.0), e - 8));
}

// The call must throw kiln::Error whose message names `needle` (usually the file).
#define EXPECT_KILN_ERROR(stmt, needle)                                                    \
  do {                                                                                     \
    try {                                                                                  \
      stmt;                                                                                \
      ADD_FAILURE() << "no kiln::Error from " #stmt;                                       \
    } catch (const ::kiln::Error& err__) {                                                 \
      EXPECT_NE(std::string(err__.what()).find(needle), std::string::npos)                 \
          << "message \"" << err__.what() << "\" does not contain \"" << (needle) << "\""; \
    }                                                                                      \
  } while (0)

}  // namespace kiln::test
