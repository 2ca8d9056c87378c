// What the kernel benchmarks share: deterministic random operands and the time of one call.
#pragma once
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <vector>

#include "core/rng.h"
#include "kernels/matmul.h"

namespace kiln::bench {

// n values uniform in [-scale, scale), the same for a seed on every run.
inline std::vector<float> random_vec(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = (r.uniform() * 2.0f - 1.0f) * scale;
  return v;
}

// Seconds per call over one batch of calls lasting at least min_s.
inline double seconds_of_batch(const std::function<void()>& fn, double min_s) {
  int calls = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double el = 0;
  do {
    fn();
    calls++;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (el < min_s);
  return el / calls;
}

// Starts the program again with OPENBLAS_CORETYPE naming this CPU's kernels (kernels/matmul.h), as the CLI does,
// unless the environment names one: OpenBLAS reads it when it loads. Call first in main().
inline void prefer_blas_core(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE")) return;
  if (const char* core = cpu::blas_core_for_this_cpu()) {
    setenv("OPENBLAS_CORETYPE", core, 1);
    execv("/proc/self/exe", argv);  // on failure: run as we are
  }
}

}  // namespace kiln::bench
