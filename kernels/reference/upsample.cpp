// Naive upsampling and pixel (un)shuffle (kernels/upsample.h); the backward scatters in double.
#include <algorithm>
#include <cstddef>
#include <vector>

#include "kernels/upsample.h"

namespace kiln::ref {

void upsample_forward(float* out, const float* in, int64_t planes, int H, int W, int s, Upsample mode) {
  const int OH = H * s, OW = W * s;
  const bool al = mode == Upsample::BilinearAligned;
  for (int64_t p = 0; p < planes; p++)
    for (int y = 0; y < OH; y++)
      for (int x = 0; x < OW; x++) {
        const float* src = in + p * H * W;
        double v;
        if (mode == Upsample::Nearest) {
          v = src[(y / s) * W + x / s];
        } else {
          int y0, y1, x0, x1;
          float wy, wx;
          bilinear_taps(y, H, s, y0, y1, wy, al);
          bilinear_taps(x, W, s, x0, x1, wx, al);
          v = (1.0 - wy) * ((1.0 - wx) * src[y0 * W + x0] + double(wx) * src[y0 * W + x1]) +
              double(wy) * ((1.0 - wx) * src[y1 * W + x0] + double(wx) * src[y1 * W + x1]);
        }
        out[(p * OH + y) * OW + x] = float(v);
      }
}

void upsample_backward(float* din, const float* dout, int64_t planes, int H, int W, int s, Upsample mode) {
  const int OH = H * s, OW = W * s;
  const bool al = mode == Upsample::BilinearAligned;
  std::vector<double> acc(size_t(H) * W);
  for (int64_t p = 0; p < planes; p++) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int y = 0; y < OH; y++)
      for (int x = 0; x < OW; x++) {
        const double d = dout[(p * OH + y) * OW + x];
        if (mode == Upsample::Nearest) {
          acc[size_t((y / s) * W + x / s)] += d;
          continue;
        }
        int y0, y1, x0, x1;
        float wy, wx;
        bilinear_taps(y, H, s, y0, y1, wy, al);
        bilinear_taps(x, W, s, x0, x1, wx, al);
        acc[size_t(y0 * W + x0)] += (1.0 - wy) * (1.0 - wx) * d;
        acc[size_t(y0 * W + x1)] += (1.0 - wy) * double(wx) * d;
        acc[size_t(y1 * W + x0)] += double(wy) * (1.0 - wx) * d;
        acc[size_t(y1 * W + x1)] += double(wy) * double(wx) * d;
      }
    for (int i = 0; i < H * W; i++) din[p * H * W + i] = float(acc[size_t(i)]);
  }
}

void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r) {
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++)
      for (int i = 0; i < r; i++)
        for (int j = 0; j < r; j++)
          for (int h = 0; h < H; h++)
            for (int w = 0; w < W; w++)
              out[((int64_t(b) * C + c) * H * r + h * r + i) * W * r + w * r + j] =
                  in[((int64_t(b) * C * r * r + c * r * r + i * r + j) * H + h) * W + w];
}

void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r) {
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++)
      for (int i = 0; i < r; i++)
        for (int j = 0; j < r; j++)
          for (int h = 0; h < H; h++)
            for (int w = 0; w < W; w++)
              out[((int64_t(b) * C * r * r + c * r * r + i * r + j) * H + h) * W + w] =
                  in[((int64_t(b) * C + c) * H * r + h * r + i) * W * r + w * r + j];
}

}  // namespace kiln::ref
