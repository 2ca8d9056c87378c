// MTP self-drafting (DeepSeek-V3 report, section 2.2 and its speculative use): a model with multi-token-
// prediction modules drafts the token after next with its first module, from the main model's last hidden state
// and the embedding of the token just chosen, and verifies that guess with itself in the next forward pass (two
// positions: the chosen token and the guess). Acceptance is speculative decoding's exact rule (infer/
// speculative.h: accept with probability min(1, p/q), else resample from norm(max(0, p − q)); a bonus token from
// the model when the guess passes), so the output is distributed exactly as plain sampling from the model and
// greedy output is exactly plain greedy output. One draft token per round: the decoder exposes module 1 only
// (a chained second module would need its own cache of module-1 hidden states).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "infer/generate.h"
#include "infer/sampler.h"
#include "infer/speculative.h"
#include "models/model.h"

namespace kiln {

// generate() with self-drafting: the same limits, on_token contract and finish reasons; the decoder has batch 1
// and MTP modules (self_draft_chunk() > 0) and is reset first. Draws come from an Rng seeded by the sampler's
// seed. stats: rounds are verification passes, drafted/accepted count the module's guesses.
FinishReason generate_self_draft(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                 const GenerateLimits& lim, const std::function<bool(int32_t)>& on_token,
                                 SpeculativeStats* stats = nullptr);

}  // namespace kiln
