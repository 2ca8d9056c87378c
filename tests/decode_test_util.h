// Decoding references shared by the decoder, Medusa and serve tests: random models, greedy decoding by the
// contiguous decoder alone, and a candidate tree's depths and ancestor masks from its parent list.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "models/model.h"
#include "models/param_table.h"

namespace kiln::test {

// A random model without gradients, its weights perturbed enough that every position matters.
inline std::unique_ptr<Model> random_model(const ModelConfig& cfg, uint64_t seed) {
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(cfg, o);
  m->init_random(seed);
  Rng r(seed + 1);
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) m->host_params()[s.offset + i] += (s.shape.ndim == 1 ? 0.3f : 0.1f) * r.normal();
  m->params_changed();
  return m;
}

// Greedy continuation by the contiguous decoder alone (the sampler's rule: the lowest id among equal maxima).
inline std::vector<int32_t> greedy_alone(const ModelConfig& cfg, const float* params,
                                         const std::vector<int32_t>& prompt, int n) {
  auto dec = make_decoder(cfg, params);
  std::vector<int32_t> out;
  const float* lg = dec->forward(prompt.data(), int(prompt.size()));
  for (int i = 0; i < n; i++) {
    int32_t best = 0;
    for (int32_t t = 1; t < cfg.vocab_size; t++)
      if (lg[t] > lg[best]) best = t;
    out.push_back(best);
    if (i + 1 < n) lg = dec->forward(&best, 1);
  }
  return out;
}

// A tree given by each node's parent (node 0 the root, parent -1): node i's depth and the bit mask of the nodes
// it sees (itself and its ancestors).
struct TreeShape {
  std::vector<int32_t> depth;
  std::vector<uint64_t> mask;
};
inline TreeShape tree_from_parents(const std::vector<int>& parent) {
  const size_t n = parent.size();
  TreeShape t{std::vector<int32_t>(n, 0), std::vector<uint64_t>(n, 1)};
  for (size_t i = 1; i < n; i++) {
    t.depth[i] = t.depth[size_t(parent[i])] + 1;
    t.mask[i] = t.mask[size_t(parent[i])] | (uint64_t(1) << i);
  }
  return t;
}

}  // namespace kiln::test
