// Rotary position embedding in Hugging Face's convention (rotate_half): within each head of HD values, the
// first rot_dim dims are rotated as pairs (i, i + rot_dim/2), i < rot_dim/2, by the angle pos·inv_freq[i]:
//   x'[i]             = x[i]·cos − x[i + rot/2]·sin
//   x'[i + rot/2]     = x[i + rot/2]·cos + x[i]·sin
// and dims rot_dim .. HD−1 pass unchanged (partial rotary). The angle is computed in fp32 as
// float(pos) · inv_freq[i] (what the PyTorch models do); cos and sin of it in fp32.
//
// In place on rows of the fused projection output: token n's heads start at x + n·ld, `heads` heads of HD
// values each, side by side. For a [q | k | v] row (kernels/attention.h) heads = NH + NKV rotates the queries
// and the keys in one call and leaves the values alone. The scaling rules of the families (Llama 3's
// frequency bands, linear position scaling) are folded into inv_freq by the caller (models/).
// The backward rotates the gradient by −angle (the transpose of a rotation), also in place.
// interleaved (DeepSeek's layout, as Hugging Face's apply_rotary_pos_emb_interleave reads it): the pairs are
// (2i, 2i + 1) instead of (i, i + rot/2). Hugging Face de-interleaves q and k alike before rotate_half, so the
// scores (all attention reads) are the same. factor multiplies cos and sin (yarn's attention_factor; 1 else).
#pragma once
#include <cstdint>

namespace kiln {

struct RopeParams {
  int heads = 1;                    // heads rotated per row
  int HD = 64;                      // head size
  int rot_dim = 64;                 // rotated dims per head (even, <= HD)
  int64_t ld = 0;                   // row stride in floats (0: heads·HD)
  const float* inv_freq = nullptr;  // [rot_dim / 2]
  bool interleaved = false;         // pairs (2i, 2i+1) instead of (i, i + rot_dim/2)
  float factor = 1.0f;              // scales cos and sin
};

// Offsets within a head of pair i's two elements.
inline int rope_first(const RopeParams& p, int i) { return p.interleaved ? 2 * i : i; }
inline int rope_partner(const RopeParams& p) { return p.interleaved ? 1 : p.rot_dim / 2; }

// Throws naming the field when p cannot describe a rotation (heads/HD not positive, rot_dim odd or > HD, no
// inv_freq); every implementation checks with it.
void check_rope_params(const RopeParams& p);

namespace cpu {
void rope_forward(float* x, const int32_t* pos, int64_t N, const RopeParams& p);
void rope_backward(float* dx, const int32_t* pos, int64_t N, const RopeParams& p);
}  // namespace cpu
// cuda:: (kernels/cuda/rope.cu): the same in place on bf16 (fp32 math) or fp32 rows; p.inv_freq and pos are
// device arrays.
namespace cuda {
void rope_forward(uint16_t* x, const int32_t* pos, int64_t N, const RopeParams& p, void* stream);
void rope_forward(float* x, const int32_t* pos, int64_t N, const RopeParams& p, void* stream);
void rope_backward(uint16_t* dx, const int32_t* pos, int64_t N, const RopeParams& p, void* stream);
void rope_backward(float* dx, const int32_t* pos, int64_t N, const RopeParams& p, void* stream);
}  // namespace cuda
namespace ref {
void rope_forward(float* x, const int32_t* pos, int64_t N, const RopeParams& p);
void rope_backward(float* dx, const int32_t* pos, int64_t N, const RopeParams& p);
}  // namespace ref
}  // namespace kiln
