// A model's parameter table: every tensor's file name, canonical key, shape and place in one contiguous block.
// Parameters, gradients and the two AdamW moments are blocks with this same layout, so the optimizer and the
// gradient norm run over flat arrays and checkpoints map names to offsets.
//
// Two names per tensor: `name` is the Hugging Face name the family's checkpoints use
// ("model.layers.0.self_attn.q_proj.weight", "transformer.h.0.attn.c_attn.weight"); `key` is the canonical name
// the modules bind by, the same for every family and the one GGUF files use (llama.cpp's tensor names):
//   token_embd.weight            [V, C]                 position_embd.weight   [P, C]   (learned positions)
//   blk.N.attn_norm.{weight,bias}                       blk.N.ffn_norm.{weight,bias}
//   blk.N.attn_qkv.{weight,bias} GPT-2's fused c_attn   blk.N.attn_{q,k,v}.{weight,bias}
//   blk.N.attn_{q,k}_norm.weight [head_dim] (Qwen3)     blk.N.attn_output.{weight,bias}
//   blk.N.ffn_{gate,up,down}.{weight,bias}              output_norm.{weight,bias}   output.weight (untied head)
//   blk.N.ffn_gate_inp.weight [E, C] (router)           blk.N.exp_probs_b.bias [E] (selection bias, DeepSeek)
//   blk.N.ffn_{gate,up}_exps.weight [E, F, C]            blk.N.ffn_down_exps.weight [E, C, F] (stacked experts)
//   blk.N.ffn_{gate,up,down}_shexp.weight (the shared experts as one SwiGLU)
// Shapes are as the family's files store them (ModelConfig::layout: Conv1D [in, out] or nn.Linear [out, in]).
// Tensors added as one group (attn_q/k/v; ffn_gate/up) sit back to back without padding, so the group is one
// matrix [(q + k + v) rows, in] that a single product reads.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"

namespace kiln {

struct ParamSpec {
  std::string name;    // file (Hugging Face) name
  std::string key;     // canonical name, e.g. "blk.0.attn_q.weight"
  Shape shape;         // as stored in the family's files
  bool decay = false;  // weight decay applies: tensors with two or more dimensions
  size_t offset = 0;   // in floats, from the start of the block
  // A stacked tensor the files keep as shape[0] separate tensors of shape[1:] (Hugging Face's per-expert
  // mlp.experts.E.*): `name` holds a '*' where the index goes.
  bool split = false;
  // Moved by a rule of its own, not by the optimizer (the MoE selection bias: loss-free balancing).
  bool trainable = true;
  int64_t numel() const { return shape.numel(); }
};

// One tensor as the family's files hold it: a whole spec, or one slice of a split one.
struct FileTensor {
  std::string name;
  Shape shape;
  size_t offset = 0;  // in floats
  size_t spec = 0;    // index into ParamTable::specs
};

struct ParamTable {
  std::vector<ParamSpec> specs;
  size_t total = 0;  // floats in the block, including alignment padding

  // Appends a tensor at the next 16-float boundary (or, with packed, right after the previous one).
  void add(std::string name, std::string key, Shape shape, bool packed = false);
  const ParamSpec* find(const std::string& name) const;      // by file name
  const ParamSpec* find_key(const std::string& key) const;   // by canonical key
  const ParamSpec& get_key(const std::string& key) const;    // throws naming the key when absent
  // Marks the last tensor added as split along its first dimension in the files (its name has a '*').
  void split_last();
  // Every tensor as the files hold it, in table order (split tensors expanded in index order).
  std::vector<FileTensor> file_tensors() const;

 private:
  size_t end_ = 0;  // end of the last tensor, before padding
};

}  // namespace kiln
