// The factories: a ModelConfig and a device in, a model or a decoder out. The CPU runs the Transformer
// composition for every family; on the GPU, GPT-2 runs its CUDA model until the CUDA backend carries the modules.
#include "models/model.h"

#include <cmath>

#include "core/error.h"
#include "core/gpu.h"
#include "core/memory.h"
#include "models/family.h"
#include "models/gpt2_cuda.h"
#include "models/gpt2_cuda_decoder.h"
#include "models/transformer.h"

namespace kiln {

namespace {

// GPT-2 on the GPU (bf16): the device model plus the host block checkpoints are written from.
class Gpt2CudaModel final : public Model {
 public:
  Gpt2CudaModel(const ModelConfig& cfg, const ModelOptions& opt)
      : cfg_(cfg), table_(model_param_table(cfg)), be_(nn::make_cuda_backend()), host_(table_.total * sizeof(float)),
        gpu_(GPT2Config::from(cfg, "--device cuda"), table_) {}
  const ModelConfig& config() const override { return cfg_; }
  const ParamTable& table() const override { return table_; }
  float* host_params() override { return host_.f32(); }
  void params_changed() override { gpu_.upload_params(host_.f32()); }
  void sync_to_host() override { gpu_.download_params(host_.f32()); }
  size_t plan(int B, int T, RecomputePolicy policy, int) override {
    KILN_CHECK(policy.kind == RecomputePolicy::None || (policy.kind == RecomputePolicy::Every && policy.k == 1),
               "--recompute ", policy.str(), ": --device cuda supports none and block");
    return gpu_.plan(int64_t(B) * T, policy.kind == RecomputePolicy::Every);
  }
  size_t activation_bytes() const override { return gpu_.activation_bytes(); }
  size_t state_bytes() const override { return gpu_.state_bytes(); }
  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                 float grad_scale) override {
    const int64_t N = attn.cu_seqlens ? attn.cu_seqlens[attn.num_seqs] : int64_t(attn.B) * attn.T;
    return gpu_.forward(tokens, pos, targets, N, attn, grad_scale);
  }
  void backward() override { gpu_.backward(); }
  void zero_grad() override { gpu_.zero_grad(); }
  void synchronize() override { gpu::synchronize(); }
  const float* logits() const override { fail("--device cuda: the GPU model keeps no host logits"); }
  ParamBlocks blocks() override { return gpu_.blocks(be_.get()); }

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  Buffer host_;
  GPT2Cuda gpu_;
};

}  // namespace

std::unique_ptr<Model> make_model(const ModelConfig& cfg, const ModelOptions& opt) {
  if (opt.cuda) {
    KILN_CHECK(cfg.family == "gpt2", "--device cuda runs GPT-2 models so far (this is ", cfg.family,
               "); the other families train on the CPU");
    KILN_CHECK(!opt.lowp || *opt.lowp == LowpType::BF16, "--device cuda trains in bf16");
    return std::make_unique<Gpt2CudaModel>(cfg, opt);
  }
  return std::make_unique<Transformer>(cfg, opt);
}

MemoryPlan plan_memory(const ModelConfig& cfg, bool cuda, int64_t N, RecomputePolicy policy, int lm_head_chunk) {
  MemoryPlan m;
  if (cuda) {
    const GPT2Config g = GPT2Config::from(cfg, "--device cuda");
    m.state = GPT2Cuda::state_bytes(model_param_table(cfg));
    m.activations = GPT2Cuda::plan_bytes(g, N, policy.kind == RecomputePolicy::Every);
    return m;
  }
  m.state = model_param_table(cfg).total * 2 * sizeof(float);
  m.activations = Transformer::plan_bytes(cfg, N, policy, lm_head_chunk);
  return m;
}

std::unique_ptr<IncrementalDecoder> make_decoder(const ModelConfig& cfg, const float* params,
                                                 const DecoderOptions& opt) {
  if (opt.cuda) {
    KILN_CHECK(cfg.family == "gpt2", "--device cuda decodes GPT-2 models so far (this is ", cfg.family, ")");
    return std::make_unique<CudaDecoder>(cfg, params, opt.batch, opt.max_positions, opt.cuda_graph);
  }
  return std::make_unique<TransformerDecoder>(cfg, params, opt.batch, opt.max_positions);
}

}  // namespace kiln
