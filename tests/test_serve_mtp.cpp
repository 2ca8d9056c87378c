// MTP self-drafting in kiln serve (serve/engine.h, models/batch_decoder.h): the paged decoder's module passes
// against the training forward's depth-k logits (several sequences batched, fresh and continued, an entry run
// again after it read a rejected draft), and the engine's greedy output against plain greedy decoding alone for
// 1, 2 and 3 drafts a round on a model with three MTP modules whose drafts pass about 60% of the time (concurrent
// streams, to the context limit, end-of-text and stop strings inside a round) and on one whose drafts always pass,
// and the engine's refusals.
#include <gtest/gtest.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "models/model.h"
#include "serve/engine.h"
#include "decode_test_util.h"
#include "mtp_test_util.h"
#include "serve_test_util.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::deepseek_mtp;
using kiln::test::depth_logits;
using kiln::test::greedy_alone;
using kiln::test::agreeing_mtp_model;
using kiln::test::mtp_model;

namespace {

BatchDecoderOptions mtp_options() {
  BatchDecoderOptions bo;
  bo.block_size = 4;
  bo.num_blocks = 96;
  bo.self_draft = bo.keep_stream = true;
  return bo;
}

// One sequence's state in the decoder test: its true tokens, the target's cached length, and per depth the
// hidden states of every position so far (depth 0: the target's stream).
struct Seq {
  std::vector<int32_t> t;
  std::vector<int32_t> blocks;
  int cached = 0;
  std::vector<std::vector<float>> h;
  std::vector<std::vector<float>> ref;  // depth k's training-forward logits, [T, V]
};

}  // namespace

TEST(ServeMTP, ModuleDraftsEqualTrainingForward) {
  const ModelConfig cfg = deepseek_mtp(48, 37, 3);
  const int V = cfg.vocab_size, C = cfg.d_model, D = 3, T = 19;
  auto m = mtp_model(cfg, 61, 1.0f);
  auto dec = make_batch_decoder(cfg, m->host_params(), mtp_options());
  ASSERT_EQ(dec->self_draft_depth(), D);
  Rng r(62);
  std::vector<Seq> seqs(3);
  int next_block = 0;
  for (Seq& s : seqs) {
    s.t.resize(T + 1);
    for (int32_t& x : s.t) x = int32_t(r.below(uint64_t(V)));
    for (int k = 1; k <= D; k++) s.ref.push_back(depth_logits(cfg, *m, k, s.t, T));
    for (int i = 0; i < 6; i++) s.blocks.push_back(int32_t((next_block++ * 37 + 5) % 96));
    s.h.assign(size_t(D), {});
  }
  // The target over n more tokens of each sequence; its streams become depth 0's hidden states.
  auto feed = [&](const std::vector<int>& n) {
    std::vector<BatchRow> rows;
    for (size_t i = 0; i < seqs.size(); i++) {
      BatchRow row;
      row.tokens = seqs[i].t.data() + seqs[i].cached;
      row.n = n[i];
      row.past = seqs[i].cached;
      row.blocks = seqs[i].blocks.data();
      row.n_blocks = int(seqs[i].blocks.size());
      rows.push_back(row);
    }
    dec->forward(rows);
    size_t off = 0;
    for (size_t i = 0; i < seqs.size(); i++) {
      const float* st = dec->stream() + off * size_t(C);
      seqs[i].h[0].insert(seqs[i].h[0].end(), st, st + size_t(n[i]) * C);
      seqs[i].cached += n[i];
      off += size_t(n[i]);
    }
  };
  // Module k over positions [from[i], cached) of each sequence with the true tokens: its guess at the last one
  // is depth k's logits there, and its outputs are depth k's hidden states.
  int compared = 0;
  auto module = [&](int k, const std::vector<int>& from, const char* what) {
    std::vector<DraftRow> rows;
    std::vector<std::vector<int32_t>> toks(seqs.size());
    for (size_t i = 0; i < seqs.size(); i++) {
      Seq& s = seqs[i];
      for (int p = from[i]; p < s.cached; p++) toks[i].push_back(s.t[size_t(p + k)]);
      rows.push_back(test::draft_row(toks[i].data(), s.h[size_t(k - 1)].data() + size_t(from[i]) * C,
                                     s.cached - from[i], from[i], s.blocks));
    }
    const float* lg = dec->self_draft(k, rows);
    size_t off = 0;
    for (size_t i = 0; i < seqs.size(); i++) {
      Seq& s = seqs[i];
      EXPECT_TRUE(test::all_close(lg + i * size_t(V), &s.ref[size_t(k - 1)][size_t(s.cached - 1) * V], size_t(V),
                                  1e-4, 1e-4))
          << what << ": module " << k << ", sequence " << i << " at position " << s.cached - 1;
      compared++;
      if (k < D) {
        std::vector<float>& h = s.h[size_t(k)];
        h.resize(size_t(from[i]) * C);
        const float* o = dec->draft_hidden() + off * size_t(C);
        h.insert(h.end(), o, o + size_t(rows[i].n) * C);
      }
      off += size_t(rows[i].n);
    }
  };
  // Prompts of 7, 3 and 11 tokens (three passes: each length its own), every module over all of them.
  feed({7, 3, 11});
  for (int k = 1; k <= D; k++) module(k, {0, 0, 0}, "after the prompts");
  // Two more tokens each (one pass of three rows), the modules catching up over them.
  feed({2, 2, 2});
  for (int k = 1; k <= D; k++) module(k, {7, 3, 11}, "two more tokens");
  // Module 2's entries at the newest position read a wrong token first (a rejected draft), then the right one:
  // the entry is overwritten in place.
  feed({1, 1, 1});
  module(1, {9, 5, 13}, "one more token");
  {
    std::vector<DraftRow> rows;
    std::vector<int32_t> wrong;
    for (Seq& s : seqs) wrong.push_back((s.t[size_t(s.cached + 1)] + 1) % V);
    for (size_t i = 0; i < seqs.size(); i++)
      rows.push_back(test::draft_row(&wrong[i], seqs[i].h[1].data() + size_t(seqs[i].cached - 1) * C, 1,
                                     seqs[i].cached - 1, seqs[i].blocks));
    dec->self_draft(2, rows);
  }
  module(2, {9, 5, 13}, "after a rejected draft");
  module(3, {9, 5, 13}, "after a rejected draft");
  EXPECT_EQ(compared, 3 * 9);
  // Contract: no module past the model's, rows with tokens and hidden states.
  std::vector<DraftRow> none(1);
  EXPECT_THROW(dec->self_draft(4, none), Error);
  EXPECT_THROW(dec->self_draft(1, none), Error);
}

namespace {

std::vector<test::Served> serve_mtp(BatchDecoder& dec, int K, std::optional<int32_t> eot,
                                    const std::vector<std::vector<int32_t>>& prompts, const std::vector<int>& max_new,
                                    const std::vector<std::string>& stop, serve::Metrics& metrics) {
  serve::EngineOptions eo;
  eo.parallel = 8;
  eo.eot = eot;
  eo.mtp = K > 0;
  eo.draft_tokens = std::max(K, 1);
  serve::JobParams jp;
  jp.temperature = 0;
  jp.stop = stop;
  std::vector<test::Served> out;
  // One job per prompt, each with its own max_tokens: submitted together through serve_jobs one group per
  // budget (the budgets here are to each prompt's context limit).
  for (size_t i = 0; i < prompts.size(); i++) {
    const auto one = test::serve_jobs(dec, eo, {prompts[i]}, max_new[i], jp, metrics);
    out.push_back(one[0]);
  }
  return out;
}

std::string letters(const std::vector<int32_t>& t, size_t n) {
  std::string s;
  for (size_t i = 0; i < n && i < t.size(); i++) s += char('A' + t[i]);
  return s;
}

}  // namespace

// Greedy serving with MTP drafts equals plain greedy decoding alone: four prompts served together (the
// context limit reached by each), end of text and stop strings inside rounds; every round's drafts were
// checked and some accepted.
TEST(ServeMTP, EngineGreedyEqualsPlainGreedy) {
  const int ctx = 64;
  const ModelConfig cfg = deepseek_mtp(ctx, 53, 3);
  auto m = agreeing_mtp_model(cfg, 75, 0.3f);  // about 60% of the drafts pass
  auto dec = make_batch_decoder(cfg, m->host_params(), mtp_options());
  Rng r(5);
  std::vector<int32_t> long_prompt(30);
  for (int32_t& x : long_prompt) x = int32_t(r.below(uint64_t(cfg.vocab_size)));
  const std::vector<std::vector<int32_t>> prompts = {{5}, {1, 2, 3, 4}, {50, 17, 33, 8, 41, 2, 2, 40, 11},
                                                     long_prompt};
  std::vector<int> budget;  // to the context limit
  std::vector<std::vector<int32_t>> ref;
  for (const auto& p : prompts) {
    budget.push_back(ctx - int(p.size()));
    ref.push_back(greedy_alone(cfg, m->host_params(), p, budget.back()));
  }
  // Served together: one engine, all four jobs at once.
  auto together = [&](int K, std::optional<int32_t> eot, serve::Metrics& metrics) {
    serve::EngineOptions eo;
    eo.parallel = 8;
    eo.eot = eot;
    eo.mtp = true;
    eo.draft_tokens = K;
    serve::JobParams jp;
    jp.temperature = 0;
    const int shortest = *std::min_element(budget.begin(), budget.end());
    return test::serve_jobs(*dec, eo, prompts, shortest, jp, metrics);
  };
  for (int K = 1; K <= 3; K++) {
    SCOPED_TRACE("K " + std::to_string(K));
    serve::Metrics mt;
    const auto full = serve_mtp(*dec, K, std::nullopt, prompts, budget, {}, mt);
    for (size_t i = 0; i < prompts.size(); i++) {
      EXPECT_EQ(full[i].text, letters(ref[i], size_t(budget[i]))) << "prompt " << i;
      EXPECT_EQ(full[i].finish, "length");
    }
    std::printf("K %d: %lld of %lld drafts accepted\n", K, (long long)mt.spec_accepted.load(),
                (long long)mt.spec_drafted.load());
    EXPECT_GT(mt.spec_drafted.load(), 0);
    EXPECT_GT(mt.spec_accepted.load(), 0);
    EXPECT_LT(mt.spec_accepted.load(), mt.spec_drafted.load());
    serve::Metrics mc;
    const auto conc = together(K, std::nullopt, mc);
    const int shortest = *std::min_element(budget.begin(), budget.end());
    for (size_t i = 0; i < prompts.size(); i++)
      EXPECT_EQ(conc[i].text, letters(ref[i], size_t(shortest))) << "concurrent, prompt " << i;
    // End of text: a token from the middle of the second prompt's output (its first occurrence ends each).
    const int32_t eot = ref[1][ref[1].size() / 2];
    serve::Metrics me;
    const auto ended = serve_mtp(*dec, K, eot, prompts, budget, {}, me);
    for (size_t i = 0; i < prompts.size(); i++) {
      const auto at = std::find(ref[i].begin(), ref[i].end(), eot);
      const size_t n = size_t(at - ref[i].begin());
      EXPECT_EQ(ended[i].text, letters(ref[i], n)) << "prompt " << i;
      EXPECT_EQ(ended[i].finish, at == ref[i].end() ? "length" : "stop") << "prompt " << i;
    }
    // A stop string from the middle of each text.
    for (size_t i = 0; i < prompts.size(); i++) {
      const std::string t = letters(ref[i], size_t(budget[i]));
      const std::string stop = t.substr(t.size() / 2, 2);
      serve::Metrics ms;
      const auto stopped = serve_mtp(*dec, K, std::nullopt, {prompts[i]}, {budget[i]}, {stop}, ms);
      EXPECT_EQ(stopped[0].text, t.substr(0, t.find(stop))) << "prompt " << i;
      EXPECT_EQ(stopped[0].finish, "stop");
    }
  }
}

// Modules that compute exactly the model's next-token function (agreeing_mtp_model with no context): every
// draft of every round passes, and the output is still plain greedy's.
TEST(ServeMTP, ExactModulesPassEveryDraft) {
  const int ctx = 48;
  const ModelConfig cfg = deepseek_mtp(ctx, 53, 3);
  auto m = agreeing_mtp_model(cfg, 9, 0.0f);
  auto dec = make_batch_decoder(cfg, m->host_params(), mtp_options());
  const std::vector<std::vector<int32_t>> prompts = {{3, 1, 4, 1, 5}, {9, 2, 6}};
  for (int K = 1; K <= 3; K++) {
    serve::Metrics mt;
    std::vector<int> budget;
    for (const auto& p : prompts) budget.push_back(ctx - int(p.size()));
    const auto out = serve_mtp(*dec, K, std::nullopt, prompts, budget, {}, mt);
    for (size_t i = 0; i < prompts.size(); i++)
      EXPECT_EQ(out[i].text, letters(greedy_alone(cfg, m->host_params(), prompts[i], budget[i]), size_t(budget[i])))
          << "K " << K << ", prompt " << i;
    EXPECT_GT(mt.spec_drafted.load(), 0);
    EXPECT_EQ(mt.spec_accepted.load(), mt.spec_drafted.load()) << "K " << K;
  }
}

TEST(ServeMTP, BadOptionsAreRefused) {
  const ModelConfig cfg = deepseek_mtp(32, 37, 2);
  auto m = mtp_model(cfg, 3, 1.0f);
  const Tokenizer tok = test::letter_tokenizer();
  serve::Metrics metrics;
  auto message = [&](BatchDecoder& dec, const serve::EngineOptions& eo) {
    try {
      serve::Engine e(dec, tok, eo, metrics);
    } catch (const Error& err) {
      return std::string(err.what());
    }
    return std::string();
  };
  auto dec = make_batch_decoder(cfg, m->host_params(), mtp_options());
  serve::EngineOptions eo;
  eo.mtp = true;
  eo.draft_tokens = 3;
  EXPECT_NE(message(*dec, eo).find("--draft-tokens 3: the model has 2 multi-token-prediction modules"),
            std::string::npos);
  // A decoder without the modules' cache layers.
  BatchDecoderOptions plain;
  plain.block_size = 4;
  auto without = make_batch_decoder(cfg, m->host_params(), plain);
  eo.draft_tokens = 1;
  EXPECT_NE(message(*without, eo).find("MTP self-drafting: the decoder has no multi-token-prediction modules"),
            std::string::npos);
  // A model without modules.
  const ModelConfig gpt = parse_model_config(
      R"({"model_type":"gpt2","n_layer":1,"n_head":2,"n_embd":16,"vocab_size":37,"n_positions":32})", "config.json");
  auto g = make_model(gpt, {});
  BatchDecoderOptions bo = mtp_options();
  try {
    make_batch_decoder(gpt, g->host_params(), bo);
    ADD_FAILURE() << "a gpt2 decoder with self_draft was made";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("has no multi-token-prediction modules"), std::string::npos) << err.what();
  }
}
