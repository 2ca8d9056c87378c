// Prompt lookup decoding (n-gram drafting; Saxena 2023, llama.cpp's lookup, vLLM's and Hugging Face's n-gram
// speculation): speculative decoding without a draft model. The proposals are the tokens that followed the most
// recent earlier occurrence of the sequence's last n tokens (n from max_ngram down to min_ngram, the longest
// match wins), copied on past the end of the sequence when the match is close to it (a run or a loop repeats
// itself). Text that copies its context (an edited file, a summary, a quoted question, a greedy loop) is drafted
// for almost nothing; the target verifies as in infer/speculative.h. The draft is deterministic (q one-hot at
// its proposal), so the exact rule accepts x with probability p(x) and otherwise samples from p with x removed:
// the output is distributed as plain sampling and greedy output equals plain greedy output.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "infer/generate.h"
#include "infer/sampler.h"
#include "infer/speculative.h"
#include "models/model.h"

namespace kiln {

struct PromptLookupParams {
  int max_ngram = 3;  // the longest suffix matched
  int min_ngram = 1;  // the shortest; no match of at least this length: no proposals (a plain step)
  // The round's length adapts (as HF's assisted generation does): after a round whose proposals all passed it
  // doubles (up to K), after a rejection it halves, but not below the accepted count + 1. A match found in text
  // that does not repeat mostly fails, and each failed proposal costs a verification row; false: always K.
  // (The 32M bench target, f32, 2 threads, K = 8: greedy 2.57x plain against 2.35x when a rejection cut the length
  // to the accepted count + 1 and 2.81x fixed; sampled at temperature 1 0.97x, 1.01x and 0.84x.)
  bool adaptive = true;
  void validate() const;  // 1 <= min_ngram <= max_ngram, else a one-line error naming the flags
};

// Up to k proposals to follow seq[0, n) into out (cleared first): for g = min(max_ngram, n − 1) down to min_ngram,
// the latest s < n − g with seq[s, s + g) = seq[n − g, n) gives out[j] = ext[s + g + j], ext being seq followed
// by out itself. Nothing when no suffix of at least min_ngram tokens occurred before.
void lookup_proposals(const int32_t* seq, int n, const PromptLookupParams& p, int k, std::vector<int32_t>& out);
// One sequence's adaptive length: the last round's (0: none yet), and what that round saw (its sequence length
// and its number of proposals), from which the next call learns how many passed.
struct LookupState {
  int length = 0, last_n = -1, last_drafted = 0;
};
// A round's draft of at most k proposals (fewer with p.adaptive, by state): lookup_proposals cut before the first
// id outside the sampled [0, V) (it can never be sampled), and qs[i] the draft's distribution at drafts[i], one-hot
// (qs grown to hold them). Shared with the server.
void lookup_draft(const int32_t* seq, int n, const PromptLookupParams& p, int k, int V, LookupState& state,
                  std::vector<int32_t>& drafts, std::vector<std::vector<double>>& qs);

// generate() with prompt lookup: K = draft_tokens proposals at most per round; the same limits, on_token
// contract, finish reasons and stats as generate_speculative. 1 <= min_ngram <= max_ngram.
FinishReason generate_prompt_lookup(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                    const GenerateLimits& lim, int draft_tokens, const PromptLookupParams& p,
                                    const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats = nullptr);

}  // namespace kiln
