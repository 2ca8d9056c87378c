// Choosing the next token from a row of logits.
//
//   temperature 0    greedy: the arg max (the lowest id among equal maxima).
//   temperature T>0  p ∝ exp(logit / T), then
//     top_k K>0      keep the K most probable tokens (ties broken towards the lower id),
//     top_p P<1      nucleus, on the distribution left by top-k renormalised: sort by probability (ties: lower
//                    id first) and keep the shortest prefix whose mass reaches P (at least one token),
//   and draw from what is left, renormalised.
// Draws come from a Philox stream (core/rng.h) seeded by `seed`; every sample consumes the same number of
// words, so a seed reproduces a whole generation.
#pragma once
#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "kernels/argmax.h"

namespace kiln {

struct SamplingParams {
  float temperature = 1.0f;
  int top_k = 0;       // 0: no limit
  float top_p = 1.0f;  // 1: no nucleus cut
  uint64_t seed = 0;
  // Throws kiln::Error naming the flag if a value is out of range.
  void validate() const;
  bool greedy() const { return temperature == 0.0f; }
};

struct Candidate {
  int32_t id;
  float p;  // probability after the filters, renormalised
};

// Buffers reused from one sample to the next (V floats / ids / weights).
struct SamplerScratch {
  std::vector<float> z;
  std::vector<int32_t> idx;
  std::vector<double> w;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  // The next token for logits[0..V).
  int32_t sample(const float* logits, int V);
  // The tokens a draw can return and their probabilities (greedy: the arg max alone with p = 1), ordered by
  // decreasing probability. Exposed for tests and for callers that want the distribution itself.
  void candidates(const float* logits, int V, std::vector<Candidate>& out) const;
  // The same distribution dense over [0, V) (0 for filtered-out ids), without ordering it: what speculative
  // decoding's acceptance rule reads per position (a sort of the vocabulary per position would cost more).
  void distribution(const float* logits, int V, std::vector<double>& dense) const;

  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  Rng rng_;
  SamplerScratch scratch_;
};

}  // namespace kiln
