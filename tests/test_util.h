// Helpers shared by the unit tests: random inputs, tolerance checks, finite differences.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/rng.h"

namespace kiln::test {

inline std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = r.normal() * scale;
  return v;
}

// max |a-b| / (atol + rtol·|b|) <= 1 over all elements; reports the worst index.
inline ::testing::AssertionResult all_close(const float* a, const float* b, size_t n, double rtol, double atol) {
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < n; i++) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return ::testing::AssertionFailure() << "NaN mismatch at " << i;
    double e = std::fabs(double(a[i]) - double(b[i])) / (atol + rtol * std::fabs(double(b[i])));
    if (e > worst) { worst = e; wi = i; }
  }
  if (worst <= 1.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "index " << wi << ": " << a[wi] << " vs " << b[wi] << " (ratio to tolerance "
                                       << worst << ")";
}
inline ::testing::AssertionResult all_close(const std::vector<float>& a, const std::vector<float>& b, double rtol,
                                            double atol) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size " << a.size() << " vs " << b.size();
  return all_close(a.data(), b.data(), a.size(), rtol, atol);
}

// Central finite difference of a scalar function f with respect to x[i] (double-precision loss).
inline double finite_diff(std::vector<float>& x, size_t i, const std::function<double()>& f, float h = 1e-3f) {
  float old = x[i];
  x[i] = old + h;
  double fp = f();
  x[i] = old - h;
  double fm = f();
  x[i] = old;
  return (fp - fm) / (2.0 * double(h));
}

}  // namespace kiln::test
