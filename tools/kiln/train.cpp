// kiln train: train a GPT-2-architecture model on token shards.
#include <cstdlib>

#include "core/error.h"

#include "dist/communicator.h"
#include "tools/kiln/command.h"
#include "train/classify_trainer.h"
#include "train/diffusion_trainer.h"
#include "train/medusa_trainer.h"
#include "train/trainer.h"

namespace {

kiln::cli::Command train_cmd("train", [](CLI::App& root) {
  auto opt = std::make_shared<kiln::TrainOptions>();
  auto* c = root.add_subcommand("train", "Train a GPT-2-architecture model on token shards");
  c->add_option("--model", opt->model, "config.json (or a directory with one) for a randomly initialised model");
  c->add_option("--init", opt->init, "Checkpoint directory (config.json + model.safetensors) to start from");
  c->add_option("--data", opt->data, "Training shard file or glob (llm.c .bin format)")->required();
  c->add_option("--val-data", opt->val_data, "Validation shard file or glob");
  c->add_option("--eval-every", opt->eval_every, "Evaluate validation loss every N steps (0: never)");
  c->add_option("--val-batches", opt->val_batches, "Batches per validation evaluation")->capture_default_str();
  c->add_option("--tokenizer", opt->tokenizer, "Tokenizer directory copied into every checkpoint");
  c->add_option("--batch", opt->batch,
                "Sequences per micro-batch (B), global: under mpirun each of N ranks trains on B/N of them (packed: "
                "about 1/N of the tokens, whole sequences)")
      ->capture_default_str();
  c->add_option("--zero-stage", opt->zero_stage,
                "ZeRO partitioning across ranks: 0 replicated state, gradients all-reduced; 1 optimizer state "
                "sharded; 2 gradients reduce-scattered per micro-batch too (3: not yet)")
      ->capture_default_str();
  c->add_option("--seq", opt->seq, "Tokens per sequence (T)")->capture_default_str();
  c->add_option("--grad-accum", opt->grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  c->add_option("--steps", opt->steps, "Optimizer steps")->capture_default_str();
  c->add_option("--lr", opt->lr, "Peak learning rate")->capture_default_str();
  c->add_option("--min-lr", opt->min_lr, "Floor of the cosine schedule")->capture_default_str();
  c->add_option("--lr-schedule", opt->lr_schedule, "constant or cosine (after warmup)")->capture_default_str();
  c->add_option("--warmup", opt->warmup, "Linear warmup steps")->capture_default_str();
  c->add_option("--mtp-lambda", opt->mtp_lambda,
                 "Weight λ of the multi-token-prediction losses: loss = main + λ/D·Σ MTP (models with MTP modules; "
                 "0 skips them)")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--weight-decay", opt->adamw.weight_decay, "AdamW decoupled weight decay (matrices only)")
      ->capture_default_str();
  c->add_option("--beta1", opt->adamw.beta1, "AdamW beta1")->capture_default_str();
  c->add_option("--beta2", opt->adamw.beta2, "AdamW beta2")->capture_default_str();
  c->add_option("--adam-eps", opt->adamw.eps, "AdamW epsilon")->capture_default_str();
  c->add_option("--bias-update-speed", opt->bias_update_speed,
                 "Mixture of experts: loss-free balancing step of the expert selection bias after each optimizer "
                 "step (0 freezes it)")
      ->capture_default_str();
  c->add_option("--seq-aux-alpha", opt->seq_aux_alpha,
                 "Mixture of experts: weight of the sequence-wise balance loss (DeepSeek-V3 eq. 17-20; 0: off)")
      ->capture_default_str();
  c->add_option("--grad-clip", opt->adamw.grad_clip, "Clip the global gradient norm to this (0: off)")
      ->capture_default_str();
  c->add_option("--seed", opt->seed, "Seed for initialisation and data order")->capture_default_str();
  c->add_option("--data-order", opt->data_order, "sequential (llm.c) or shuffled")->capture_default_str();
  c->add_option("--threads", opt->threads, "CPU threads (0: all cores)")->capture_default_str();
  c->add_option("--out", opt->out, "Directory for checkpoints (step_N/ and the 'latest' link)");
  c->add_option("--save-every", opt->save_every, "Checkpoint every N steps (0: only at the end)")
      ->capture_default_str();
  c->add_option("--keep-checkpoints", opt->keep_checkpoints, "Step checkpoints to keep (0: all)")
      ->capture_default_str();
  c->add_option("--save-dtype", opt->save_dtype, "Weights on disk: f32 or bf16 (training state stays f32)")
      ->capture_default_str();
  c->add_option("--max-shard-size", opt->max_shard_size,
                "Save weights above this size as Hugging Face shards + model.safetensors.index.json (5GB, 500MB; 0: one file)")
      ->capture_default_str();
  c->add_flag("--resume", opt->resume, "Continue from <out>/latest: weights, AdamW state, step and data position");
  c->add_option("--metrics", opt->metrics, "JSONL file: one object per step (step, loss, lr, grad_norm, ...)");
  c->add_option("--recompute", opt->recompute, "Gradient checkpointing: none, block, every:K or selective")
      ->capture_default_str();
  c->add_option("--lm-head-chunk", opt->lm_head_chunk, "Rows of logits held at once (0: all with --recompute none, else 64)")
      ->capture_default_str();
  c->add_option("--dtype", opt->dtype, "Matrix products in fp32, bf16 or fp16 (fp32 master weights and AdamW)")
      ->capture_default_str();
  c->add_option("--device", opt->device,
                "cpu, or cuda / cuda:N: train on the GPU (with --dtype bf16; FlashAttention and cuBLASLt, fp32 "
                "master weights and AdamW on the device; under mpirun the ranks of a machine take GPUs N, N+1, ... and "
                "reduce gradients with NCCL)")
      ->capture_default_str();
  c->add_option("--loss-scale", opt->loss_scale, "auto (dynamic for fp16), none or dynamic")->capture_default_str();
  c->add_option("--initial-loss-scale", opt->initial_loss_scale, "Starting dynamic loss scale")->capture_default_str();
  c->add_option("--loss-scale-window", opt->loss_scale_window, "Clean steps before the loss scale doubles")
      ->capture_default_str();
  c->add_option("--max-skipped-steps", opt->max_skipped_steps,
                "Stop after this many overflowed (skipped) steps in a row")
      ->capture_default_str();
  c->add_option("--batching", opt->batching,
                "rows: windows of --seq tokens cut from the token stream; packed: whole documents (from the "
                "shards' .idx) back to back, at most batch*seq tokens, no padding, no attention across "
                "documents; padded: one document per row of --seq, padded (for comparison). A document longer "
                "than min(batch*seq, n_positions) (packed) or --seq (padded) is cut into pieces of --seq tokens, "
                "each its own sequence. Supervised shards (with .mask, from kiln data prepare-sft) need "
                "packed or padded")
      ->capture_default_str();
  c->add_flag("--packing", opt->packing, "Same as --batching packed");
  c->add_flag("!--no-progress", opt->progress, "No live progress line");
  // Medusa heads on a trained base (train/medusa_trainer.h).
  auto medusa = std::make_shared<kiln::MedusaTrainOptions>();
  c->add_option("--medusa-heads", medusa->heads,
                "Train K Medusa heads (head k predicts the token k+1 places past the next) on the base given by "
                "--init; the base stays frozen (Medusa-1) unless --medusa-joint")
      ->check(CLI::Range(1, 16));
  c->add_flag("--medusa-joint", medusa->joint,
              "Medusa-2: train the base too, on its LM loss plus --medusa-heads-weight times the heads' loss");
  c->add_option("--medusa-decay", medusa->decay, "Head k's loss weight is decay^k (Medusa's 0.8)")
      ->capture_default_str();
  c->add_option("--medusa-grads-out", medusa->grads_out,
                "With --medusa-heads: write the first step's gradients (heads; with --medusa-joint the base too) "
                "to this safetensors file, for checking against a peer");
  c->add_option("--medusa-heads-weight", medusa->heads_weight,
                "With --medusa-joint: the heads' loss weight beside the base's LM loss (Medusa-2's 0.2)")
      ->capture_default_str();
  // Image models (train/diffusion_trainer.h): --objective other than lm trains a DiT on image shards.
  auto img = std::make_shared<kiln::ImageTrainOptions>();
  auto objective = std::make_shared<std::string>("lm");
  c->add_option("--objective", *objective,
                "lm (language model on token shards), or an image objective on image shards (kiln data "
                "prepare-images) with --model a DiT preset (DiT-S/2, DiT-S/4, DiT-B/2, DiT-B/4) or config: ddpm, ve, "
                "edm, flow, gvp; or classify (a ViT classifier on image shards, --model a vit config or none); or nll (a "
                "normalizing flow by maximum likelihood, logged in bits/dim: --model realnvp, nice or a realnvp "
                "config)")
      ->capture_default_str();
  c->add_option("--ema-decay", img->ema_decay, "Image models: decay of the EMA copy of the weights (diffusion: "
                "always kept; classify and nll: kept when this is given)")
      ->capture_default_str();
  c->add_option("--label-dropout", img->label_dropout,
                "Image models: probability a label is replaced by the null class (classifier-free guidance)")
      ->capture_default_str();
  c->add_option("--augment", img->augment,
                "--objective classify: none, or a comma list of crop:K (random shift by up to K pixels) and flip "
                "(random left-right mirror)")
      ->capture_default_str();
  c->add_option("--label-smoothing", img->label_smoothing, "--objective classify: label smoothing epsilon")
      ->capture_default_str();
  c->add_option("--flow-t", img->flow_t, "--objective flow: uniform or logit-normal t")->capture_default_str();
  c->callback([opt, img, objective, medusa, c] {
    img->loss_model_ema = c->count("--ema-decay") > 0;
    if (medusa->heads > 0) {
      KILN_CHECK(*objective == "lm", "--medusa-heads trains a language model's heads (--objective lm)");
      kiln::train_medusa(*opt, *medusa);
      return;
    }
    KILN_CHECK(!medusa->joint, "--medusa-joint needs --medusa-heads K");
    if (*objective == "lm") {
      try {
        kiln::train(*opt);
      } catch (const kiln::dist::RankQuiet&) {
        std::exit(1);  // rank 0 prints the job's error
      }
      return;
    }
    if (*objective == "classify") return (void)kiln::train_classifier(*opt, *img);
    // A density model (a normalizing flow) by exact maximum likelihood: the same loss-model trainer.
    if (*objective == "nll") return (void)kiln::train_classifier(*opt, *img, kiln::ImageTask::Density);
    img->objective = *objective;
    kiln::train_images(*opt, *img);
  });
});

}  // namespace
