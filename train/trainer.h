// The training loop: data, forward/backward with gradient accumulation, clipping, AdamW, schedule,
// evaluation, JSONL metrics, a live progress line, and atomic checkpoints that resume exactly.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "models/model_config.h"
#include "train/batch.h"
#include "train/optimizer.h"

namespace kiln {

struct TrainOptions {
  std::string model;       // config.json or a directory holding one (random init)
  std::string init;        // checkpoint directory to start from (weights)
  std::string data, val_data;
  std::string tokenizer;   // directory whose tokenizer files are copied into every checkpoint
  int batch = 4, seq = 64, grad_accum = 1, steps = 100;
  float lr = 6e-4f, min_lr = 0.0f;
  std::string lr_schedule = "cosine";
  int warmup = 0;
  AdamWConfig adamw;
  float mtp_lambda = 0.3f;  // weight of the multi-token-prediction losses (models that have MTP modules)
  uint64_t seed = 1337;
  std::string data_order = "shuffled";
  int threads = 0;         // 0: all cores
  std::string out;         // checkpoint directory
  int save_every = 0;      // 0: only at the end
  int keep_checkpoints = 2;
  std::string save_dtype = "f32";
  std::string max_shard_size = "0";  // weights above this are saved as Hugging Face shards ("5GB"; 0: one file)
  bool resume = false;
  std::string metrics;     // JSONL path
  int eval_every = 0;
  int val_batches = 20;
  bool progress = true;    // live line on a terminal
  std::string recompute = "none";  // none | block | every:K | selective
  int lm_head_chunk = 0;   // logits rows held at once (0: the whole batch)
  std::string dtype = "fp32";       // fp32 | bf16 | fp16 (matrix products; master weights stay fp32)
  std::string loss_scale = "auto";  // auto (dynamic for fp16, none otherwise) | none | dynamic
  float initial_loss_scale = 65536.0f;
  int loss_scale_window = 1000;
  int max_skipped_steps = 20;
  // Batching (train/packing.h): rows (fixed windows of T, train/dataloader.h), packed (whole documents
  // without padding, at most batch·seq tokens) or padded (one document per row). packing = true is the
  // --packing shorthand for packed. Shards with loss masks (supervised data) need packed or padded.
  std::string batching = "rows";
  bool packing = false;
  // cpu, or cuda / cuda:N: the model trains in bf16 on the GPU, the host keeps the checkpoint copy.
  std::string device = "cpu";
  // Mixture of experts: the loss-free balancing step γ of the selection bias after each optimizer step
  // (DeepSeek-V3's 0.001; 0 freezes the bias).
  float bias_update_speed = 0.001f;
  float seq_aux_alpha = 0.0f;  // the sequence-wise balance loss's weight (DeepSeek-V3 used 0.0001; 0: off)
};

// The training (or validation) batches the options ask for.
std::unique_ptr<BatchSource> make_batch_source(const TrainOptions& opt, const std::string& data,
                                               const ModelConfig& cfg, bool validation);

// Runs training; throws kiln::Error on bad input. Returns the final training loss.
double train(const TrainOptions& opt);

// Threads for OpenMP and OpenBLAS (0 = all cores).
void set_threads(int threads);

}  // namespace kiln
