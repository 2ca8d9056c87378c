// Medusa trees in kiln serve: the paged decoder's tree attention, where every node's logits (and the hidden state
// behind them) must equal those of its path decoded alone by the contiguous decoder (plain causal decoding), and
// the accepted path compacted in the sequence's blocks must continue like a plain cache; the engine's greedy tree
// decoding of several concurrent streams against the contiguous decoder's greedy tokens alone, with max_tokens
// and end of text inside a tree; typical acceptance for sampled streams at its extremes.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "infer/medusa.h"
#include "models/family.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "nn/medusa.h"
#include "serve/engine.h"
#include "decode_test_util.h"
#include "serve_test_util.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::greedy_alone;
using kiln::test::random_model;

namespace {

const char* kLlama =
    R"({"model_type":"llama","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":12,
       "num_hidden_layers":2,"intermediate_size":40,"vocab_size":41,"max_position_embeddings":64,"rms_norm_eps":1e-5,
       "rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false})";
const char* kGpt2 = R"({"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":32,"vocab_size":37,"n_positions":64})";

// The contiguous decoder's last logits and hidden state after `t`.
void alone(const ModelConfig& cfg, const float* params, const std::vector<int32_t>& t, std::vector<float>& lg,
           std::vector<float>& hid) {
  auto dec = make_decoder(cfg, params);
  const float* l = dec->forward(t.data(), int(t.size()));
  lg.assign(l, l + cfg.vocab_size);
  hid.assign(dec->hidden(), dec->hidden() + cfg.d_model);
}



// A paged decoder with blocks of 4 positions that keeps each row's hidden state (the Medusa heads read it).
auto paged_decoder(const ModelConfig& cfg, const float* P, int num_blocks) {
  BatchDecoderOptions bo;
  bo.block_size = 4;
  bo.num_blocks = num_blocks;
  bo.keep_hidden = true;
  return make_batch_decoder(cfg, P, bo);
}

}  // namespace

// Two sequences (blocks of 4 scattered over the pool) each check a tree of 10 nodes in one pass beside a third
// decoding one token; every node equals its path alone. Then each keeps a different path, compacted in its
// blocks across a block boundary, and the next token's logits equal plain decoding of the kept sequence.
TEST(PagedDecoderTree, NodeLogitsEqualTheirPathAloneAndTheKeptPathContinues) {
  for (const char* json : {kLlama, kGpt2}) {
    const ModelConfig cfg = parse_model_config(json, "config.json");
    SCOPED_TRACE(cfg.family);
    auto model = random_model(cfg, 11);
    const float* P = model->host_params();
    const int V = cfg.vocab_size, C = cfg.d_model;
    auto dec = paged_decoder(cfg, P, 32);
    const std::vector<int> parent = {-1, 0, 0, 0, 1, 1, 2, 4, 4, 7};
    const int n = int(parent.size());
    const test::TreeShape tree = test::tree_from_parents(parent);
    const std::vector<std::vector<int32_t>> prompts = {{4, 8, 15, 16, 23}, {30, 2, 9}, {5, 6, 7}};
    const std::vector<std::vector<int32_t>> trees = {{7, 3, 20, 3, 9, 9, 30, 1, 2, 35}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}};
    const std::vector<std::vector<int32_t>> blocks = {{9, 2, 17, 5, 30}, {3, 22, 11, 0}, {8, 14}};
    // Prefill every prompt.
    std::vector<BatchRow> rows = test::prompt_rows(prompts, blocks);
    dec->forward(rows);
    // Two tree rows and one single token.
    const int32_t single = 12;
    for (size_t s = 0; s < 2; s++) test::set_tree_row(rows[s], trees[s], int(prompts[s].size()), tree);
    rows[2].tokens = &single;
    rows[2].n = 1;
    rows[2].past = 3;
    const float* lg = dec->forward(rows);
    const std::vector<float> got(lg, lg + size_t(2 * n + 1) * V), hid(dec->hidden(), dec->hidden() + size_t(2 * n + 1) * C);
    std::vector<float> want, want_h;
    for (size_t s = 0; s < 2; s++)
      for (int i = 0; i < n; i++) {
        std::vector<int32_t> path;  // the prompt, then the node's ancestors and itself
        for (int j = i; j >= 0; j = parent[size_t(j)]) path.insert(path.begin(), trees[s][size_t(j)]);
        path.insert(path.begin(), prompts[s].begin(), prompts[s].end());
        alone(cfg, P, path, want, want_h);
        const size_t r = s * size_t(n) + size_t(i);
        EXPECT_TRUE(test::all_close(got.data() + r * V, want.data(), size_t(V), 1e-4, 1e-4)) << "seq " << s << " node " << i;
        EXPECT_TRUE(test::all_close(hid.data() + r * C, want_h.data(), size_t(C), 1e-4, 1e-4)) << "seq " << s << " node " << i;
      }
    std::vector<int32_t> third = prompts[2];
    third.push_back(single);
    alone(cfg, P, third, want, want_h);
    EXPECT_TRUE(test::all_close(got.data() + size_t(2 * n) * V, want.data(), size_t(V), 1e-4, 1e-4));
    // Keep 0 -> 1 -> 4 -> 7 -> 9 in the first, 0 -> 3 in the second; then one token each.
    const std::vector<std::vector<int32_t>> keep = {{0, 1, 4, 7, 9}, {0, 3}};
    const int32_t next[2] = {17, 21};
    std::vector<BatchRow> cont(2);
    for (size_t s = 0; s < 2; s++) {
      dec->keep_path(blocks[s].data(), int(blocks[s].size()), int(prompts[s].size()), keep[s].data(), int(keep[s].size()));
      cont[s].tokens = &next[s];
      cont[s].n = 1;
      cont[s].past = int(prompts[s].size() + keep[s].size());
      cont[s].blocks = blocks[s].data();
      cont[s].n_blocks = int(blocks[s].size());
    }
    lg = dec->forward(cont);
    const std::vector<float> after(lg, lg + size_t(2) * V);
    for (size_t s = 0; s < 2; s++) {
      std::vector<int32_t> seq = prompts[s];
      for (int32_t j : keep[s]) seq.push_back(trees[s][size_t(j)]);
      seq.push_back(next[s]);
      alone(cfg, P, seq, want, want_h);
      EXPECT_TRUE(test::all_close(after.data() + s * V, want.data(), size_t(V), 1e-4, 1e-4)) << "seq " << s;
    }
    // Bad trees: a node that sees a later node, a tree row without a cached prefix.
    std::vector<uint64_t> bad = tree.mask;
    bad[1] |= 4;
    BatchRow r = rows[0];
    r.tree = bad.data();
    EXPECT_THROW(dec->forward({r}), Error);
    r = rows[0];
    r.past = 0;
    EXPECT_THROW(dec->forward({r}), Error);
  }
}

namespace {

struct ServedTokens {
  std::vector<int32_t> tokens;
  std::string finish;
};

// Greedy jobs (one prompt each) served at once with Medusa heads and a tree; the tokens each choice reported.
// typical: {ε, α} for sampled jobs (temperature 0.8, seed 5); heads null: plain serving.
std::vector<ServedTokens> serve_tree(BatchDecoder& dec, const nn::MedusaHeads* heads, const MedusaTree& tree,
                                     std::optional<int32_t> eot, const std::vector<std::vector<int32_t>>& prompts,
                                     int max_new, serve::Metrics& metrics,
                                     std::optional<std::pair<float, float>> typical = std::nullopt) {
  serve::EngineOptions eo;
  eo.parallel = 8;
  eo.eot = eot;
  if (heads) {
    eo.medusa = heads;
    eo.draft_tokens = heads->shape.K;
    eo.medusa_tree = tree;
  }
  if (typical && heads) {
    eo.medusa_typical = true;
    eo.typical_threshold = typical->first;
    eo.typical_alpha = typical->second;
  }
  serve::JobParams jp;
  jp.temperature = 0;
  if (typical) {
    jp.temperature = 0.8f;
    jp.seed = 5;
  }
  std::vector<ServedTokens> out;
  for (const test::Served& s : test::serve_jobs(dec, eo, prompts, max_new, jp, metrics)) {
    ServedTokens o{test::letter_ids(s.text), s.finish};
    if (eot && s.tokens == int(o.tokens.size()) + 1) o.tokens.push_back(*eot);  // end of text has no text
    out.push_back(o);
  }
  return out;
}

}  // namespace

// Four streams at once, served with heads that are the LM head plus noise (so some guesses are right) on the
// default tree and a deep chain-shaped tree: the tokens equal plain greedy's alone, with max_tokens ending
// inside a round and end of text inside a tree; paths past the root were kept (the compaction ran).
TEST(ServeMedusaTree, GreedyEqualsPlainGreedyForConcurrentStreams) {
  const ModelConfig cfg = parse_model_config(kLlama, "config.json");
  auto model = random_model(cfg, 17);
  const float* P = model->host_params();
  const int K = 4;
  const std::vector<float> hp = test::heads_from_lm_head(cfg, *model, K, 0.01f, 3);
  const nn::MedusaHeads heads{medusa_shape(cfg, K), hp.data(), nullptr};
  auto dec = paged_decoder(cfg, P, 96);
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {7, 3}, {30, 20, 10, 0, 11, 12, 13}, {9}};
  const int max_new = 23;  // not a multiple of any round: the last round is cut
  std::vector<std::vector<int32_t>> ref;
  for (const auto& p : prompts) ref.push_back(greedy_alone(cfg, P, p, max_new));
  const int32_t eot = ref[0][9];
  for (const MedusaTree& tree : {MedusaTree::default_tree(), MedusaTree::parse("0;0,0;0,0,0;0,0,0,0;1;0,1")}) {
    SCOPED_TRACE(tree.str());
    serve::Metrics m;
    const auto full = serve_tree(*dec, &heads, tree, std::nullopt, prompts, max_new, m);
    for (size_t i = 0; i < prompts.size(); i++) {
      EXPECT_EQ(full[i].tokens, ref[i]) << "prompt " << i;
      EXPECT_EQ(full[i].finish, "length");
    }
    EXPECT_GT(m.spec_rounds.load(), 0);
    EXPECT_GT(m.spec_accepted.load(), 10);
    serve::Metrics me;
    const auto ended = serve_tree(*dec, &heads, tree, eot, prompts, max_new, me);
    for (size_t i = 0; i < prompts.size(); i++) {
      const auto at = std::find(ref[i].begin(), ref[i].end(), eot);
      const std::vector<int32_t> want(ref[i].begin(), at == ref[i].end() ? at : at + 1);
      EXPECT_EQ(ended[i].tokens, want) << "prompt " << i;
      EXPECT_EQ(ended[i].finish, at == ref[i].end() ? "length" : "stop") << "prompt " << i;
    }
    // max_tokens smaller than one round's reach.
    serve::Metrics ms;
    const auto shortest = serve_tree(*dec, &heads, tree, std::nullopt, prompts, 2, ms);
    for (size_t i = 0; i < prompts.size(); i++)
      EXPECT_EQ(shortest[i].tokens, std::vector<int32_t>(ref[i].begin(), ref[i].begin() + 2)) << "prompt " << i;
  }
}

// Typical acceptance at its extremes (kiln generate's rule, infer/medusa.h): a bar no probability passes keeps no
// node, so each round samples one token at the root from the sampler's own stream: the text is plain seeded
// serving's; a bar every node passes keeps a whole path of the tree's depth every round the full tree fits.
TEST(ServeMedusaTree, TypicalAcceptanceAtItsExtremes) {
  const ModelConfig cfg = parse_model_config(kLlama, "config.json");
  auto model = random_model(cfg, 17);
  const float* P = model->host_params();
  const std::vector<float> hp = test::heads_from_lm_head(cfg, *model, 3, 0.0f, 3);
  const nn::MedusaHeads heads{medusa_shape(cfg, 3), hp.data(), nullptr};
  auto dec = paged_decoder(cfg, P, 96);
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {7, 3}};
  const MedusaTree tree = MedusaTree::parse("0;1;0,0;0,0,0");
  serve::Metrics mp, mn, ma;
  const auto plain = serve_tree(*dec, nullptr, tree, std::nullopt, prompts, 20, mp, std::pair{0.f, 0.f});
  const auto none = serve_tree(*dec, &heads, tree, std::nullopt, prompts, 20, mn, std::pair{1.0f, 1e9f});
  for (size_t i = 0; i < prompts.size(); i++) EXPECT_EQ(none[i].tokens, plain[i].tokens) << "prompt " << i;
  EXPECT_GT(mn.spec_rounds.load(), 0);
  EXPECT_EQ(mn.spec_accepted.load(), 0);
  const auto all = serve_tree(*dec, &heads, tree, std::nullopt, prompts, 20, ma, std::pair{1e-30f, 1e-30f});
  for (size_t i = 0; i < prompts.size(); i++) EXPECT_EQ(int(all[i].tokens.size()), 20) << "prompt " << i;
  // 20 tokens, 4 a full round: rounds 1..4 of each stream see the whole tree (room for 4 nodes) and keep 3.
  EXPECT_GE(ma.spec_accepted.load(), 2 * 4 * 3);
  EXPECT_EQ(ma.spec_accepted.load(), ma.spec_drafted.load());
}
