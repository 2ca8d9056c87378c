// What the kernel benchmarks share: deterministic random operands and the time of one call.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/rng.h"

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

}  // namespace kiln::bench
