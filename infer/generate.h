// The generation loop: prefill the prompt, then sample and feed one token at a time until the end-of-text
// token, the token budget, the model's context, or the caller says stop.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "models/model.h"
#include "infer/sampler.h"

namespace kiln {

enum class FinishReason { Length, EndOfText, Stop, Context };
const char* finish_reason_name(FinishReason r);  // "length", "eot", "stop", "context"

struct GenerateStats {
  int prompt_tokens = 0;
  int new_tokens = 0;     // tokens sampled
  int decode_steps = 0;   // single-token forward passes
  double prefill_s = 0;   // prompt forward and the first sample
  double decode_s = 0;    // the single-token steps and their samples
};

struct GenerateLimits {
  int max_new = 64;
  std::optional<int32_t> eot;  // stop after sampling this token (it is still reported to on_token)
  // The whole sequence (prompt + new tokens) never exceeds this many tokens; 0: the decoder's max positions.
  int max_length = 0;
  // Sample only among ids [0, sample_vocab) (0: the whole vocabulary). For a model whose vocab_size is padded
  // beyond its tokenizer's (GPT-2's 50257 to 50304): the padding ids have no text.
  int sample_vocab = 0;
};

// Runs one sequence (the decoder must have batch 1; it is reset first). on_token is called with each new
// token as soon as it is sampled and returns false to stop there (e.g. a stop string appeared).
// Throws kiln::Error if the prompt is empty or longer than max_length.
FinishReason generate(IncrementalDecoder& dec, Sampler& sampler, const std::vector<int32_t>& prompt, const GenerateLimits& lim,
                      const std::function<bool(int32_t)>& on_token, GenerateStats* stats = nullptr);

}  // namespace kiln
