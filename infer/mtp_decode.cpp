#include "infer/mtp_decode.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "core/rng.h"

namespace kiln {

FinishReason generate_self_draft(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                 const GenerateLimits& lim, int draft_tokens,
                                 const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats) {
  using Clock = std::chrono::steady_clock;
  KILN_CHECK(dec.batch() == 1, "MTP self-drafting: the decoder must have batch 1");
  const int D = dec.self_draft_depth();
  KILN_CHECK(D >= 1, "--mtp-draft: the model (", dec.config().family,
             ") has no multi-token-prediction modules (num_nextn_predict_layers) to draft with");
  KILN_CHECK(draft_tokens >= 1 && draft_tokens <= D, "--draft-tokens ", draft_tokens, ": the model has ", D,
             " multi-token-prediction module", D == 1 ? "" : "s", ", so MTP self-drafting proposes 1 to ", D,
             " tokens per round");
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
  st.drafted_at.assign(size_t(draft_tokens), 0);
  st.accepted_at.assign(size_t(draft_tokens), 0);
  if (stats) *stats = st;
  if (lim.max_new == 0) return FinishReason::Length;
  if (P == max_len) return FinishReason::Context;

  Rng rng(sampler.params().seed);
  std::vector<double> p;  // the prefill's distribution
  std::vector<std::vector<double>> qs(static_cast<size_t>(draft_tokens));  // each draft's distribution
  dec.reset();
  const auto t0 = Clock::now();
  // The cache holds every committed token but the last (`last`, not yet fed); the modules catch up over the
  // prompt at the first draft.
  dense_distribution(sampler, dec.forward(prompt.data(), P), V, p);
  std::vector<int32_t> produced{sample_dense(p, rng)}, feed;

  FinishReason why = FinishReason::Length;
  bool first = true;
  for (;;) {
    // Report this round's tokens one by one; each may end generation (as plain decoding would, at it).
    if (report_round(produced, st, first, t0, on_token, lim, P, max_len, why)) break;
    const int32_t last = produced.back();
    const int committed = P + st.base.new_tokens;  // tokens so far; the cache holds committed - 1
    // Drafts this round: at most K, and no more than the budget and the context leave room to produce.
    const int k = std::max(0, std::min({draft_tokens, lim.max_new - st.base.new_tokens - 1, max_len - committed - 1}));
    // Draft j from module j, its input the previous draft (the first: last).
    feed.assign(1, last);
    for (int j = 0; j < k; j++) {
      dense_distribution(sampler, dec.self_draft(j + 1, feed.back()), V, qs[size_t(j)]);
      feed.push_back(sample_dense(qs[size_t(j)], rng));
    }
    // The model: last and the drafts in one pass; position j's logits score draft j (j = k: the bonus).
    const float* tl = dec.forward(feed.data(), int(feed.size()), /*all_logits=*/true);
    st.base.decode_steps++;
    st.rounds++;
    st.drafted += k;
    for (int j = 0; j < k; j++) st.drafted_at[size_t(j)]++;
    // Draft j stands at feed[j + 1].
    const int accepted = verify_proposals(sampler, tl, TV, V, qs.data(), feed.data() + 1, k, rng, produced);
    for (int j = 0; j < accepted; j++) st.accepted_at[size_t(j)]++;
    st.accepted += accepted;
    // Roll back past the rejection: the cache keeps last and the accepted drafts; the modules find the
    // rejected ones at the next draft and run those positions again.
    dec.truncate(committed + accepted);
  }
  st.base.decode_s = std::chrono::duration<double>(Clock::now() - t0).count() - st.base.prefill_s;
  if (stats) *stats = st;
  return why;
}

}  // namespace kiln
