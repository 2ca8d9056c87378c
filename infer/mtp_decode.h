// MTP self-drafting (DeepSeek-V3 report, section 2.2 and its speculative use): a model with D multi-token-
// prediction modules drafts K <= D tokens per round with them, chained as they were trained: module 1 guesses
// the token after next from the main model's last hidden state and the embedding of the token just chosen,
// module k the one after from module k−1's hidden state and the embedding of draft k−1. The model verifies
// the drafts in its next forward pass (K+1 positions: the chosen token and the drafts). Acceptance is speculative
// decoding's exact rule (infer/speculative.h: draft k accepted with probability min(1, p_k/q_k), else a token
// from norm(max(0, p_k − q_k)) and the round ends; a bonus token from the model when all K pass), so the output
// is distributed exactly as plain sampling from the model and greedy output is exactly plain greedy output.
// More draft tokens than modules are refused (a module reused past its own depth was never trained for it).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "infer/generate.h"
#include "infer/sampler.h"
#include "infer/speculative.h"
#include "models/model.h"

namespace kiln {

// generate() with self-drafting: the same limits, on_token contract and finish reasons; the decoder has MTP
// modules (self_draft_depth() >= draft_tokens >= 1; batch 1) and is reset first. Draws come from an Rng seeded
// by the sampler's seed. stats: rounds are verification passes, drafted/accepted count the modules' guesses
// (per draft position in drafted_at/accepted_at).
FinishReason generate_self_draft(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                 const GenerateLimits& lim, int draft_tokens,
                                 const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats = nullptr);

}  // namespace kiln
