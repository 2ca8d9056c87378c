// Upsampling and pixel (un)shuffle on the CPU (kernels/upsample.h): threads over planes; the backward gathers,
// each input element summing the outputs that read it.
#include "kernels/upsample.h"

#include <algorithm>

namespace kiln::cpu {

void upsample_forward(float* out, const float* in, int64_t planes, int H, int W, int s, Upsample mode) {
  const int OH = H * s, OW = W * s;
  const bool al = mode == Upsample::BilinearAligned;
#pragma omp parallel for schedule(static) if (planes * OH * OW > 16384)
  for (int64_t p = 0; p < planes; p++) {
    const float* src = in + p * H * W;
    float* o = out + p * OH * OW;
    for (int y = 0; y < OH; y++)
      for (int x = 0; x < OW; x++) {
        if (mode == Upsample::Nearest) {
          o[y * OW + x] = src[(y / s) * W + x / s];
          continue;
        }
        int y0, y1, x0, x1;
        float wy, wx;
        bilinear_taps(y, H, s, y0, y1, wy, al);
        bilinear_taps(x, W, s, x0, x1, wx, al);
        o[y * OW + x] = (1 - wy) * ((1 - wx) * src[y0 * W + x0] + wx * src[y0 * W + x1]) +
                        wy * ((1 - wx) * src[y1 * W + x0] + wx * src[y1 * W + x1]);
      }
  }
}

void upsample_backward(float* din, const float* dout, int64_t planes, int H, int W, int s, Upsample mode) {
#pragma omp parallel for schedule(static) if (planes * H * W * s * s > 16384)
  for (int64_t p = 0; p < planes; p++)
    for (int i = 0; i < H; i++)
      for (int j = 0; j < W; j++) din[(p * H + i) * W + j] = upsample_gather(dout + p * H * s * W * s, i, j, H, W, s, int(mode));
}

void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r) {
#pragma omp parallel for collapse(2) schedule(static) if (int64_t(B) * C * H * W * r * r > 16384)
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++)
      for (int y = 0; y < H * r; y++)
        for (int x = 0; x < W * r; x++)
          out[((int64_t(b) * C + c) * H * r + y) * W * r + x] =
              in[((int64_t(b) * C * r * r + c * r * r + (y % r) * r + x % r) * H + y / r) * W + x / r];
}

void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r) {
#pragma omp parallel for collapse(2) schedule(static) if (int64_t(B) * C * H * W * r * r > 16384)
  for (int b = 0; b < B; b++)
    for (int k = 0; k < C * r * r; k++)
      for (int h = 0; h < H; h++)
        for (int w = 0; w < W; w++) {
          const int c = k / (r * r), i = (k / r) % r, j = k % r;
          out[((int64_t(b) * C * r * r + k) * H + h) * W + w] =
              in[((int64_t(b) * C + c) * H * r + h * r + i) * W * r + w * r + j];
        }
}

}  // namespace kiln::cpu
