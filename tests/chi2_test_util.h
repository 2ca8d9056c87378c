// χ² goodness of fit for the sampling tests (counts of draws against exact probabilities), and the Markov-chain
// "models" they sample: a random next-token table and the exact joint distribution of its first tokens.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "infer/speculative.h"

namespace kiln::test {

// p-value > 0.01 for a χ² statistic with df degrees of freedom, by the Wilson–Hilferty normal approximation
// (accurate to well under 0.01 in p for df >= 10; the cube root of χ²/df is close to normal).
inline bool chi2_passes(double chi2, int df) {
  const double a = 2.0 / (9.0 * df);
  const double z = (std::cbrt(chi2 / df) - (1 - a)) / std::sqrt(a);
  return z < 2.326;  // the one-sided 1% point of N(0, 1)
}

// χ² of counts against probabilities (cells with expected count < 5 are pooled into one).
struct Chi2 {
  double stat = 0;
  int df = 0;
};
inline Chi2 chi2_of(const std::vector<double>& expect_p, const std::vector<int64_t>& counts, int64_t n) {
  Chi2 c;
  double pooled_e = 0, pooled_o = 0;
  int cells = 0;
  for (size_t i = 0; i < expect_p.size(); i++) {
    const double e = expect_p[i] * double(n);
    if (e < 5) {
      pooled_e += e, pooled_o += double(counts[i]);
      EXPECT_TRUE(expect_p[i] > 0 || counts[i] == 0) << "cell " << i << " has probability 0 but was drawn";
      continue;
    }
    c.stat += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
    cells++;
  }
  if (pooled_e > 0) c.stat += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e, cells++;
  c.df = cells - 1;
  return c;
}

inline std::vector<std::vector<float>> random_table(int V, uint64_t seed, float scale) {
  Rng r(seed);
  std::vector<std::vector<float>> t(static_cast<size_t>(V), std::vector<float>(static_cast<size_t>(V)));
  for (auto& row : t)
    for (float& x : row) x = r.normal() * scale;
  return t;
}

// The exact distribution of the first L tokens after `start` under the target's sampler.
inline std::vector<double> exact_joint(const std::vector<std::vector<float>>& table, const Sampler& s, int32_t start, int L) {
  const int V = int(table.size());
  std::vector<double> joint = {1.0};
  std::vector<int32_t> lasts = {start};
  for (int step = 0; step < L; step++) {
    std::vector<double> nj;
    std::vector<int32_t> nl;
    for (size_t c = 0; c < joint.size(); c++) {
      std::vector<double> d;
      dense_distribution(s, table[size_t(lasts[c])].data(), V, d);
      for (int v = 0; v < V; v++) nj.push_back(joint[c] * d[size_t(v)]), nl.push_back(v);
    }
    joint.swap(nj);
    lasts.swap(nl);
  }
  return joint;
}

}  // namespace kiln::test
