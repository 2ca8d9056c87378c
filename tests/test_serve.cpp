// kiln serve's pieces: the paged continuous-batching decoder against the contiguous decoder run one sequence at
// a time (itself checked against the full forward in test_generate.cpp), the KV block pool's sharing and
// eviction, stop strings across token boundaries, and the request parser's errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/rng.h"
#include "infer/generate.h"
#include "infer/sampler.h"
#include "kernels/argmax.h"
#include "models/family.h"
#include "models/model.h"
#include "serve/engine.h"
#include "serve/kv_blocks.h"
#include "serve/request.h"
#include "serve/stop_text.h"
#include "decode_test_util.h"
#include "serve_test_util.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::greedy_alone;
using kiln::test::random_model;

namespace {

const char* kConfigs[] = {
    R"({"model_type":"llama","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":12,
       "num_hidden_layers":2,"intermediate_size":40,"vocab_size":41,"max_position_embeddings":64,"rms_norm_eps":1e-5,
       "rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false})",
    R"({"model_type":"mistral","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":1,"num_hidden_layers":2,
       "intermediate_size":48,"vocab_size":37,"max_position_embeddings":64,"rms_norm_eps":1e-5,"rope_theta":10000.0,
       "sliding_window":5,"hidden_act":"silu","tie_word_embeddings":false})",
    R"({"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":32,"vocab_size":37,"n_positions":64})",
    // Latent attention (the cache holds c_KV and the rotary key): the query bottleneck with yarn and a MoE layer
    // (8 routed experts, top 2 in 2 of 4 groups, a shared one); and queries straight from x without interleave.
    R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":4,
       "num_hidden_layers":2,"intermediate_size":40,"vocab_size":41,"max_position_embeddings":64,"rms_norm_eps":1e-6,
       "rope_theta":10000.0,"q_lora_rank":24,"kv_lora_rank":20,"qk_nope_head_dim":8,"qk_rope_head_dim":8,
       "v_head_dim":16,"head_dim":8,"rope_scaling":{"rope_type":"yarn","factor":4.0,
       "original_max_position_embeddings":16,"beta_fast":32,"beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0},
       "first_k_dense_replace":1,"n_routed_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":12,
       "n_shared_experts":1,"n_group":4,"topk_group":2,"routed_scaling_factor":2.5,"norm_topk_prob":true,
       "hidden_act":"silu","tie_word_embeddings":false})",
    R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,"num_hidden_layers":2,
       "intermediate_size":36,"vocab_size":37,"max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":10000.0,
       "q_lora_rank":null,"kv_lora_rank":12,"qk_nope_head_dim":12,"qk_rope_head_dim":4,"v_head_dim":32,
       "rope_interleave":false,"hidden_act":"silu","tie_word_embeddings":false})",
};

bool close(const float* a, const float* b, int n, float tol) {
  for (int i = 0; i < n; i++)
    if (!(std::fabs(a[i] - b[i]) <= tol * (1.0f + std::fabs(b[i])))) return false;
  return true;
}

// One sequence fed token by token after its prompt (teacher forcing): the reference logits of each step.
// With hidden: the final norm's output behind each of those logits.
std::vector<std::vector<float>> reference(const ModelConfig& cfg, const float* params, const std::vector<int32_t>& t,
                                          int prompt, std::vector<std::vector<float>>* hidden = nullptr) {
  auto dec = make_decoder(cfg, params);
  const int V = cfg.vocab_size, C = cfg.d_model;
  std::vector<std::vector<float>> out;
  const float* lg = dec->forward(t.data(), prompt);
  out.emplace_back(lg, lg + V);
  if (hidden) hidden->emplace_back(dec->hidden(), dec->hidden() + C);
  for (size_t i = size_t(prompt); i < t.size(); i++) {
    lg = dec->forward(&t[i], 1);
    out.emplace_back(lg, lg + V);
    if (hidden) hidden->emplace_back(dec->hidden(), dec->hidden() + C);
  }
  return out;
}

class PagedDecoderTest : public ::testing::TestWithParam<const char*> {};

}  // namespace

// Three sequences of different lengths join at different steps, with blocks of 4 positions scattered over the
// pool; a fourth reuses the first's two full prompt blocks and prefills only the rest. Every step's logits
// equal the contiguous decoder's for that sequence alone, bit for bit for the three that prefilled themselves
// (the fourth's prefill attends over cached blocks, the contiguous decoder's over the chunk: a rounding apart).
TEST_P(PagedDecoderTest, MatchesContiguousDecoderPerSequence) {
  const ModelConfig cfg = parse_model_config(GetParam(), "config.json");
  auto model = random_model(cfg, 11);
  const int V = cfg.vocab_size, bs = 4;
  BatchDecoderOptions bo;
  bo.block_size = bs;
  bo.num_blocks = 64;
  auto dec = make_batch_decoder(cfg, model->host_params(), bo);

  struct S {
    std::vector<int32_t> tokens;
    int prompt, start;  // prompt length; the step at which it joins
    std::vector<int32_t> blocks;
    int past = 0, shared = 0;
    std::vector<std::vector<float>> ref;
  };
  Rng r(3);
  auto toks = [&](int n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(r.below(uint64_t(V)));
    return t;
  };
  std::vector<S> seqs = {{toks(30), 11, 0, {}}, {toks(20), 5, 0, {}}, {toks(14), 1, 2, {}}, {{}, 13, 4, {}}};
  // The fourth starts with the first's 8 prompt tokens (two full blocks, shared) and goes its own way.
  seqs[3].tokens = seqs[0].tokens;
  seqs[3].tokens.resize(8);
  for (int32_t t : toks(16)) seqs[3].tokens.push_back(t);
  // Blocks: ids handed out in a scrambled order.
  int next = 0;
  auto block = [&] { return int32_t((next++ * 37 + 5) % 64); };
  for (size_t i = 0; i < seqs.size(); i++) {
    S& s = seqs[i];
    s.ref = reference(cfg, model->host_params(), s.tokens, s.prompt);
    if (i == 3) {
      s.blocks = {seqs[0].blocks[0], seqs[0].blocks[1]};
      s.past = s.shared = 8;
    }
    while (int(s.blocks.size()) * bs < int(s.tokens.size())) s.blocks.push_back(block());
  }
  for (int step = 0;; step++) {
    std::vector<BatchRow> rows;
    std::vector<S*> who;
    for (S& s : seqs) {
      if (step < s.start || s.past >= int(s.tokens.size()) - 1) continue;
      BatchRow row;
      row.tokens = s.tokens.data() + s.past;
      row.n = s.past < s.prompt ? s.prompt - s.past : 1;
      row.past = s.past;
      row.blocks = s.blocks.data();
      row.n_blocks = int(s.blocks.size());
      rows.push_back(row);
      who.push_back(&s);
    }
    if (rows.empty()) break;
    const float* lg = dec->forward(rows);
    for (size_t i = 0; i < rows.size(); i++) {
      S& s = *who[i];
      s.past += rows[i].n;
      const size_t k = size_t(s.past - s.prompt);
      ASSERT_TRUE(close(lg + i * size_t(V), s.ref[k].data(), V, 2e-4f))
          << "step " << step << ", sequence " << (&s - seqs.data()) << ", position " << s.past - 1;
      // A sequence that computed its own prompt runs the same products and attention as alone, batch or not
      // (kernels/gemv.h's batch forms: each row's sums do not depend on the others), so its bits are the same;
      // not with a mixture of experts, whose grouped products take every sequence's rows of an expert at once.
      if (s.shared == 0 && cfg.n_experts == 0) {
        EXPECT_TRUE(std::equal(lg + i * size_t(V), lg + (i + 1) * size_t(V), s.ref[k].data()))
            << "step " << step << ", sequence " << (&s - seqs.data()) << ", position " << s.past - 1 << " in a batch of "
            << rows.size();
      }
    }
  }
  // Alone in the batch: the very same bits as the contiguous decoder (the same products, the same order).
  const S& s = seqs[1];
  auto solo = make_decoder(cfg, model->host_params());
  BatchRow row{s.tokens.data(), s.prompt, 0, s.blocks.data(), int(s.blocks.size())};
  const float* a = dec->forward({row});
  const float* b = solo->forward(s.tokens.data(), s.prompt);
  EXPECT_TRUE(std::equal(a, a + V, b));
}

// Speculative checks (serve/engine.h): after their prompts, three sequences run continuations of 4, 4 and 2
// tokens in one forward with every position's logits (the two of 4 share a pass), beside a single-token row
// and a fresh prompt; they roll back to their prompts and run their real continuations over the rejected
// positions. Every logits row, and the hidden state kept behind it (Medusa's input), equals the contiguous
// decoder's for that sequence alone (teacher-forced).
TEST_P(PagedDecoderTest, ChecksContinuationsWithAllLogitsAndRollsBack) {
  const ModelConfig cfg = parse_model_config(GetParam(), "config.json");
  auto model = random_model(cfg, 13);
  const int V = cfg.vocab_size, bs = 4;
  BatchDecoderOptions bo;
  bo.block_size = bs;
  bo.num_blocks = 64;
  bo.keep_hidden = true;
  auto dec = make_batch_decoder(cfg, model->host_params(), bo);
  const int C = cfg.d_model;
  Rng r(5);
  auto toks = [&](int n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(r.below(uint64_t(V)));
    return t;
  };
  struct S {
    std::vector<int32_t> real, wrong;  // prompt + continuation; prompt + a continuation to be rejected
    int prompt, n;                     // the continuation's length
    std::vector<int32_t> blocks;
    std::vector<std::vector<float>> ref_real, ref_wrong, hid_real, hid_wrong;
  };
  std::vector<S> seqs = {{toks(13), {}, 9, 4, {}}, {toks(11), {}, 7, 4, {}}, {toks(8), {}, 6, 2, {}},
                         {toks(6), {}, 5, 1, {}}};
  int next = 0;
  for (S& s : seqs) {
    s.wrong.assign(s.real.begin(), s.real.begin() + s.prompt);
    for (int32_t t : toks(s.n)) s.wrong.push_back(t);
    s.ref_real = reference(cfg, model->host_params(), s.real, s.prompt, &s.hid_real);
    s.ref_wrong = reference(cfg, model->host_params(), s.wrong, s.prompt, &s.hid_wrong);
    while (int(s.blocks.size()) * bs < int(s.real.size())) s.blocks.push_back(int32_t((next++ * 29 + 3) % 64));
  }
  const std::vector<int32_t> fresh = toks(7);
  std::vector<int32_t> fresh_blocks = {60, 62};  // not among the ids above
  auto row = [](const std::vector<int32_t>& t, int past, int n, const std::vector<int32_t>& blocks, bool all) {
    BatchRow b{t.data() + past, n, past, blocks.data(), int(blocks.size())};
    b.all_logits = all;
    return b;
  };
  std::vector<BatchRow> rows;
  for (const S& s : seqs) rows.push_back(row(s.real, 0, s.prompt, s.blocks, false));
  dec->forward(rows);
  for (int round = 0; round < 2; round++) {
    rows.clear();
    for (const S& s : seqs) {
      const std::vector<int32_t>& t = round == 0 ? s.wrong : s.real;
      // The last prompt token again (as the engine feeds its newest token), then the continuation.
      rows.push_back(row(t, s.prompt - 1, s.n + 1, s.blocks, s.n > 1));
    }
    rows.push_back(row(fresh, 0, int(fresh.size()), fresh_blocks, false));
    const float* lg = dec->forward(rows);
    size_t off = 0;
    for (const S& s : seqs) {
      const auto& ref = round == 0 ? s.ref_wrong : s.ref_real;
      const int m = s.n > 1 ? s.n + 1 : 1;
      for (int j = 0; j < m; j++) {
        // Position prompt - 1 + j (or the last one for the single-token row).
        const size_t k = size_t(s.n > 1 ? j : s.n);
        ASSERT_TRUE(close(lg + (off + size_t(j)) * size_t(V), ref[k].data(), V, 2e-4f))
            << "round " << round << ", sequence " << (&s - seqs.data()) << ", row " << j;
        const auto& hid = round == 0 ? s.hid_wrong : s.hid_real;
        ASSERT_TRUE(close(dec->hidden() + (off + size_t(j)) * size_t(C), hid[k].data(), C, 2e-4f))
            << "hidden: round " << round << ", sequence " << (&s - seqs.data()) << ", row " << j;
      }
      off += size_t(m);
    }
  }
}

namespace {

using test::Served;

// Greedy jobs through an engine, with a draft model proposing K tokens a round, or prompt lookup (neither: plain
// serving); drafted: the proposals made.
std::vector<Served> serve_all(BatchDecoder& dec, BatchDecoder* draft, int K, std::optional<int32_t> eot,
                              const std::vector<std::vector<int32_t>>& prompts, int max_new,
                              const std::vector<std::string>& stop, bool lookup = false, int64_t* drafted = nullptr) {
  serve::EngineOptions eo;
  eo.parallel = 8;
  eo.eot = eot;
  eo.draft = draft;
  eo.draft_tokens = K;
  if (lookup) eo.prompt_lookup = PromptLookupParams{};
  serve::JobParams jp;
  jp.temperature = 0;
  jp.stop = stop;
  serve::Metrics metrics;
  auto out = test::serve_jobs(dec, eo, prompts, max_new, jp, metrics);
  if (draft) EXPECT_GT(metrics.spec_drafted.load(), 0);
  if (drafted) *drafted = metrics.spec_drafted.load();
  return out;
}

}  // namespace

// Speculative rounds in the engine (serve/engine.h): three prompts served at once with a draft that always
// agrees (the target itself: whole runs accepted) or one that mostly does not (another random model), or prompt
// lookup's proposals (repeats in the prompts and the output), against the contiguous decoder's greedy tokens alone. The text matches; an end-of-text token inside an accepted run
// ends the choice there ("stop", the tokens up to and with it); a stop string inside a run cuts the text where
// plain serving cuts it; max_tokens is never passed.
TEST(ServeSpeculative, EngineGreedyEqualsPlainWithEndOfTextAndStopsInsideRuns) {
  const ModelConfig cfg = parse_model_config(kConfigs[2], "config.json");
  auto model = random_model(cfg, 17), other = random_model(cfg, 29);
  BatchDecoderOptions bo;
  bo.block_size = 4;
  bo.num_blocks = 96;
  auto dec = make_batch_decoder(cfg, model->host_params(), bo);
  auto same = make_batch_decoder(cfg, model->host_params(), bo);
  auto diff = make_batch_decoder(cfg, other->host_params(), bo);
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {7, 3}, {30, 20, 10, 0, 11, 12, 13, 20, 10}};
  const int max_new = 20;
  std::vector<std::vector<int32_t>> ref;
  for (const auto& p : prompts) ref.push_back(greedy_alone(cfg, model->host_params(), p, max_new));
  auto text_of = [](const std::vector<int32_t>& t, size_t n) {
    std::string s;
    for (size_t i = 0; i < n && i < t.size(); i++) s += char('A' + t[i]);
    return s;
  };
  // End of text: the first prompt's 7th greedy token (its first occurrence ends the plain text).
  const int32_t eot = ref[0][6];
  for (BatchDecoder* draft : {same.get(), diff.get(), static_cast<BatchDecoder*>(nullptr)}) {
    for (int K : {1, 4}) {
      const bool lookup = !draft;
      SCOPED_TRACE(std::string(lookup ? "prompt lookup" : draft == same.get() ? "agreeing draft" : "random draft") +
                   ", K " + std::to_string(K));
      int64_t drafted = 0;
      const auto full = serve_all(*dec, draft, K, std::nullopt, prompts, max_new, {}, lookup, &drafted);
      EXPECT_GT(drafted, 0);  // prompt lookup too: the repeats in the third prompt and the outputs
      for (size_t i = 0; i < prompts.size(); i++) {
        EXPECT_EQ(full[i].text, text_of(ref[i], size_t(max_new))) << "prompt " << i;
        EXPECT_EQ(full[i].tokens, max_new);
        EXPECT_EQ(full[i].finish, "length");
      }
      const auto ended = serve_all(*dec, draft, K, eot, prompts, max_new, {}, lookup);
      for (size_t i = 0; i < prompts.size(); i++) {
        const auto at = std::find(ref[i].begin(), ref[i].end(), eot);
        const size_t n = size_t(at - ref[i].begin());
        EXPECT_EQ(ended[i].text, text_of(ref[i], n)) << "prompt " << i;  // end of text has no text
        EXPECT_EQ(ended[i].tokens, at == ref[i].end() ? max_new : int(n) + 1) << "prompt " << i;
        EXPECT_EQ(ended[i].finish, at == ref[i].end() ? "length" : "stop") << "prompt " << i;
      }
      // A stop string from the middle of each text.
      std::vector<std::string> stops;
      for (const auto& r : ref) stops.push_back(text_of(r, 12).substr(9, 2));
      for (size_t i = 0; i < prompts.size(); i++) {
        const auto stopped = serve_all(*dec, draft, K, std::nullopt, {prompts[i]}, max_new, {stops[i]}, lookup);
        const std::string t = text_of(ref[i], size_t(max_new));
        EXPECT_EQ(stopped[0].text, t.substr(0, t.find(stops[i]))) << "prompt " << i;
        EXPECT_EQ(stopped[0].finish, "stop");
      }
    }
  }
}

namespace {
std::string family_name(const ::testing::TestParamInfo<const char*>& i) {
  static const char* const names[] = {"llama", "mistral", "gpt2", "deepseek_v3_moe", "deepseek_v3_direct_q"};
  return names[i.index];
}
}  // namespace

INSTANTIATE_TEST_SUITE_P(Families, PagedDecoderTest, ::testing::ValuesIn(kConfigs), family_name);

// kiln serve --weights-dtype: four sequences decoded greedily together (joining at different steps, so the
// batched step has 1 to 4 rows) pick the tokens that `kiln generate --weights-dtype` (the contiguous decoder with
// the same narrow copies, alone) picks, in every format.
TEST(PagedDecoder, NarrowWeightsGreedyEqualsGenerate) {
  const ModelConfig cfg = parse_model_config(kConfigs[0], "config.json");
  auto model = random_model(cfg, 21);
  const int V = cfg.vocab_size, bs = 8, new_tokens = 24;
  for (WeightFormat f : {WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0}) {
    SCOPED_TRACE(weight_format_name(f));
    BatchDecoderOptions bo;
    bo.block_size = bs;
    bo.num_blocks = 32;
    bo.weights = f;
    auto dec = make_batch_decoder(cfg, model->host_params(), bo);
    DecoderOptions dopt;
    dopt.weights = f;
    auto solo = make_decoder(cfg, model->host_params(), dopt);
    struct S {
      std::vector<int32_t> tokens, want;
      int prompt, start, past = 0;
      std::vector<int32_t> blocks;
    };
    Rng r(4);
    std::vector<S> seqs(4);
    const int prompts[] = {9, 3, 14, 1}, starts[] = {0, 0, 3, 5};
    for (size_t i = 0; i < seqs.size(); i++) {
      S& s = seqs[i];
      s.prompt = prompts[i], s.start = starts[i];
      for (int k = 0; k < s.prompt; k++) s.tokens.push_back(int32_t(r.below(uint64_t(V))));
      for (int k = 0; k * bs < s.prompt + new_tokens; k++) s.blocks.push_back(int32_t(i * 8 + size_t(k)));
      SamplingParams sp;
      sp.temperature = 0;
      Sampler greedy(sp);
      GenerateLimits lim;
      lim.max_new = new_tokens;
      generate(*solo, greedy, s.tokens, lim, [&](int32_t t) { s.want.push_back(t); return true; });
      ASSERT_EQ(int(s.want.size()), new_tokens);
    }
    for (int step = 0;; step++) {
      std::vector<BatchRow> rows;
      std::vector<S*> who;
      for (S& s : seqs) {
        if (step < s.start || int(s.tokens.size()) >= s.prompt + new_tokens) continue;
        BatchRow row;
        row.tokens = s.tokens.data() + s.past;
        row.n = int(s.tokens.size()) - s.past;
        row.past = s.past;
        row.blocks = s.blocks.data();
        row.n_blocks = int(s.blocks.size());
        rows.push_back(row);
        who.push_back(&s);
      }
      if (rows.empty()) break;
      const float* lg = dec->forward(rows);
      for (size_t i = 0; i < rows.size(); i++) {
        who[i]->past += rows[i].n;
        who[i]->tokens.push_back(argmax(lg + i * size_t(V), V));
      }
    }
    for (const S& s : seqs)
      EXPECT_EQ(std::vector<int32_t>(s.tokens.begin() + s.prompt, s.tokens.end()), s.want)
          << "sequence " << (&s - seqs.data());
  }
}

TEST(PagedDecoder, RejectsBadRows) {
  const ModelConfig cfg = parse_model_config(kConfigs[2], "config.json");
  auto model = random_model(cfg, 1);
  BatchDecoderOptions bo;
  bo.block_size = 4;
  bo.num_blocks = 8;
  auto dec = make_batch_decoder(cfg, model->host_params(), bo);
  const std::vector<int32_t> t = {1, 2, 3, 4, 5}, blocks = {0, 1}, bad_block = {0, 9}, bad_tok = {1, 99};
  EXPECT_THROW(dec->forward({BatchRow{t.data(), 5, 0, blocks.data(), 1}}), Error);     // too few blocks
  EXPECT_THROW(dec->forward({BatchRow{t.data(), 5, 0, bad_block.data(), 2}}), Error);  // outside the pool
  EXPECT_THROW(dec->forward({BatchRow{bad_tok.data(), 2, 0, blocks.data(), 2}}), Error);
  EXPECT_THROW(dec->forward({BatchRow{t.data(), 1, 64, blocks.data(), 2}}), Error);    // past the context
  EXPECT_NO_THROW(dec->forward({BatchRow{t.data(), 5, 0, blocks.data(), 2}}));
}

TEST(BlockPool, SharesFullPromptBlocksAndEvictsLeastRecentlyUsed) {
  serve::BlockPool pool(6, 4, true);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // two full blocks inside a[0, 9)
  std::vector<int32_t> ba, bb, bc;
  int cached = -1;
  ASSERT_TRUE(pool.acquire(a, 12, ba, cached));
  EXPECT_EQ(ba.size(), 3u);
  EXPECT_EQ(cached, 0);
  pool.publish(a, ba);
  // The same first 8 tokens: the two blocks are shared; the rest is new.
  std::vector<int32_t> b = {1, 2, 3, 4, 5, 6, 7, 8, 42};
  ASSERT_TRUE(pool.acquire(b, 9, bb, cached));
  EXPECT_EQ(cached, 8);
  ASSERT_EQ(bb.size(), 3u);
  EXPECT_EQ(bb[0], ba[0]);
  EXPECT_EQ(bb[1], ba[1]);
  EXPECT_NE(bb[2], ba[2]);
  EXPECT_EQ(pool.used_blocks(), 4);
  // A prompt of exactly 8 tokens shares only the first block: its last token must run in a block of its own.
  std::vector<int32_t> c8(a.begin(), a.begin() + 8);
  ASSERT_TRUE(pool.acquire(c8, 8, bc, cached));
  EXPECT_EQ(cached, 4);
  pool.release(bc);
  // Different second block: only the first is shared.
  std::vector<int32_t> d = {1, 2, 3, 4, 9, 9, 9, 9, 9};
  std::vector<int32_t> bd;
  ASSERT_TRUE(pool.acquire(d, 9, bd, cached));
  EXPECT_EQ(cached, 4);
  pool.release(bd);
  pool.release(ba);
  pool.release(bb);
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.cached_blocks(), 2);
  // Taking the whole pool evicts the cached blocks; then nothing is shared.
  std::vector<int32_t> all;
  ASSERT_TRUE(pool.acquire({7, 7}, 24, all, cached));
  EXPECT_EQ(all.size(), 6u);
  EXPECT_EQ(pool.cached_blocks(), 0);
  std::vector<int32_t> none;
  EXPECT_FALSE(pool.acquire({1}, 1, none, cached));  // full: the caller queues
  pool.release(all);
  ASSERT_TRUE(pool.acquire(a, 10, ba, cached));
  EXPECT_EQ(cached, 0);
}

TEST(StopText, StopsAcrossTokensAndHoldsBackPrefixes) {
  serve::StopText s({"END", "##"});
  std::string out;
  out += s.push("Hello E");
  EXPECT_EQ(out, "Hello ");  // "E" may start "END"
  out += s.push("x #");
  EXPECT_EQ(out, "Hello Ex ");
  out += s.push("#tail");
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(out, "Hello Ex ");
  EXPECT_EQ(s.push("more"), "");
  EXPECT_EQ(s.finish(), "");
  // A stop string split over three tokens; the earliest of two stops wins.
  serve::StopText t({"abc", "bc!"});
  std::string o = t.push("xa");
  o += t.push("b");
  o += t.push("c!");
  EXPECT_EQ(o, "x");
  // Incomplete UTF-8 is held until its character completes; no stop: finish releases the rest.
  serve::StopText u;
  EXPECT_EQ(u.push("caf\xC3"), "caf");
  EXPECT_EQ(u.push("\xA9!"), "\xC3\xA9!");
  EXPECT_EQ(u.push("\xE2\x82"), "");
  EXPECT_EQ(u.finish(), "\xE2\x82");
}

TEST(ServeRequest, ParsesFieldsAndNamesBadOnes) {
  using serve::ApiError;
  const auto r = serve::parse_gen_request(
      R"({"model":"m","prompt":["a",[1,2]],"max_tokens":7,"temperature":0,"stop":"x","n":2,"seed":-3,
          "stream":true,"stream_options":{"include_usage":true},"logprobs":2,"unknown":{"a":1}})", false);
  EXPECT_EQ(r.prompts.size(), 2u);
  EXPECT_TRUE(r.prompts[1].is_ids);
  EXPECT_EQ(*r.max_tokens, 7);
  EXPECT_EQ(r.n, 2);
  EXPECT_EQ(*r.seed, -3);
  EXPECT_TRUE(r.include_usage);
  EXPECT_EQ(r.top_logprobs, 2);
  auto param_of = [](const std::string& body, bool chat) {
    try {
      serve::parse_gen_request(body, chat);
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400) << body;
      return e.param.empty() ? std::string("<body>") : e.param;
    }
    return std::string("<accepted>");
  };
  EXPECT_EQ(param_of("{", false), "<body>");
  EXPECT_EQ(param_of("[1]", false), "<body>");
  EXPECT_EQ(param_of(R"({"prompt":"a","max_tokens":-1})", false), "max_tokens");
  EXPECT_EQ(param_of(R"({"prompt":"a","max_tokens":0})", false), "max_tokens");
  EXPECT_EQ(param_of(R"({"prompt":"a","max_tokens":1e300})", false), "max_tokens");
  EXPECT_EQ(param_of(R"({"prompt":"a","max_tokens":"5"})", false), "max_tokens");
  EXPECT_EQ(param_of(R"({"prompt":"a","temperature":3})", false), "temperature");
  EXPECT_EQ(param_of(R"({"prompt":"a","n":1000})", false), "n");
  EXPECT_EQ(param_of(R"({"prompt":[1,-2]})", false), "prompt[1]");
  EXPECT_EQ(param_of(R"({"prompt":{}})", false), "prompt");
  EXPECT_EQ(param_of(R"({"messages":[]})", true), "messages");
  EXPECT_EQ(param_of(R"({"messages":[{"role":"wizard","content":"x"}]})", true), "messages[0].role");
  EXPECT_EQ(param_of(R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})", true),
            "messages[0].content[0].type");
  EXPECT_EQ(param_of(R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":3})", true), "top_logprobs");
  EXPECT_EQ(param_of(std::string(100, '[') + std::string(100, ']'), false), "<body>");
  EXPECT_EQ(param_of(R"({"prompt":"a","stop":["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]})", false),
            "stop");
}
