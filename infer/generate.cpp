#include "infer/generate.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace kiln {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Length: return "length";
    case FinishReason::EndOfText: return "eot";
    case FinishReason::Stop: return "stop";
    case FinishReason::Context: return "context";
  }
  return "?";
}

FinishReason generate(IncrementalDecoder& dec, Sampler& sampler, const std::vector<int32_t>& prompt, const GenerateLimits& lim,
                      const std::function<bool(int32_t)>& on_token, GenerateStats* stats) {
  using Clock = std::chrono::steady_clock;
  KILN_CHECK(dec.batch() == 1, "generate: the decoder must have batch 1, not ", dec.batch());
  KILN_CHECK(!prompt.empty(), "generate: the prompt is empty");
  KILN_CHECK(lim.max_new >= 0, "--max-new must be >= 0, got ", lim.max_new);
  const int max_len = lim.max_length > 0 ? std::min(lim.max_length, dec.max_positions()) : dec.max_positions();
  const int P = int(prompt.size());
  KILN_CHECK(prompt.size() <= size_t(max_len), "the prompt has ", prompt.size(),
             " tokens, more than the model's context of ", max_len, " positions");
  GenerateStats st;
  st.prompt_tokens = P;
  if (stats) *stats = st;
  if (lim.max_new == 0) return FinishReason::Length;
  if (P == max_len) return FinishReason::Context;
  const int V = lim.sample_vocab > 0 ? std::min(lim.sample_vocab, dec.config().vocab_size) : dec.config().vocab_size;

  dec.reset();
  auto t0 = Clock::now();
  // Greedy decoding asks the decoder for the arg max itself (on a GPU only the id comes back).
  const bool greedy = sampler.params().greedy();
  auto next = [&](const int32_t* toks, int n) {
    return greedy ? dec.forward_argmax(toks, n, V)[0] : sampler.sample(dec.forward(toks, n), V);
  };
  int32_t tok = next(prompt.data(), P);
  FinishReason why = FinishReason::Length;
  for (;;) {
    auto now = Clock::now();
    if (st.new_tokens == 0)
      st.prefill_s = std::chrono::duration<double>(now - t0).count();
    st.new_tokens++;
    if (!on_token(tok)) { why = FinishReason::Stop; break; }
    if (lim.eot && tok == *lim.eot) { why = FinishReason::EndOfText; break; }
    if (st.new_tokens >= lim.max_new) { why = FinishReason::Length; break; }
    if (P + st.new_tokens >= max_len) { why = FinishReason::Context; break; }
    const int32_t prev = tok;
    tok = next(&prev, 1);
    st.decode_steps++;
  }
  // Decode time: everything after the first sample (the single-token steps, their samples and on_token).
  st.decode_s = std::chrono::duration<double>(Clock::now() - t0).count() - st.prefill_s;
  if (stats) *stats = st;
  return why;
}

}  // namespace kiln
