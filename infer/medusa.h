// Medusa decoding (Cai et al. 2024): the base model's K Medusa heads (nn/medusa.h) guess the tokens after the
// next one from the last hidden state; a static candidate tree of their top choices is checked in one forward
// pass with tree attention (IncrementalDecoder::forward_tree), the longest acceptable path is kept (its cache
// entries compacted in place, keep_path) and the base's own choice after it starts the next round.
//
// A round: root = the token the base chose after the cache (already decided). Tree node (c_1, .., c_d) holds
// head d's c_d-th most likely token (0-based rank) under node (c_1, .., c_{d-1}); the root is depth 0.
//   greedy (temperature 0): from the root, follow the child whose token is the base's arg max at the node;
//     lossless: every token is the base's greedy choice on its exact prefix, so the output is plain greedy's.
//   typical acceptance (--typical-threshold ε, --typical-alpha α; Medusa's 0.09 and 0.3): a child is acceptable
//     when the base's tempered probability of its token at the parent exceeds min(ε, α·exp(−H(p_parent))); the
//     longest acceptable path wins (the earlier node on ties), and the next root is sampled from the base there.
// Stats: rounds, accepted (head tokens kept), acceptance_rate = accepted / (rounds · tree depth), mean accepted
// length = tokens per round (accepted + the root).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "infer/generate.h"
#include "infer/sampler.h"
#include "models/model.h"
#include "nn/medusa.h"

namespace kiln {

// A static tree: each non-root node as its path of ranks, parents before children (any order given is sorted
// breadth-first). Text form: "0;1;2;0,0;0,1;1,0;0,0,0" (nodes separated by ';', ranks by ',').
struct MedusaTree {
  std::vector<std::vector<int>> nodes;
  static MedusaTree parse(const std::string& text);  // throws naming --medusa-tree and the bad node
  // The default: 15 nodes to depth 4 in the spirit of Medusa's sparse trees (more width near the root, where
  // guesses are surer); with the root a pass is 16 rows, which the narrow-weight products take in one read of
  // the weights (kNarrowDirectRows).
  static MedusaTree default_tree();
  int depth() const;  // the longest path
  std::string str() const;
};

struct MedusaParams {
  MedusaTree tree = MedusaTree::default_tree();
  bool typical = false;             // typical acceptance (else greedy: needs temperature 0)
  float typical_threshold = 0.09f;  // ε
  float typical_alpha = 0.3f;       // α
};

struct MedusaStats {
  GenerateStats base;  // decode_steps: tree passes
  int rounds = 0;
  int depth = 0;          // the tree's depth in use (at most the heads)
  int tree_nodes = 0;     // nodes per pass, root included
  int64_t accepted = 0;   // head tokens kept
  double acceptance_rate() const { return rounds && depth ? double(accepted) / (double(rounds) * depth) : 0.0; }
  double mean_accepted_length() const { return rounds ? double(accepted + rounds) / rounds : 0.0; }
};

// generate() with Medusa heads: the same limits, on_token contract and finish reasons. The decoder has batch 1
// and tree attention (TransformerDecoder on the CPU or the GPU); heads match its d_model and vocabulary. Greedy unless
// params.typical (then the sampler's temperature / top-k / top-p give the roots).
FinishReason generate_medusa(IncrementalDecoder& dec, const nn::MedusaHeads& heads, const Sampler& sampler,
                             const std::vector<int32_t>& prompt, const GenerateLimits& lim,
                             const MedusaParams& params, const std::function<bool(int32_t)>& on_token,
                             MedusaStats* stats = nullptr);

}  // namespace kiln
