// The factories: a ModelConfig and a device in, a model or a decoder out. Every family on every device runs the
// one Transformer composition (models/transformer.h); the device is the backend its modules run on (the CPU,
// or the CUDA backend: the GPU, or the SIMT emulator with KILN_GPU_EMULATOR=1).
#include "models/model.h"

#include "core/error.h"
#include "models/family.h"
#include "models/transformer.h"

namespace kiln {

std::unique_ptr<Model> make_model(const ModelConfig& cfg, const ModelOptions& opt) {
  return std::make_unique<Transformer>(cfg, opt);
}

MemoryPlan plan_memory(const ModelConfig& cfg, bool cuda, int64_t N, RecomputePolicy policy, int lm_head_chunk) {
  MemoryPlan m;
  const size_t total = model_param_table(cfg).total;
  if (cuda) {
    // fp32 weights, the bf16 copy, fp32 gradients and the two AdamW moments the optimizer adds on the device.
    m.state = total * (4 + 2 + 4 + 4 + 4);
    m.activations = Transformer::plan_bytes(cfg, N, policy, lm_head_chunk, /*device=*/true) +
                    nn::make_cuda_backend()->scratch_bytes(training_scratch(cfg, N));
    return m;
  }
  m.state = total * 2 * sizeof(float);
  m.activations = Transformer::plan_bytes(cfg, N, policy, lm_head_chunk);
  return m;
}

std::unique_ptr<IncrementalDecoder> make_decoder(const ModelConfig& cfg, const float* params,
                                                 const DecoderOptions& opt) {
  return std::make_unique<TransformerDecoder>(cfg, params, opt.batch, opt.max_positions, opt.cuda, opt.cuda_graph,
                                              opt.weights);
}

}  // namespace kiln
