// kiln serve's pieces: the paged continuous-batching decoder against the contiguous decoder run one sequence at
// a time (itself checked against the full forward in test_generate.cpp), the KV block pool's sharing and
// eviction, stop strings across token boundaries, and the request parser's errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/rng.h"
#include "infer/generate.h"
#include "infer/sampler.h"
#include "kernels/argmax.h"
#include "models/family.h"
#include "models/model.h"
#include "serve/kv_blocks.h"
#include "serve/request.h"
#include "serve/stop_text.h"
#include "test_util.h"

using namespace kiln;

namespace {

const char* kConfigs[] = {
    R"({"model_type":"llama","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":12,
       "num_hidden_layers":2,"intermediate_size":40,"vocab_size":41,"max_position_embeddings":64,"rms_norm_eps":1e-5,
       "rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false})",
    R"({"model_type":"mistral","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":1,"num_hidden_layers":2,
       "intermediate_size":48,"vocab_size":37,"max_position_embeddings":64,"rms_norm_eps":1e-5,"rope_theta":10000.0,
       "sliding_window":5,"hidden_act":"silu","tie_word_embeddings":false})",
    R"({"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":32,"vocab_size":37,"n_positions":64})",
};

std::unique_ptr<Model> random_model(const ModelConfig& cfg, uint64_t seed) {
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(cfg, o);
  m->init_random(seed);
  Rng r(seed + 1);  // weights large enough that every position matters
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) m->host_params()[s.offset + i] += (s.shape.ndim == 1 ? 0.3f : 0.1f) * r.normal();
  m->params_changed();
  return m;
}

bool close(const float* a, const float* b, int n, float tol) {
  for (int i = 0; i < n; i++)
    if (!(std::fabs(a[i] - b[i]) <= tol * (1.0f + std::fabs(b[i])))) return false;
  return true;
}

// One sequence fed token by token after its prompt (teacher forcing): the reference logits of each step.
std::vector<std::vector<float>> reference(const ModelConfig& cfg, const float* params, const std::vector<int32_t>& t,
                                          int prompt) {
  auto dec = make_decoder(cfg, params);
  const int V = cfg.vocab_size;
  std::vector<std::vector<float>> out;
  const float* lg = dec->forward(t.data(), prompt);
  out.emplace_back(lg, lg + V);
  for (size_t i = size_t(prompt); i < t.size(); i++) {
    lg = dec->forward(&t[i], 1);
    out.emplace_back(lg, lg + V);
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
      // (kernels/gemv.h's batch forms: each row's sums do not depend on the others), so its bits are the same.
      if (s.shared == 0) {
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

namespace {
std::string family_name(const ::testing::TestParamInfo<const char*>& i) {
  static const char* const names[] = {"llama", "mistral", "gpt2"};
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
