// Upsampling and rearrangement of image planes [B, C, H, W] (fp32), as decoders use them:
//   nearest   out[b,c,y,x] = in[b,c,⌊y/s⌋,⌊x/s⌋]                       [B, C, sH, sW]
//   bilinear  align_corners = False: source coordinate u = (y + ½)/s − ½ clamped at 0, rows ⌊u⌋ and
//             min(⌊u⌋ + 1, H − 1) mixed by u − ⌊u⌋ (the same along x)   [B, C, sH, sW]  (PyTorch's rule)
//   bilinear_aligned  align_corners = True: u = y·(H − 1)/(sH − 1) (0 when sH = 1), the corners' centres
//             coincide; the same taps otherwise                          [B, C, sH, sW]
//   pixel_shuffle    [B, C·r², H, W] -> [B, C, rH, rW]: out[b,c,hr+i,wr+j] = in[b, c·r² + i·r + j, h, w]
//   pixel_unshuffle  its inverse
// Backward: din = the adjoint applied to dout (overwritten). ref:: scatters the adjoint; cpu:: and cuda:: gather it
// (each input element sums the outputs that read it: no races, deterministic).
#pragma once
#include <cstdint>

namespace kiln {

enum class Upsample { Nearest, Bilinear, BilinearAligned };

namespace cpu {
void upsample_forward(float* out, const float* in, int64_t planes, int H, int W, int s, Upsample mode);
void upsample_backward(float* din, const float* dout, int64_t planes, int H, int W, int s, Upsample mode);
void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r);    // C: output channels
void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r);  // H, W: input's / r
}  // namespace cpu
namespace cuda {
void upsample_forward(float* out, const float* in, int64_t planes, int H, int W, int s, Upsample mode, void* stream);
void upsample_backward(float* din, const float* dout, int64_t planes, int H, int W, int s, Upsample mode,
                       void* stream);
void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r, void* stream);
void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r, void* stream);
}  // namespace cuda
namespace ref {
void upsample_forward(float* out, const float* in, int64_t planes, int H, int W, int s, Upsample mode);
void upsample_backward(float* din, const float* dout, int64_t planes, int H, int W, int s, Upsample mode);
void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r);
void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r);
}  // namespace ref

// The bilinear taps of output coordinate y (of s·n) along an axis of n: rows i0, i1 and the weight of i1.
// Written for host and device (the CUDA kernels call it too).
#if defined(__CUDACC__)
#define KILN_UPSAMPLE_HD __host__ __device__
#else
#define KILN_UPSAMPLE_HD
#endif
KILN_UPSAMPLE_HD inline void bilinear_taps(int y, int n, int s, int& i0, int& i1, float& w1, bool aligned = false) {
  float u;
  if (aligned)
    u = s * n > 1 ? float(y) * float(n - 1) / float(s * n - 1) : 0.0f;
  else
    u = (float(y) + 0.5f) / float(s) - 0.5f;
  if (u < 0) u = 0;
  i0 = int(u);
  if (i0 > n - 1) i0 = n - 1;
  i1 = i0 + 1 < n ? i0 + 1 : n - 1;
  w1 = u - float(i0);
}

// The outputs [lo, hi) along an axis that can read input row i (a superset: the backward gathers over it).
KILN_UPSAMPLE_HD inline void bilinear_reach(int i, int n, int s, bool aligned, int& lo, int& hi) {
  if (!aligned || n == 1) {
    lo = s * (i - 1) > 0 ? s * (i - 1) : 0, hi = s * (i + 2) < n * s ? s * (i + 2) : n * s;
    return;
  }
  // u = y·(n − 1)/(sn − 1) reads row i when i − 1 < u < i + 1.
  const double r = double(s * n - 1) / double(n - 1);
  lo = int((i - 1) * r) - 1, hi = int((i + 1) * r) + 2;
  if (lo < 0) lo = 0;
  if (hi > n * s) hi = n * s;
}

// The gradient that input (i, j) of an H×W plane receives from d, its output gradient (sH×sW): the sum over the
// outputs that read it (the backward gathers, so no two threads write one input). mode 0, 1, 2: Upsample's order.
KILN_UPSAMPLE_HD inline float upsample_gather(const float* d, int i, int j, int H, int W, int s, int mode) {
  const int OW = W * s;
  float acc = 0;
  if (mode == 0) {
    for (int y = i * s; y < (i + 1) * s; y++)
      for (int x = j * s; x < (j + 1) * s; x++) acc += d[y * OW + x];
    return acc;
  }
  // Output y reads rows ⌊u⌋, ⌊u⌋ + 1: only the outputs bilinear_reach names can reach row i (column j).
  const bool al = mode == 2;
  int ylo, yhi, xlo, xhi;
  bilinear_reach(i, H, s, al, ylo, yhi);
  bilinear_reach(j, W, s, al, xlo, xhi);
  for (int y = ylo; y < yhi; y++) {
    int y0, y1;
    float wy;
    bilinear_taps(y, H, s, y0, y1, wy, al);
    const float ay = (y0 == i ? 1 - wy : 0.0f) + (y1 == i ? wy : 0.0f);
    if (ay == 0) continue;
    for (int x = xlo; x < xhi; x++) {
      int x0, x1;
      float wx;
      bilinear_taps(x, W, s, x0, x1, wx, al);
      const float ax = (x0 == j ? 1 - wx : 0.0f) + (x1 == j ? wx : 0.0f);
      acc += ay * ax * d[y * OW + x];
    }
  }
  return acc;
}

}  // namespace kiln
