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

// A tree laid out for a pass with K heads (nodes deeper than K dropped with their subtrees): node 0 is the root,
// node i > 0 is nodes[i - 1]; its parent, depth and tree-attention mask (ancestors and itself), each head's
// candidates needed. generate_medusa and kiln serve build their passes from it.
struct MedusaLayout {
  std::vector<std::vector<int>> nodes;
  int n_all = 1;       // nodes per pass, root included
  int depth_used = 0;  // the longest path (at most K)
  std::vector<int> parent, depth, width;  // width[k]: the top choices head k must give
  std::vector<uint64_t> mask;
  std::vector<std::vector<int>> children;
  MedusaLayout(const MedusaTree& tree, int K);
  // The pass's tokens from the root and each head's top choices (top[k], most likely first): the first n nodes
  // (n <= n_all: the room left), cut earlier where a rank is missing from top (a tiny vocabulary). Returns n.
  int fill(int32_t root, const std::vector<std::vector<int32_t>>& top, int n, int32_t* tokens) const;
  // Greedy acceptance over a pass of n nodes with logits [n][V]: from the root, the child whose token is the arg
  // max over [0, SV) at its parent (the lowest id among equal maxima). path: the nodes kept, root first; returns
  // the arg max after the path's last node (the next root).
  int32_t greedy_path(const int32_t* tokens, int n, const float* logits, int V, int SV, std::vector<int32_t>& path) const;
  // Typical acceptance (temperature temp, ε threshold, α alpha): the longest path of acceptable nodes (the
  // earlier node on ties), root first; the caller samples the next root at its last node.
  void typical_path(const int32_t* tokens, int n, const float* logits, int V, int SV, float temp, float threshold,
                    float alpha, std::vector<int32_t>& path) const;
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
