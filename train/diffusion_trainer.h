// Training the image models: a denoiser (models/image_model.h) under one of the objectives of models/diffusion.h
// on image shards (train/images.h), with the language-model trainer's machinery: AdamW with per-tensor decay and global-norm
// clipping (train/optimizer.h), the warmup + cosine schedule (train/schedule.h), gradient accumulation, JSONL
// metrics, validation, an EMA copy of the weights, and atomic checkpoints that resume exactly:
//   <out>/step_NNNNNNNN/config.json          the model configuration + "objective", "flow_t", "label_dropout"
//   <out>/step_NNNNNNNN/model.safetensors    the weights (the reference's tensor names)
//   <out>/step_NNNNNNNN/ema.safetensors      the EMA weights (what `kiln sample` reads)
//   <out>/step_NNNNNNNN/train_state.safetensors  AdamW moments; metadata: step, the generator's position
//   <out>/latest -> step_NNNNNNNN            moved last (symlink renamed over), so a kill leaves a whole checkpoint
// One generator (core/rng.h) draws, in order, every batch's image indices, label drops, levels and noise, so its
// position is the whole data state.
#pragma once
#include <string>

#include "models/diffusion.h"
#include "models/image_model.h"
#include "train/trainer.h"

namespace kiln {

struct ImageTrainOptions {
  std::string objective = "edm";   // ddpm | ve | edm | flow | gvp
  std::string flow_t = "uniform";  // flow: uniform | logit-normal
  float ema_decay = 0.999f;
  // Loss models (--objective classify | nll) keep an EMA only when asked (the CLI sets this from --ema-decay);
  // the diffusion trainer always keeps one.
  bool loss_model_ema = false;
  float label_dropout = 0.1f;      // labels replaced by the null class (classifier-free guidance)
  // classify: training augmentation (train/images.h's Augment) and label smoothing.
  std::string augment = "none";
  float label_smoothing = 0;
};

// TrainOptions supplies: model (a DiT preset such as DiT-S/2, or a config.json / directory with one; image size,
// channels and classes come from the data), data (a prepared directory or train shards), val_data, batch,
// grad_accum, steps, lr, min_lr, lr_schedule, warmup, adamw, seed, threads, out, save_every, keep_checkpoints,
// resume, metrics, eval_every, val_batches, progress. Returns the last step's loss.
double train_images(const TrainOptions& opt, const ImageTrainOptions& img);

// The model options of --device and --dtype (fp32, or bf16: 16-bit products, fp32 master weights and AdamW).
ImageModelOptions image_model_options(const TrainOptions& opt);

// A trained image model as `kiln sample` reads it: a checkpoint directory (or an --out directory: its latest).
struct ImageModelFiles {
  std::string dir;
  std::string config_json;  // the model's config.json (make_image_model reads it)
  Objective objective;
  float label_dropout = 0;
};
ImageModelFiles find_image_model(const std::string& path);
// The model with ema.safetensors (ema true, when present) or model.safetensors as its parameters.
std::unique_ptr<ImageModel> load_image_model(const ImageModelFiles& f, const ImageModelOptions& opt = {},
                                             bool ema = true);

}  // namespace kiln
