#include "infer/mtp_decode.h"

#include "core/error.h"
#include "core/rng.h"

namespace kiln {

FinishReason generate_self_draft(IncrementalDecoder& dec, const Sampler& sampler, const std::vector<int32_t>& prompt,
                                 const GenerateLimits& lim, int draft_tokens,
                                 const std::function<bool(int32_t)>& on_token, SpeculativeStats* stats) {
  KILN_CHECK(dec.batch() == 1, "MTP self-drafting: the decoder must have batch 1");
  const int D = dec.self_draft_depth();
  KILN_CHECK(D >= 1, "--mtp-draft: the model (", dec.config().family,
             ") has no multi-token-prediction modules (num_nextn_predict_layers) to draft with");
  KILN_CHECK(draft_tokens >= 1 && draft_tokens <= D, "--draft-tokens ", draft_tokens, ": the model has ", D,
             " multi-token-prediction module", D == 1 ? "" : "s", ", so MTP self-drafting proposes 1 to ", D,
             " tokens per round");
  // Draft j from module j, its input the previous draft (the first: the last committed token). The decoder's cache
  // rolls back past a rejection; the modules find the rejected positions at the next draft and run them again.
  auto propose = [&](const std::vector<int32_t>& seq, int k, int V, Rng& rng, std::vector<int32_t>& drafts,
                     std::vector<std::vector<double>>& qs) {
    for (int j = 0; j < k; j++) {
      dense_distribution(sampler, dec.self_draft(j + 1, j == 0 ? seq.back() : drafts.back()), V, qs[size_t(j)]);
      drafts.push_back(sample_dense(qs[size_t(j)], rng));
    }
  };
  return generate_drafted(dec, sampler, prompt, lim, draft_tokens, propose, on_token, stats);
}

}  // namespace kiln
