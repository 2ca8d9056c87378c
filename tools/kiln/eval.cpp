// kiln eval: mean next-token loss and perplexity of a checkpoint over token shards, one JSON line:
//   {"loss": L, "perplexity": exp(L), "batches": N, "tokens": N·B·T}
// Batches are llm.c's sequential ones (B·T+1 consecutive tokens, advancing by B·T, shard after shard); the
// evaluation makes one pass over the data, or stops after --max-batches.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/gpu.h"
#include "models/checkpoint.h"
#include "models/checkpoint.h"
#include "models/model.h"
#include "tools/kiln/command.h"
#include "train/dataloader.h"
#include "train/trainer.h"

namespace {

struct EvalOptions {
  std::string model, data, device = "cpu";
  int batch = 4, seq = 0, max_batches = 0, threads = 0;
};

void run_eval(const EvalOptions& o) {
  using namespace kiln;
  set_threads(o.threads);
  const ModelConfig cfg = load_model_config_for(o.model);
  const int B = o.batch, T = o.seq > 0 ? o.seq : cfg.max_positions;
  KILN_CHECK(B >= 1, "--batch must be >= 1, got ", B);
  KILN_CHECK(T <= cfg.max_positions, "--seq ", T, " exceeds the model's context of ", cfg.max_positions);
  KILN_CHECK(o.max_batches >= 0, "--max-batches must be >= 0 (0: one pass over the data), got ", o.max_batches);
  const DeviceSpec device = parse_device(o.device);
  if (device.cuda) gpu::init(device.index);
  ModelOptions mo;
  mo.cuda = device.cuda;
  mo.with_grads = false;
  std::unique_ptr<Model> model = make_model(cfg, mo);
  load_model_weights(o.model, cfg, model->table(), model->host_params());
  model->params_changed();
  model->plan(B, T);
  DataLoader loader(o.data, B, T, DataLoader::Order::Sequential, 0, cfg.vocab_size);

  const size_t N = size_t(B) * size_t(T);
  std::vector<int32_t> in(N), tg(N), pos(N);
  for (size_t i = 0; i < N; i++) pos[i] = int32_t(i % size_t(T));
  const AttentionParams ap = model->attention(B, T);
  double sum = 0;
  int64_t batches = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (o.max_batches == 0 || batches < o.max_batches) {
    loader.next(in.data(), tg.data());
    if (loader.state().epoch > 0) break;  // the loader wrapped around: one pass is done
    sum += model->forward(in.data(), pos.data(), tg.data(), ap, /*grad_scale=*/0.0f);
    batches++;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  KILN_CHECK(batches > 0, o.data, ": no complete batch of ", B, "x", T, " tokens");
  const double loss = sum / (double(batches) * double(N));
  nlohmann::json j = {{"loss", loss},
                      {"perplexity", std::exp(loss)},
                      {"batches", batches},
                      {"tokens", batches * int64_t(N)},
                      {"batch", B},
                      {"seq", T},
                      {"tokens_per_s", secs > 0 ? double(batches) * double(N) / secs : 0.0}};
  std::printf("%s\n", j.dump().c_str());
}

kiln::cli::Command eval_cmd("eval", [](CLI::App& root) {
  auto o = std::make_shared<EvalOptions>();
  auto* c = root.add_subcommand("eval", "Mean loss and perplexity of a checkpoint on token shards (one JSON line)");
  c->add_option("--model", o->model, "Checkpoint directory (config.json + model.safetensors)")->required();
  c->add_option("--data", o->data, "Token shard file or glob (llm.c .bin format)")->required();
  c->add_option("--batch", o->batch, "Sequences per batch (B)")->capture_default_str();
  c->add_option("--seq", o->seq, "Tokens per sequence (T; 0: the model's n_positions)")->capture_default_str();
  c->add_option("--max-batches", o->max_batches, "Stop after N batches (0: one pass over the data)")
      ->capture_default_str();
  c->add_option("--threads", o->threads, "CPU threads (0: all cores)")->capture_default_str();
  c->add_option("--device", o->device, "cpu, or cuda / cuda:N (bf16)")->capture_default_str();
  c->callback([o] { run_eval(*o); });
});

}  // namespace
