// AdamW (Loshchilov & Hutter) with decoupled weight decay, as torch.optim.AdamW computes it:
//   g = grad · grad_scale            (grad_scale folds in clipping and loss-scale division)
//   m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²
//   p -= lr · (wd·p + (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps))
// t is the 1-based step count. Also the global gradient norm used for clipping.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

struct AdamWHyper {
  float lr = 3e-4f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.0f;
  int64_t t = 1;
  float grad_scale = 1.0f;
  // cpu:: only: set the gradient to zero once read (saves the next step a separate pass to clear it).
  bool zero_grad = false;
};

namespace cpu {
void adamw_update(float* param, float* grad, float* m, float* v, int64_t n, const AdamWHyper& h);
// Sum of squares in double precision (threaded).
double sum_squares(const float* x, int64_t n);
}  // namespace cpu
// cuda:: (kernels/cuda/adamw.cu): fused AdamW on fp32 master weights; also writes the bf16 copy the matmuls
// read (param16, may be null) and, when h.zero_grad, clears the gradient it read. sum_squares adds the
// squared norm of x into *out (a device float; the caller zeroes it) with a deterministic two-pass reduction.
namespace cuda {
void adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n, const AdamWHyper& h,
                  void* stream);
size_t sum_squares_scratch_floats(int64_t n);
void sum_squares(float* out, const float* x, int64_t n, float* scratch, void* stream);
}  // namespace cuda
namespace ref {
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, const AdamWHyper& h);
double sum_squares(const float* x, int64_t n);
}  // namespace ref
}  // namespace kiln
