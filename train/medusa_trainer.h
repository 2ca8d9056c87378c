// kiln train --medusa-heads K --init BASE: Medusa heads (nn/medusa.h) on a trained base.
//   Medusa-1 (default): the base is frozen; only the heads train. Head k (1-based) at position t predicts token
//     t+k+1, and the loss is Σ_k λ_k·CE_k with Medusa's decay weights λ_k = decay^k (decay 0.8).
//   Medusa-2 (joint): loss = CE_base + w·Σ_k λ_k·CE_k (w: --medusa-heads-weight, Medusa's 0.2), and the base
//     trains too (its gradient from both terms, through the final norm).
// Heads start as Medusa-1 initialises them, or from the --init checkpoint's own K heads when it has them.
// Every step's JSONL line carries the total loss and each head's loss and top-1 accuracy (medusa_loss_k,
// medusa_top1_k). Checkpoints hold the base (as trained, or unchanged) and medusa.safetensors
// (models/medusa_checkpoint.h), with the tokenizer, under <out>/step_N and <out>/latest.
#pragma once
#include "train/trainer.h"

namespace kiln {

struct MedusaTrainOptions {
  int heads = 0;             // K
  bool joint = false;        // Medusa-2
  float decay = 0.8f;        // λ_k = decay^k
  float heads_weight = 0.2f; // joint: the weight of the heads' loss beside the base's
  // Set: the first step's gradients of the loss (before clipping), the base's under its file names (with
  // joint) and the heads' under medusa.safetensors' names, written to this safetensors file (a peer checks them).
  std::string grads_out;
};

// The per-head targets of a batch: head k (1-based) at row i gets the token k places after row i's target, when
// that token is in the same sequence (positions consecutive), else -1. targets [N], pos [N]; out [K, N].
void medusa_targets(const int32_t* targets, const int32_t* pos, int64_t N, int K, int32_t* out);

// Trains and saves; returns the last step's total loss. Single process on the CPU.
double train_medusa(const TrainOptions& opt, const MedusaTrainOptions& m);

}  // namespace kiln
