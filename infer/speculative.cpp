#include "infer/speculative.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"

namespace kiln {

namespace {
double uniform53(Rng& rng) { return double(rng.next_u64() >> 11) * (1.0 / 9007199254740992.0); }
}  // namespace

int32_t sample_dense(const std::vector<double>& w, Rng& rng) {
  double total = 0;
  for (double x : w) total += x;
  const double target = uniform53(rng) * total;
  double cum = 0;
  int32_t last = 0;
  for (size_t i = 0; i < w.size(); i++) {
    if (w[i] <= 0) continue;
    cum += w[i];
    last = int32_t(i);
    if (target < cum) return int32_t(i);
  }
  return last;  // u within rounding of 1
}

std::vector<double> residual_distribution(const std::vector<double>& p, const std::vector<double>& q) {
  std::vector<double> r(p.size());
  double total = 0;
  for (size_t i = 0; i < p.size(); i++) total += (r[i] = std::max(0.0, p[i] - q[i]));
  if (total > 0)
    for (double& x : r) x /= total;
  return r;
}

Verdict accept_or_resample(const std::vector<double>& p, const std::vector<double>& q, int32_t x, Rng& rng) {
  // u < p/q, written without the division (q[x] > 0: x was drawn from q).
  if (uniform53(rng) * q[size_t(x)] < p[size_t(x)]) return {x, true};
  thread_local std::vector<double> r;
  r.resize(p.size());
  double total = 0;
  for (size_t i = 0; i < p.size(); i++) total += (r[i] = std::max(0.0, p[i] - q[i]));
  return {sample_dense(total > 0 ? r : p, rng), false};
}

void dense_distribution(const Sampler& s, const float* logits, int V, std::vector<double>& out) {
  s.distribution(logits, V, out);
}

int verify_proposals(const Sampler& sampler, const float* target_logits, int TV, int V,
                     const std::vector<double>* qs, const int32_t* drafts, int k, Rng& rng,
                     std::vector<int32_t>& produced) {
  thread_local std::vector<double> p;
  produced.clear();
  int accepted = 0;
  for (;; accepted++) {
    dense_distribution(sampler, target_logits + size_t(accepted) * size_t(TV), V, p);
    if (accepted == k) {  // every proposal passed: the bonus token from the target
      produced.push_back(sample_dense(p, rng));
      break;
    }
    const Verdict v = accept_or_resample(p, qs[accepted], drafts[accepted], rng);
    produced.push_back(v.token);
    if (!v.accepted) break;
  }
  return accepted;
}

bool report_round(const std::vector<int32_t>& produced, SpeculativeStats& st, bool& first,
                  std::chrono::steady_clock::time_point t0, const std::function<bool(int32_t)>& on_token,
                  const GenerateLimits& lim, int P, int max_len, FinishReason& why) {
  for (int32_t t : produced) {
    st.base.new_tokens++;
    if (first) {
      st.base.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      first = false;
    }
    if (!on_token(t)) return why = FinishReason::Stop, true;
    if (lim.eot && t == *lim.eot) return why = FinishReason::EndOfText, true;
    if (st.base.new_tokens >= lim.max_new) return why = FinishReason::Length, true;
    if (P + st.base.new_tokens >= max_len) return why = FinishReason::Context, true;
  }
  return false;
}

namespace {
// The draft's probability of its most likely token under its raw logits (temperature 1, no filters): how sure
// it is, which decides whether a proposal is worth a verification row (--draft-min-prob).
double top_probability(const float* logits, int V) {
  float m = logits[0];
  for (int i = 1; i < V; i++) m = std::max(m, logits[i]);
  double sum = 0;
  for (int i = 0; i < V; i++) sum += std::exp(double(logits[i]) - double(m));
  return 1.0 / sum;
}
}  // namespace

FinishReason generate_drafted(IncrementalDecoder& target, const Sampler& sampler, const std::vector<int32_t>& prompt,
                              const GenerateLimits& lim, int draft_tokens, const ProposeFn& propose,
                              const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats) {
  using Clock = std::chrono::steady_clock;
  KILN_CHECK(target.batch() == 1, "speculative decoding: the decoder must have batch 1");
  KILN_CHECK(draft_tokens >= 1, "--draft-tokens must be >= 1, got ", draft_tokens);
  KILN_CHECK(!prompt.empty(), "generate: the prompt is empty");
  KILN_CHECK(lim.max_new >= 0, "--max-new must be >= 0, got ", lim.max_new);
  const int TV = target.config().vocab_size;
  const int V = lim.sample_vocab > 0 ? std::min(lim.sample_vocab, TV) : TV;
  const int max_len = std::min(lim.max_length > 0 ? lim.max_length : target.max_positions(), target.max_positions());
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
  std::vector<double> p;
  std::vector<std::vector<double>> qs(static_cast<size_t>(draft_tokens));  // each proposal's distribution
  target.reset();
  const auto t0 = Clock::now();
  // seq: every committed token; the target's cache holds all of them but the last (not yet fed).
  dense_distribution(sampler, target.forward(prompt.data(), P), V, p);
  std::vector<int32_t> seq(prompt.begin(), prompt.end());
  std::vector<int32_t> produced{sample_dense(p, rng)}, feed, drafts;

  FinishReason why = FinishReason::Length;
  bool first = true;
  for (;;) {
    seq.insert(seq.end(), produced.begin(), produced.end());
    // Report this round's tokens one by one; each may end generation (as plain decoding would, at it).
    if (report_round(produced, st, first, t0, on_token, lim, P, max_len, why)) break;
    const int committed = P + st.base.new_tokens;  // tokens so far; the target's cache holds committed - 1
    // Proposals this round: at most K, and no more than the budget and the context leave room to produce.
    const int k = std::max(0, std::min({draft_tokens, lim.max_new - st.base.new_tokens - 1, max_len - committed - 1}));
    drafts.clear();
    propose(seq, k, V, rng, drafts, qs);  // every round, k = 0 too (a proposer may sync its state)
    KILN_CHECK(int(drafts.size()) <= k, "speculative decoding: ", drafts.size(), " proposals where ", k,
               " were asked for");
    const int kd = int(drafts.size());
    // Target: the last token and the proposals in one pass; position i's logits score proposal i (i = kd: the
    // bonus).
    feed.assign(1, seq.back());
    feed.insert(feed.end(), drafts.begin(), drafts.end());
    const float* tl = target.forward(feed.data(), int(feed.size()), /*all_logits=*/true);
    st.base.decode_steps++;
    st.rounds++;
    st.drafted += kd;
    for (int j = 0; j < kd; j++) st.drafted_at[size_t(j)]++;
    const int accepted = verify_proposals(sampler, tl, TV, V, qs.data(), drafts.data(), kd, rng, produced);
    for (int j = 0; j < accepted; j++) st.accepted_at[size_t(j)]++;
    st.accepted += accepted;
    // Roll back past the rejection: the cache keeps the last token and the accepted proposals.
    target.truncate(committed + accepted);
  }
  st.base.decode_s = std::chrono::duration<double>(Clock::now() - t0).count() - st.base.prefill_s;
  if (stats) *stats = st;
  return why;
}

FinishReason generate_speculative(IncrementalDecoder& target, IncrementalDecoder& draft, const Sampler& sampler,
                                  const std::vector<int32_t>& prompt, const GenerateLimits& lim, int draft_tokens,
                                  const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats,
                                  double draft_min_prob) {
  KILN_CHECK(draft.batch() == 1, "speculative decoding: the draft decoder must have batch 1");
  KILN_CHECK(draft_min_prob >= 0 && draft_min_prob < 1, "--draft-min-prob must be in [0, 1), got ", draft_min_prob);
  const int TV = target.config().vocab_size;
  const int V = lim.sample_vocab > 0 ? std::min(lim.sample_vocab, TV) : TV;
  const int DV = draft.config().vocab_size;
  KILN_CHECK(DV >= V, "--draft-model: its vocabulary has ", DV, " tokens, fewer than the ", V,
             " the target samples from");
  draft.reset();
  // The draft's cache holds a prefix of seq: what it took in last time, less what the target rejected. It takes
  // in the rest, seq[draft.length() ..], when it next runs.
  auto propose = [&](const std::vector<int32_t>& seq, int k, int sample_vocab, Rng& rng, std::vector<int32_t>& drafts,
                     std::vector<std::vector<double>>& qs) {
    const int committed = int(seq.size());
    if (draft.length() > committed - 1) draft.truncate(committed - 1);  // past a rejection (all but seq.back() hold)
    // A draft with a shorter context than the target's stops proposing when it is full (plain steps after).
    k = std::min(k, draft.max_positions() - committed + 1);
    for (int i = 0; i < k; i++) {
      const float* dl = i == 0 ? draft.forward(seq.data() + draft.length(), committed - draft.length())
                               : draft.forward(&drafts.back(), 1);
      // Drafting ends early where the draft is unsure (its top probability below draft_min_prob): a proposal it
      // would likely lose costs a verification row. The choice reads only the draft, so the output distribution
      // stays the target's.
      if (draft_min_prob > 0 && top_probability(dl, DV) < draft_min_prob) break;
      dense_distribution(sampler, dl, sample_vocab, qs[size_t(i)]);
      drafts.push_back(sample_dense(qs[size_t(i)], rng));
    }
  };
  return generate_drafted(target, sampler, prompt, lim, draft_tokens, propose, on_token, stats);
}

}  // namespace kiln
