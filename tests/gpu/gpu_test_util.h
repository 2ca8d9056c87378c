// Helpers for the GPU backend tests (tests/gpu/): the same sources build into kiln_gpu_tests_emu (SIMT
// emulator, runs everywhere, label unit) and, with the CUDA backend, kiln_gpu_tests (label cuda: skips
// when no GPU is present).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gpu.h"
#include "tests/test_util.h"

namespace kiln::test {

// Initialises the device once; false (and the test should GTEST_SKIP) when the build has no usable GPU.
inline bool gpu_ready() {
  static int state = -1;
  if (state < 0) {
#ifdef KILN_TEST_EMULATED
    setenv("KILN_GPU_EMULATOR", "1", 1);
#endif
    try {
      gpu::init(0);
      state = 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "GPU tests skipped: %s\n", e.what());
      state = 0;
    }
  }
  return state == 1;
}
#define KILN_REQUIRE_GPU() \
  if (!::kiln::test::gpu_ready()) GTEST_SKIP() << "no GPU"

// A device copy of a host vector, freed with the object.
template <class T>
struct DeviceVec {
  gpu::DeviceBuffer buf;
  size_t n = 0;
  DeviceVec() = default;
  explicit DeviceVec(size_t count) : buf(std::max<size_t>(count * sizeof(T), 1), "test"), n(count) {}
  explicit DeviceVec(const std::vector<T>& host) : DeviceVec(host.size()) { upload(host); }
  void upload(const std::vector<T>& host) { gpu::copy_to_device(buf.data(), host.data(), host.size() * sizeof(T)); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    gpu::copy_to_host(h.data(), buf.data(), n * sizeof(T));
    return h;
  }
  T* get() const { return buf.as<T>(); }
};

inline std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); i++) r[i] = f32_to_bf16(x[i]);
  return r;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); i++) r[i] = bf16_to_f32(x[i]);
  return r;
}
// x rounded to bf16 and back: the input the GPU actually sees.
inline std::vector<float> round_bf16(const std::vector<float>& x) { return from_bf16(to_bf16(x)); }

}  // namespace kiln::test
