// Decoding references shared by the decoder, Medusa and serve tests: random models, greedy decoding by the
// contiguous decoder alone, a candidate tree's depths and ancestor masks from its parent list, and the paged
// decoder's rows (prompts, tree rows, MTP module rows), and Medusa heads that start as the LM head.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "models/param_table.h"
#include "nn/medusa.h"

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

// One pass of the paged decoder: sequence s's prompts[s] from position 0 in its blocks[s].
inline std::vector<BatchRow> prompt_rows(const std::vector<std::vector<int32_t>>& prompts,
                                         const std::vector<std::vector<int32_t>>& blocks) {
  std::vector<BatchRow> rows(prompts.size());
  for (size_t s = 0; s < prompts.size(); s++) {
    rows[s].tokens = prompts[s].data();
    rows[s].n = int(prompts[s].size());
    rows[s].blocks = blocks[s].data();
    rows[s].n_blocks = int(blocks[s].size());
  }
  return rows;
}

// Row r (its blocks kept) as a tree row: `nodes` as the nodes of tree t after `past` cached positions.
inline void set_tree_row(BatchRow& r, const std::vector<int32_t>& nodes, int past, const TreeShape& t) {
  r.tokens = nodes.data();
  r.n = int(nodes.size());
  r.past = past;
  r.all_logits = true;
  r.depth = t.depth.data();
  r.tree = t.mask.data();
}

// An MTP module row over n positions after `past`: each one's token and previous-depth hidden state.
inline DraftRow draft_row(const int32_t* tokens, const float* hidden, int n, int past,
                          const std::vector<int32_t>& blocks) {
  DraftRow row;
  row.tokens = tokens;
  row.hidden = hidden;
  row.n = n;
  row.past = past;
  row.blocks = blocks.data();
  row.n_blocks = int(blocks.size());
  return row;
}

// K Medusa heads' parameters initialised from the model's LM head, plus normal noise of `noise` (seed `seed`):
// each head then guesses the next token again, right wherever the model repeats itself.
inline std::vector<float> heads_from_lm_head(const ModelConfig& cfg, const Model& model, int K, float noise,
                                             uint64_t seed) {
  const nn::MedusaShape hs = medusa_shape(cfg, K);
  std::vector<float> hp(size_t(hs.total()));
  nn::MedusaHeads::init_from_lm_head(hs, hp.data(),
                                     lm_head_matrix(cfg, model.table(), const_cast<Model&>(model).host_params()));
  Rng r(seed);
  for (float& x : hp) x += noise * float(r.normal());
  return hp;
}

}  // namespace kiln::test
