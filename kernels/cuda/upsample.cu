// Upsampling and pixel (un)shuffle on the GPU (kernels/upsample.h), fp32: grid-stride maps, one thread per output
// element forward and one per input element backward (the gather of the CPU kernels: deterministic, no atomics).
#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"
#include "kernels/upsample.h"

namespace kiln::cuda {
namespace {

// mode: 0 nearest, 1 bilinear, 2 bilinear with aligned corners (kernels/upsample.h's taps and reach).
KILN_GLOBAL void __launch_bounds__(256) up_fwd(float* out, const float* in, int64_t planes, int H, int W, int s,
                                               int mode) {
  const int OH = H * s, OW = W * s;
  const bool al = mode == 2;
  const int64_t n = planes * OH * OW;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e / (int64_t(OH) * OW);
    const int y = int(e / OW % OH), x = int(e % OW);
    const float* src = in + p * H * W;
    if (mode == 0) {
      out[e] = src[(y / s) * W + x / s];
      continue;
    }
    int y0, y1, x0, x1;
    float wy, wx;
    bilinear_taps(y, H, s, y0, y1, wy, al);
    bilinear_taps(x, W, s, x0, x1, wx, al);
    out[e] = (1 - wy) * ((1 - wx) * src[y0 * W + x0] + wx * src[y0 * W + x1]) +
             wy * ((1 - wx) * src[y1 * W + x0] + wx * src[y1 * W + x1]);
  }
}

KILN_GLOBAL void __launch_bounds__(256) up_bwd(float* din, const float* dout, int64_t planes, int H, int W, int s,
                                               int mode) {
  const int64_t n = planes * H * W;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e / (int64_t(H) * W);
    const int i = int(e / W % H), j = int(e % W);
    din[e] = upsample_gather(dout + p * H * s * W * s, i, j, H, W, s, mode);
  }
}

// shuffle = 1: out [B, C, rH, rW] from in [B, C·r², H, W]; 0: the inverse (out [B, C·r², H, W]).
KILN_GLOBAL void __launch_bounds__(256) shuffle(float* out, const float* in, int B, int C, int H, int W, int r,
                                                int forward) {
  const int64_t n = int64_t(B) * C * H * W * r * r;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    // e indexes the big image [B, C, rH, rW].
    const int x = int(e % (W * r)), y = int(e / (W * r) % (H * r));
    const int64_t bc = e / (int64_t(W) * r * H * r);
    const int c = int(bc % C), b = int(bc / C);
    const int64_t k = ((int64_t(b) * C * r * r + c * r * r + (y % r) * r + x % r) * H + y / r) * W + x / r;
    if (forward)
      out[e] = in[k];
    else
      out[k] = in[e];
  }
}

dim3 grid(int64_t n) { return dim3(unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 4096)))); }

}  // namespace

void upsample_forward(float* out, const float* in, int64_t planes, int H, int W, int s, Upsample mode, void* stream) {
  KILN_CHECK(planes >= 0 && H > 0 && W > 0 && s >= 1, "upsample: bad sizes");
  simt::launch(up_fwd, grid(planes * H * W * s * s), dim3(256), 0, static_cast<cudaStream_t>(stream), out, in, planes,
               H, W, s, int(mode));
}
void upsample_backward(float* din, const float* dout, int64_t planes, int H, int W, int s, Upsample mode,
                       void* stream) {
  KILN_CHECK(planes >= 0 && H > 0 && W > 0 && s >= 1, "upsample: bad sizes");
  simt::launch(up_bwd, grid(planes * H * W), dim3(256), 0, static_cast<cudaStream_t>(stream), din, dout, planes, H, W,
               s, int(mode));
}
void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r, void* stream) {
  simt::launch(shuffle, grid(int64_t(B) * C * H * W * r * r), dim3(256), 0, static_cast<cudaStream_t>(stream), out,
               in, B, C, H, W, r, 1);
}
void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r, void* stream) {
  simt::launch(shuffle, grid(int64_t(B) * C * H * W * r * r), dim3(256), 0, static_cast<cudaStream_t>(stream), out,
               in, B, C, H, W, r, 0);
}

}  // namespace kiln::cuda
