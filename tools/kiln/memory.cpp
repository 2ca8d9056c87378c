// kiln memory: the memory plan of a training step before running it: weights, gradients, optimizer
// state and activations, and what ZeRO stages 1-3 leave per rank (Rajbhandari et al.'s accounting:
// with Ψ parameters and Adam in mixed precision, 2Ψ + 2Ψ + 12Ψ bytes of model state; in fp32, 4Ψ + 4Ψ + 8Ψ).
// The activation figure is the exact size of the arena the trainer allocates (same code path).
#include <algorithm>
#include <array>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/gpu.h"
#include "models/family.h"
#include "models/model.h"
#include "tools/kiln/command.h"

namespace {

struct MemoryOptions {
  std::string model, dtype = "fp32", recompute = "none", device = "cpu";
  int batch = 4, seq = 64, zero_stage = 0, ranks = 1, lm_head_chunk = 0;
  bool json = false;
};

// The GPU trainer's device memory, from the same carving code it allocates with; no GPU needed. Beside it the
// process needs the CUDA context and cuBLASLt's 32 MiB workspace.
// Decoding state per token (the KV cache over all layers) at `bytes` per value, and, for latent attention, that of
// ordinary attention of the same width (d_model / n_head wide heads): one key/value head per query head (MHA),
// and one per four query heads (GQA at the common 4:1 grouping).
nlohmann::json cache_per_token(const kiln::ModelConfig& cfg, double bytes) {
  nlohmann::json j = {{"kv_cache_bytes_per_token", double(cfg.cache_floats_per_token()) * bytes}};
  if (cfg.mla.on()) {
    const double hd = double(cfg.d_model) / cfg.n_head, L = cfg.n_layer;
    j["mha_kv_cache_bytes_per_token"] = L * 2 * cfg.n_head * hd * bytes;
    j["gqa4_kv_cache_bytes_per_token"] = L * 2 * std::max(1, cfg.n_head / 4) * hd * bytes;
  }
  return j;
}

void print_cache(const nlohmann::json& c) {
  std::printf("  decoding KV cache  %.0f bytes per token", c["kv_cache_bytes_per_token"].get<double>());
  if (c.contains("mha_kv_cache_bytes_per_token"))
    std::printf(" (latent: c_KV + rotary key; attention of the same width: MHA %.0f, GQA/4 %.0f)",
                c["mha_kv_cache_bytes_per_token"].get<double>(), c["gqa4_kv_cache_bytes_per_token"].get<double>());
  std::printf("\n");
}

void memory_plan_cuda(const MemoryOptions& o, const kiln::ModelConfig& cfg) {
  using namespace kiln;
  const MemoryPlan plan =
      plan_memory(cfg, true, int64_t(o.batch) * o.seq, RecomputePolicy::parse(o.recompute), o.lm_head_chunk);
  const double state = double(plan.state), acts = double(plan.activations);
  const double MB = 1024.0 * 1024.0;
  if (o.json) {
    nlohmann::json j = {{"device", "cuda"}, {"params", cfg.num_params()}, {"active_params", cfg.active_params()},
                        {"batch", o.batch}, {"seq", o.seq},
                        {"recompute", o.recompute},
                        {"state_bytes", state}, {"activations_bytes", acts}, {"total_bytes", state + acts}};
    j.update(cache_per_token(cfg, 2));
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("model %.2fM parameters, batch %d x %d tokens, GPU (bf16 activations and matrix products), "
              "recompute %s\n", double(cfg.num_params()) / 1e6, o.batch, o.seq, o.recompute.c_str());
  std::printf("  fp32 weights, bf16 copy, fp32 gradients, AdamW m and v  %10.1f MB\n  activations  %10.1f MB\n"
              "  total        %10.1f MB  (plus the CUDA context and a 32 MiB cuBLASLt workspace)\n",
              state / MB, acts / MB, (state + acts) / MB);
  print_cache(cache_per_token(cfg, 2));
}

void memory_plan(const MemoryOptions& o) {
  using namespace kiln;
  KILN_CHECK(o.batch > 0 && o.seq > 0, "--batch and --seq must be positive");
  KILN_CHECK(o.zero_stage >= 0 && o.zero_stage <= 3, "--zero-stage must be 0, 1, 2 or 3 (got ", o.zero_stage, ")");
  KILN_CHECK(o.ranks >= 1, "--ranks must be >= 1 (got ", o.ranks, ")");
  KILN_CHECK(o.dtype == "fp32" || o.dtype == "bf16" || o.dtype == "fp16", "--dtype: expected fp32, bf16 or fp16 (got '",
             o.dtype, "')");
  const ModelConfig cfg = load_model_config(o.model);
  KILN_CHECK(o.seq <= cfg.max_positions, "--seq ", o.seq, " exceeds the model's context of ", cfg.max_positions);
  if (parse_device(o.device).cuda) return memory_plan_cuda(o, cfg);
  const RecomputePolicy policy = RecomputePolicy::parse(o.recompute);
  const double psi = double(model_param_table(cfg).total);  // floats in the block (with alignment padding)
  const bool mixed = o.dtype != "fp32";
  // Model state bytes per parameter: weights, gradients, optimizer (AdamW m and v, plus fp32 master weights
  // when the working copy is 16-bit).
  const double w = mixed ? 2 : 4, g = mixed ? 2 : 4, opt = mixed ? 12 : 8;
  const double acts = double(plan_memory(cfg, false, int64_t(o.batch) * o.seq, policy, o.lm_head_chunk).activations);
  const double n = o.ranks;
  // DeepSpeed's formulas (Rajbhandari et al., ZeRO, Figure 1, K = 12 for mixed-precision Adam): stage 1 the
  // optimizer states / N, stage 2 also the gradients / N, stage 3 also the parameters / N.
  auto per_rank = [&](int stage) {
    double ww = psi * w, gg = psi * g, oo = psi * opt;
    if (stage >= 1) oo /= n;
    if (stage >= 2) gg /= n;
    if (stage >= 3) ww /= n;
    return std::array<double, 3>{ww, gg, oo};
  };
  // Beside them, what a sharded model works in (stages 2, 3; models/model.h ShardOptions): the gradient
  // buffers of the embeddings, the final norm and head, and two layers; at stage 3 their parameter buffers too
  // (the partitioned stages' analogue of DeepSpeed's reduce and prefetch buckets).
  auto buffers = [&](int stage) { return double(shard_buffer_bytes(cfg, stage, mixed)); };
  const double MB = 1024.0 * 1024.0;
  // What kiln itself allocates on one process: fp32 weights, gradients and both moments, plus the 16-bit
  // weight copies in mixed precision (kiln keeps fp32 gradients on the CPU).
  const double kiln_state = psi * (mixed ? 18 : 16);
  nlohmann::json j = {{"family", cfg.family}, {"params", cfg.num_params()}, {"active_params", cfg.active_params()},
                      {"param_floats", psi}, {"kiln_single_process_bytes", kiln_state + acts},  {"batch", o.batch},        {"seq", o.seq},
                      {"dtype", o.dtype},             {"recompute", policy.str()}, {"ranks", o.ranks},
                      {"activations_bytes", acts}};
  j.update(cache_per_token(cfg, 4));
  for (int s = 0; s <= 3; s++) {
    auto [ww, gg, oo] = per_rank(s);
    j["zero" + std::to_string(s)] = {{"weights_bytes", ww}, {"gradients_bytes", gg}, {"optimizer_bytes", oo},
                                     {"buffers_bytes", buffers(s)}, {"total_bytes", ww + gg + oo + buffers(s) + acts}};
  }
  if (o.json) {
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  auto [ww, gg, oo] = per_rank(o.zero_stage);
  std::printf("model %.2fM parameters, batch %d x %d tokens, %s, recompute %s\n", double(cfg.num_params()) / 1e6,
              o.batch, o.seq, o.dtype.c_str(), policy.str().c_str());
  // A mixture of experts reads only its chosen experts per token.
  if (cfg.has_moe())
    std::printf("  active per token %.2fM parameters (top %d of %d routed experts)\n", double(cfg.active_params()) / 1e6,
                cfg.moe_top_k, cfg.n_experts);
  const double bb = buffers(o.zero_stage);
  std::printf("  weights      %10.1f MB\n  gradients    %10.1f MB\n  optimizer    %10.1f MB\n", ww / MB, gg / MB, oo / MB);
  if (bb > 0) std::printf("  buffers      %10.1f MB  (a sharded model's per-unit working buffers)\n", bb / MB);
  std::printf("  activations  %10.1f MB\n  total        %10.1f MB  (ZeRO stage %d over %d ranks, per rank)\n",
              acts / MB, (ww + gg + oo + bb + acts) / MB, o.zero_stage, o.ranks);
  std::printf("  kiln on one process (fp32 gradients and moments%s): %.1f MB\n",
              mixed ? ", fp32 master + 16-bit weight copies" : "", (kiln_state + acts) / MB);
  std::printf("  per rank by ZeRO stage (paper's accounting, plus the working buffers):");
  for (int s = 0; s <= 3; s++) {
    auto [a, b, c] = per_rank(s);
    std::printf("  %d: %.1f MB", s, (a + b + c + buffers(s) + acts) / MB);
  }
  std::printf("\n");
  print_cache(cache_per_token(cfg, 4));
}

kiln::cli::Command memory_cmd("memory", [](CLI::App& root) {
  auto o = std::make_shared<MemoryOptions>();
  auto* c = root.add_subcommand("memory", "Memory plan of a training step: weights, gradients, optimizer, activations");
  c->add_option("--model", o->model, "config.json or a directory holding one")->required();
  c->add_option("--batch", o->batch, "Sequences per micro-batch")->capture_default_str();
  c->add_option("--seq", o->seq, "Tokens per sequence")->capture_default_str();
  c->add_option("--dtype", o->dtype, "fp32, bf16 or fp16 (16-bit: fp32 master weights and moments)")
      ->capture_default_str();
  c->add_option("--recompute", o->recompute, "none, block, every:K or selective")->capture_default_str();
  c->add_option("--lm-head-chunk", o->lm_head_chunk, "Rows of logits held at once (0: all with --recompute none, else 64)")->capture_default_str();
  c->add_option("--zero-stage", o->zero_stage, "ZeRO stage 0-3 for the per-rank figure")->capture_default_str();
  c->add_option("--ranks", o->ranks, "Data-parallel ranks")->capture_default_str();
  c->add_flag("--json", o->json, "One JSON line with every stage");
  c->add_option("--device", o->device, "cpu, or cuda: the GPU trainer's device memory (bf16)")->capture_default_str();
  c->callback([o] { memory_plan(*o); });
});

}  // namespace
