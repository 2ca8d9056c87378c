#include "infer/sampler.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace kiln {

void SamplingParams::validate() const {
  KILN_CHECK(std::isfinite(temperature) && temperature >= 0.0f, "--temperature must be >= 0, got ", temperature);
  KILN_CHECK(top_k >= 0, "--top-k must be >= 0 (0: no limit), got ", top_k);
  KILN_CHECK(top_p > 0.0f && top_p <= 1.0f, "--top-p must be in (0, 1], got ", top_p);
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) { params_.validate(); }

namespace {

// Orders candidates by decreasing scaled logit, ties towards the lower id (a strict weak order).
struct ByScore {
  const float* z;
  bool operator()(int32_t a, int32_t b) const { return z[a] > z[b] || (z[a] == z[b] && a < b); }
};

// The filtered distribution: on return idx[0, keep) are the allowed ids, w[id] their unnormalised weights
// exp(z - max) and total the weights' sum. sorted: idx[0, keep) in decreasing probability order (otherwise
// in whatever order is cheapest, which changes nothing about the distribution). Each weight is computed once.
size_t filter(const SamplingParams& sp, const float* logits, int V, SamplerScratch& s, double& total, bool sorted) {
  // Scaled logits; NaN never gets probability.
  s.z.resize(size_t(V));
  const float inv_t = 1.0f / sp.temperature;
  float m = -INFINITY;
  for (int i = 0; i < V; i++) {
    s.z[size_t(i)] = std::isnan(logits[i]) ? -INFINITY : logits[i] * inv_t;
    m = std::max(m, s.z[size_t(i)]);
  }
  KILN_CHECK(std::isfinite(m), "sampling: the logits have no finite maximum");
  s.idx.resize(size_t(V));
  for (int i = 0; i < V; i++) s.idx[size_t(i)] = i;
  const ByScore by{s.z.data()};
  auto& idx = s.idx;

  // top-k: the K best (ties to the lower id) by a linear-time selection.
  size_t keep = size_t(V);
  if (sp.top_k > 0 && sp.top_k < V) {
    keep = size_t(sp.top_k);
    std::nth_element(idx.begin(), idx.begin() + long(keep), idx.end(), by);
  }
  // Weights of the kept set; their sum renormalises top-k.
  s.w.resize(size_t(V));
  total = 0;
  for (size_t i = 0; i < keep; i++) total += (s.w[size_t(idx[i])] = std::exp(double(s.z[size_t(idx[i])]) - double(m)));

  if (sp.top_p < 1.0f) {
    // Nucleus: find a prefix size n whose top-n mass reaches top_p by growing n (each try linear), then sort
    // just those n and cut at the first position where the cumulative mass reaches top_p.
    const double target = double(sp.top_p) * total;
    size_t n = std::min<size_t>(keep, 64);
    for (;;) {
      if (n < keep) std::nth_element(idx.begin(), idx.begin() + long(n), idx.begin() + long(keep), by);
      double mass = 0;
      for (size_t i = 0; i < n; i++) mass += s.w[size_t(idx[i])];
      if (mass >= target || n == keep) break;
      n = std::min(keep, n * 4);
    }
    std::sort(idx.begin(), idx.begin() + long(n), by);
    double cum = 0;
    size_t cut = n;
    for (size_t i = 0; i < n; i++) {
      cum += s.w[size_t(idx[i])];
      if (cum >= target) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = cum;
  } else if (sorted) {
    std::sort(idx.begin(), idx.begin() + long(keep), by);
  }
  return keep;
}

}  // namespace

void Sampler::candidates(const float* logits, int V, std::vector<Candidate>& out) const {
  out.clear();
  if (params_.greedy()) {
    out.push_back({argmax(logits, V), 1.0f});
    return;
  }
  SamplerScratch s;
  double total = 0;
  const size_t keep = filter(params_, logits, V, s, total, /*sorted=*/true);
  for (size_t i = 0; i < keep; i++) out.push_back({s.idx[i], float(s.w[size_t(s.idx[i])] / total)});
}

void Sampler::distribution(const float* logits, int V, std::vector<double>& dense) const {
  dense.assign(size_t(V), 0.0);
  if (params_.greedy()) {
    dense[size_t(argmax(logits, V))] = 1.0;
    return;
  }
  thread_local SamplerScratch s;
  double total = 0;
  const size_t keep = filter(params_, logits, V, s, total, /*sorted=*/false);
  for (size_t i = 0; i < keep; i++) dense[size_t(s.idx[i])] = s.w[size_t(s.idx[i])] / total;
}

int32_t Sampler::sample(const float* logits, int V) {
  KILN_CHECK(V >= 1, "sampling: empty vocabulary");
  // Two words per draw whatever the path, so the stream position depends only on the number of samples.
  const double u = double(rng_.next_u64() >> 11) * (1.0 / 9007199254740992.0);  // [0, 1), 53 bits
  if (params_.greedy()) return argmax(logits, V);
  double total = 0;
  const size_t keep = filter(params_, logits, V, scratch_, total, /*sorted=*/false);
  const double target = u * total;
  double cum = 0;
  for (size_t i = 0; i < keep; i++) {
    cum += scratch_.w[size_t(scratch_.idx[i])];
    if (target < cum) return scratch_.idx[i];
  }
  return scratch_.idx[keep - 1];  // u within rounding of 1
}

}  // namespace kiln
