// Export of a model to a GGUF file that llama.cpp loads: the architecture's metadata as llama.cpp reads it,
// the tokenizer, and the tensors under llama.cpp's names with the conversions its architectures expect
// (GPT-2's Conv1D matrices transposed; Llama/Mistral q and k rows permuted to llama.cpp's adjacent-pair rotary).
// See /work/shared/notes/llama-cpp-gguf.md.
//
//   family   GGUF arch  notes
//   gpt2     gpt2       fused attn_qkv, learned position_embd, LayerNorm with biases
//   llama    llama      q/k permuted per head; Llama 3 rope scaling as a rope_freqs.weight tensor
//   mistral  llama      sliding window only when it covers the whole context (llama.cpp's llama ignores it)
//   qwen2    qwen2      q/k/v biases (zeros written when the model has none: llama.cpp requires them)
//   qwen3    qwen3      attn_q_norm / attn_k_norm; key_length / value_length when head_dim != hidden / heads
// A tied head is left out (llama.cpp then reads token_embd); an untied one is written as output.weight.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/gguf.h"
#include "models/model_config.h"
#include "models/param_table.h"

namespace kiln {

// Byte-level BPE tokenizer data as llama.cpp's "gpt2" tokenizer model reads it.
struct GgufTokenizer {
  std::vector<std::string> tokens;   // byte-level spelling (GPT-2's byte-to-unicode form), one per id
  std::vector<std::string> merges;   // "a b", in rank order
  std::vector<int32_t> token_type;   // per token: 1 normal, 3 control, 4 user-defined, 5 unused; empty: all normal
  int bos_id = -1, eos_id = -1;      // -1: none
  bool add_bos_token = false;
  std::string pre;                   // pre-tokenizer: "gpt-2", "llama-bpe", "qwen2", ...
  std::string chat_template;         // Jinja; empty: none
};

// The GGUF architecture name llama.cpp uses for a family ("llama" for mistral); throws for an unknown family.
std::string gguf_arch(const std::string& family);

// Throws the one-line kiln::Error export_gguf would for a configuration it cannot export (an unsupported family
// or feature), so a caller can fail before reading the weights.
void check_gguf_export(const ModelConfig& cfg);

// Writes the model to out_path (atomically). Matrices are written as `type` (F32, F16 or Q8_0; Q8_0 falls back
// to F16 for rows that are not a multiple of 32 values); norms, biases and rope factors are always F32.
// An unsupported family or feature throws a one-line kiln::Error and writes nothing.
void export_gguf(const std::string& out_path, const ModelConfig& cfg, const ParamTable& table, const float* params,
                 const GgufTokenizer& tok, GgufType type);

// Llama 3 rope scaling as llama.cpp applies it: a per-frequency divisor [head_dim / 2] of the rotary
// frequencies (1 for high frequencies, `factor` for low ones, a smooth blend between).
std::vector<float> llama3_rope_factors(const ModelConfig& cfg);

}  // namespace kiln
