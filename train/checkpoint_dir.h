// Checkpoint directories written by `kiln train`:
//   <out>/step_00000100/config.json, model.safetensors  (the family's Hugging Face names)
//   <out>/step_00000100/train_state.safetensors          (AdamW moments, step, data position, seed)
//   <out>/latest -> step_00000100                         (symlink, replaced atomically last)
// Every file is written atomically and `latest` moves only after a checkpoint is complete, so a
// run killed at any moment leaves the last good checkpoint whole.
#pragma once
#include <cstdint>
#include <string>

#include "models/model.h"
#include "train/dataloader.h"
#include "train/optimizer.h"

namespace kiln {

struct TrainState {
  int64_t step = 0;  // optimizer steps completed
  uint64_t seed = 0;
  LoaderState loader;
  double last_loss = 0;
  int64_t optimizer_steps = 0;  // updates applied (fp16 skips overflowed steps)
  float loss_scale = 1.0f;
  int64_t loss_scale_clean = 0, skipped_steps = 0;
};

// Writes a complete checkpoint (from the model's host parameters and the optimizer's host moments: sync them
// first) for `state.step` and points <out>/latest at it; removes older
// step directories beyond `keep` (0 keeps all). Returns the checkpoint directory.
std::string save_training_checkpoint(const std::string& out, Model& model, AdamW& opt, const TrainState& state,
                                     const std::string& save_dtype, const std::string& tokenizer_dir, int keep,
                                     size_t max_shard_bytes = 0);
// Loads weights, optimizer moments and state from a checkpoint directory written above into the host copies
// (then call the model's params_changed() and the optimizer's moments_changed()).
TrainState load_training_checkpoint(const std::string& dir, Model& model, AdamW& opt);
// <out>/latest resolved, or "" if there is none.
std::string latest_checkpoint(const std::string& out);

}  // namespace kiln
