#include "infer/prompt_lookup.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace kiln {

void PromptLookupParams::validate() const {
  KILN_CHECK(min_ngram >= 1 && max_ngram >= min_ngram, "--lookup-min-ngram (", min_ngram, ") and --lookup-max-ngram (",
             max_ngram, ") must satisfy 1 <= min <= max");
}

void lookup_proposals(const int32_t* seq, int n, const PromptLookupParams& p, int k, std::vector<int32_t>& out) {
  out.clear();
  if (k <= 0) return;
  for (int g = std::min(p.max_ngram, n - 1); g >= p.min_ngram; g--) {
    const int32_t* suffix = seq + (n - g);
    for (int s = n - g - 1; s >= 0; s--) {
      if (std::memcmp(seq + s, suffix, size_t(g) * sizeof(int32_t)) != 0) continue;
      // Copy what followed; from n on the source is out itself (s + g + j − n < j), which repeats a run.
      for (int j = 0; j < k; j++) {
        const int src = s + g + j;
        out.push_back(src < n ? seq[src] : out[size_t(src - n)]);
      }
      return;
    }
  }
}

void lookup_draft(const int32_t* seq, int n, const PromptLookupParams& p, int k, int V, LookupState& state,
                  std::vector<int32_t>& drafts, std::vector<std::vector<double>>& qs) {
  if (p.adaptive) {
    // The sequence grew by the accepted proposals and one token from the target since the last round.
    if (state.last_drafted > 0) {
      const int accepted = n - state.last_n - 1;
      state.length = accepted >= state.last_drafted ? 2 * state.length : std::max(accepted + 1, state.length / 2);
    }
    if (state.length <= 0 || state.length > k) state.length = k;
    k = state.length;
  }
  lookup_proposals(seq, n, p, k, drafts);
  drafts.erase(std::find_if(drafts.begin(), drafts.end(), [&](int32_t x) { return x < 0 || x >= V; }), drafts.end());
  if (qs.size() < drafts.size()) qs.resize(drafts.size());
  for (size_t i = 0; i < drafts.size(); i++) {  // all the draft's mass on its proposal
    qs[i].assign(size_t(V), 0.0);
    qs[i][size_t(drafts[i])] = 1.0;
  }
  state.last_n = n;
  state.last_drafted = int(drafts.size());
}

FinishReason generate_prompt_lookup(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                    const GenerateLimits& lim, int draft_tokens, const PromptLookupParams& p,
                                    const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats) {
  p.validate();
  LookupState state;
  auto propose = [&](const std::vector<int32_t>& seq, int k, int V, Rng&, std::vector<int32_t>& drafts,
                     std::vector<std::vector<double>>& qs) {
    lookup_draft(seq.data(), int(seq.size()), p, k, V, state, drafts, qs);
  };
  return generate_drafted(dec, sampler, prompt, lim, draft_tokens, propose, on_token, stats);
}

}  // namespace kiln
