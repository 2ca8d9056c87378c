// Upsampling and rearrangement of image planes [B, C, H, W] (fp32), as decoders use them:
//   nearest   out[b,c,y,x] = in[b,c,⌊y/s⌋,⌊x/s⌋]                       [B, C, sH, sW]
//   bilinear  align_corners = False: source coordinate u = (y + ½)/s − ½ clamped at 0, rows ⌊u⌋ and
//             min(⌊u⌋ + 1, H − 1) mixed by u − ⌊u⌋ (the same along x)   [B, C, sH, sW]  (PyTorch's rule)
//   pixel_shuffle    [B, C·r², H, W] -> [B, C, rH, rW]: out[b,c,hr+i,wr+j] = in[b, c·r² + i·r + j, h, w]
//   pixel_unshuffle  its inverse
// Backward: din = the adjoint applied to dout (overwritten). ref:: scatters the adjoint; cpu:: and cuda:: gather it
// (each input element sums the outputs that read it: no races, deterministic).
#pragma once
#include <cstdint>

namespace kiln {

enum class Upsample { Nearest, Bilinear };

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
inline void bilinear_taps(int y, int n, int s, int& i0, int& i1, float& w1) {
  float u = (float(y) + 0.5f) / float(s) - 0.5f;
  if (u < 0) u = 0;
  i0 = int(u);
  if (i0 > n - 1) i0 = n - 1;
  i1 = i0 + 1 < n ? i0 + 1 : n - 1;
  w1 = u - float(i0);
}

}  // namespace kiln
