// Speculative decoding with a draft model (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers
// via Speculative Decoding"): a small draft proposes K tokens one at a time, the target scores all of them in
// one forward pass over K+1 positions, and each proposal x_i is accepted with probability min(1, p_i(x)/q_i(x))
// (p: the target's distribution, q: the draft's, both after the same temperature / top-k / top-p filter). At
// the first rejection the token is drawn from norm(max(0, p_i − q_i)) instead and the round ends; when all K
// pass, a bonus token comes from p_{K+1}. The tokens produced are distributed exactly as sampling from the
// target alone; with temperature 0 both distributions are one-hot, so the output is exactly greedy decoding.
// Both caches roll back past a rejection (IncrementalDecoder::truncate). A draft whose context is shorter than
// the target's stops proposing when it is full; the rest are plain target steps.
#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/rng.h"
#include "infer/generate.h"
#include "infer/sampler.h"
#include "models/model.h"

namespace kiln {

struct SpeculativeStats {
  GenerateStats base;       // prompt, new tokens, prefill and decode times (decode_steps: verification passes)
  int rounds = 0;           // draft-then-verify rounds
  int64_t drafted = 0;      // tokens proposed
  int64_t accepted = 0;     // proposals accepted
  // Per draft position j (0-based): rounds that proposed a j-th token, and those in which it was accepted (with
  // every one before it). accepted_at[j] / drafted_at[j] is the acceptance of position j; accepted_at[j] /
  // accepted_at[j−1] the chance it passes given that the ones before it did.
  std::vector<int64_t> drafted_at, accepted_at;
  double acceptance_rate() const { return drafted ? double(accepted) / double(drafted) : 0.0; }
  // Proposals accepted per round, and tokens produced per round (accepted + the resampled or bonus token).
  double mean_accepted() const { return rounds ? double(accepted) / rounds : 0.0; }
  double tokens_per_round() const { return rounds ? double(accepted + rounds) / rounds : 0.0; }
};

// The rejection step for a proposal x drawn from q: accept with probability min(1, p[x]/q[x]) (u < p/q with
// u uniform in [0, 1)); otherwise a token drawn from the residual norm(max(0, p − q)) (from p itself when the
// residual is empty, which only rounding can make happen). p and q are dense distributions over V ids.
struct Verdict {
  int32_t token;
  bool accepted;
};
Verdict accept_or_resample(const std::vector<double>& p, const std::vector<double>& q, int32_t x, Rng& rng);
// norm(max(0, p − q)) (all zero when p ≤ q everywhere).
std::vector<double> residual_distribution(const std::vector<double>& p, const std::vector<double>& q);
// A draw from a dense distribution (weights need not sum to 1).
int32_t sample_dense(const std::vector<double>& w, Rng& rng);
// The sampler's filtered distribution of a row of logits, dense over [0, V).
void dense_distribution(const Sampler& s, const float* logits, int V, std::vector<double>& out);

// One round's verification: target_logits [k+1, TV] (row i scores proposal i, row k the bonus), qs[i] the
// draft's distribution at proposal drafts[i]. produced gets the accepted proposals, then the resampled token
// (at the first rejection) or the bonus one (all k passed); returns the number accepted. Shared by
// generate_speculative and the server's batched rounds (serve/engine.h).
int verify_proposals(const Sampler& sampler, const float* target_logits, int TV, int V,
                     const std::vector<double>* qs, const int32_t* drafts, int k, Rng& rng,
                     std::vector<int32_t>& produced);

// Reports one round's tokens one by one to on_token, as plain decoding would (the first token of the run also
// stamps st.base.prefill_s, measured from t0); returns true when one of them ends generation (why says how).
// P is the prompt's length and max_len the context. Shared by the draft-model and the self-drafting loops.
bool report_round(const std::vector<int32_t>& produced, SpeculativeStats& st, bool& first,
                  std::chrono::steady_clock::time_point t0, const std::function<bool(int32_t)>& on_token,
                  const GenerateLimits& lim, int P, int max_len, FinishReason& why);

// A round's proposer: up to k tokens to follow seq (every committed token; the last is not yet in the target's
// cache), appended to drafts, the distribution each was drawn from (dense over the V sampled ids) in qs[i] (qs
// has k entries, reused between rounds). Fewer, or none, is fine. Called every round, k = 0 included.
using ProposeFn = std::function<void(const std::vector<int32_t>& seq, int k, int V, Rng& rng,
                                     std::vector<int32_t>& drafts, std::vector<std::vector<double>>& qs)>;

// The draft-then-verify loop that every drafting method shares: generate()'s limits, on_token contract and
// finish reasons; the target batch 1 and reset first; draws from an Rng seeded by the sampler's seed. Each round
// the target scores the last token and the proposals in one pass (all logits), verify_proposals decides, and the
// target's cache rolls back past the rejection. stats: rounds are verification passes.
FinishReason generate_drafted(IncrementalDecoder& target, const Sampler& sampler, const std::vector<int32_t>& prompt,
                              const GenerateLimits& lim, int draft_tokens, const ProposeFn& propose,
                              const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats = nullptr);

// generate() (infer/generate.h) with a draft: the same limits, on_token contract and finish reasons; both
// decoders batch 1 with vocabularies covering the sampled ids; each is reset first. draft_tokens >= 1.
// The sampler's parameters apply to both models; draws come from an Rng seeded by its seed. draft_min_prob > 0
// ends a round's drafting early, before a proposal where the draft's top probability (raw logits) is below it.
FinishReason generate_speculative(IncrementalDecoder& target, IncrementalDecoder& draft, const Sampler& sampler,
                                  const std::vector<int32_t>& prompt, const GenerateLimits& lim, int draft_tokens,
                                  const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats = nullptr,
                                  double draft_min_prob = 0.0);

}  // namespace kiln
