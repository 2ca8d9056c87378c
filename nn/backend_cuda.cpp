// The GPU backend (kernels/cuda/ through core/gpu.h): device memory and the optimizer's ops today. The module
// ops follow as their CUDA kernels land; until then the GPU model (models/gpt2_cuda.h) runs its own forward.
#include <cmath>

#include "core/gpu.h"
#include "kernels/adamw.h"
#include "nn/backend.h"

namespace kiln::nn {
namespace {

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }
  DType act_dtype() const override { return DType::BF16; }
  std::optional<LowpType> lowp() const override { return LowpType::BF16; }
  void* alloc(size_t bytes, const char* what) override { return gpu::malloc(bytes, what); }
  void free(void* p) override { gpu::free(p); }
  void upload(void* dst, const void* host, size_t bytes) override {
    gpu::copy_to_device(dst, host, bytes);
    gpu::synchronize();
  }
  void download(void* host, const void* src, size_t bytes) override { gpu::copy_to_host(host, src, bytes); }
  void memset(void* p, int value, size_t bytes) override { gpu::memset(p, value, bytes); }

  void adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n,
                    const AdamWHyper& h) override {
    cuda::adamw_update(param, param16, grad, m, v, n, h, gpu::stream());
  }
  double sum_squares(const float* x, int64_t n) override {
    const size_t need = (1 + cuda::sum_squares_scratch_floats(n)) * 4;
    if (scratch_.size() < need) scratch_.resize(need, "gradient norm scratch");
    float* out = scratch_.as<float>();
    gpu::memset(out, 0, 4);
    cuda::sum_squares(out, x, n, out + 1, gpu::stream());
    float sq = 0;
    gpu::copy_to_host(&sq, out, 4);
    return double(sq);
  }

 private:
  gpu::DeviceBuffer scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace kiln::nn
