#include "infer/mtp_decode.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "core/rng.h"

namespace kiln {

FinishReason generate_self_draft(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                 const GenerateLimits& lim, const std::function<bool(int32_t)>& on_token,
                                 SpeculativeStats* stats) {
  using Clock = std::chrono::steady_clock;
  KILN_CHECK(dec.batch() == 1, "MTP self-drafting: the decoder must have batch 1");
  const int chunk = dec.self_draft_chunk();
  KILN_CHECK(chunk >= 2, "--mtp-draft: the model (", dec.config().family,
             ") has no multi-token-prediction modules (num_nextn_predict_layers) to draft with");
  KILN_CHECK(!prompt.empty(), "generate: the prompt is empty");
  KILN_CHECK(lim.max_new >= 0, "--max-new must be >= 0, got ", lim.max_new);
  const int TV = dec.config().vocab_size;
  const int V = lim.sample_vocab > 0 ? std::min(lim.sample_vocab, TV) : TV;
  const int max_len = std::min(lim.max_length > 0 ? lim.max_length : dec.max_positions(), dec.max_positions());
  const int P = int(prompt.size());
  KILN_CHECK(P <= max_len, "the prompt has ", P, " tokens, more than the model's context of ", max_len,
             " positions");
  SpeculativeStats st;
  st.base.prompt_tokens = P;
  if (stats) *stats = st;
  if (lim.max_new == 0) return FinishReason::Length;
  if (P == max_len) return FinishReason::Context;

  Rng rng(sampler.params().seed);
  std::vector<double> p, q;
  dec.reset();
  const auto t0 = Clock::now();
  // The prompt in pieces the draft can follow: after each but the last, the module takes the piece in (its
  // guess discarded), so its cache covers the prompt; the last piece's turn comes with the first token.
  const float* lg = nullptr;
  int kept = 0;  // positions of the last forward that the cache keeps: the draft runs over them
  for (int s = 0; s < P; s += kept) {
    kept = std::min(chunk, P - s);
    lg = dec.forward(prompt.data() + s, kept);
    if (s + kept < P) dec.self_draft(&prompt[size_t(s + kept)], kept);
  }
  dense_distribution(sampler, lg, V, p);
  std::vector<int32_t> produced{sample_dense(p, rng)}, feed;

  FinishReason why = FinishReason::Length;
  bool first = true;
  for (;;) {
    // Report this round's tokens one by one; each may end generation (as plain decoding would, at it).
    if (report_round(produced, st, first, t0, on_token, lim, P, max_len, why)) break;
    const int32_t last = produced.back();
    const int committed = P + st.base.new_tokens;  // tokens so far; the cache holds committed - 1
    // A guess only when the budget and the context leave room for two tokens this round (then never again:
    // both only shrink, so the draft's cache may fall behind from here on).
    const int k = (lim.max_new - st.base.new_tokens >= 2 && max_len - committed >= 2) ? 1 : 0;
    feed.assign(1, last);
    if (k) {
      dense_distribution(sampler, dec.self_draft(&last, kept), V, q);
      feed.push_back(sample_dense(q, rng));
    }
    // The model: last and the guess in one pass; position 0's logits score the guess, position 1's the bonus.
    const float* tl = dec.forward(feed.data(), int(feed.size()), /*all_logits=*/true);
    st.base.decode_steps++;
    st.rounds++;
    st.drafted += k;
    produced.clear();
    dense_distribution(sampler, tl, V, p);
    int accepted = 0;
    if (k == 0) {
      produced.push_back(sample_dense(p, rng));
    } else {
      const Verdict v = accept_or_resample(p, q, feed[1], rng);
      produced.push_back(v.token);
      if (v.accepted) {
        accepted = 1;
        dense_distribution(sampler, tl + size_t(TV), V, p);
        produced.push_back(sample_dense(p, rng));
      }
    }
    st.accepted += accepted;
    // Roll back past a rejection: the cache keeps last and the accepted guess, and the next draft runs over them.
    dec.truncate(committed + accepted);
    kept = 1 + accepted;
  }
  st.base.decode_s = std::chrono::duration<double>(Clock::now() - t0).count() - st.base.prefill_s;
  if (stats) *stats = st;
  return why;
}

}  // namespace kiln
