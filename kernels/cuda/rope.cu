// Rotary position embedding on the GPU (kernels/rope.h), in place. One thread per rotated pair
// (token, head, i < rot_dim/2), grid-stride: it reads x[i] and x[i + rot_dim/2], rotates them in fp32 and
// writes both back; no other thread touches them, so in place needs no barrier. Dims past rot_dim are left
// alone (never read or written). The angle is float(pos)·inv_freq[i] in fp32 with the accurate sinf/cosf
// (positions reach 10⁵, where fast-math argument reduction would be off).
#include "kernels/rope.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

KILN_DEVICE float load1(const float* p) { return *p; }
KILN_DEVICE float load1(const uint16_t* p) { return simt::bf16_to_f32(*p); }
KILN_DEVICE void store1(float* p, float v) { *p = v; }
KILN_DEVICE void store1(uint16_t* p, float v) { *p = simt::f32_to_bf16(v); }

// sign = +1: forward rotation by the angle; -1: by its negative (the backward).
template <class T>
KILN_GLOBAL void __launch_bounds__(256) rope_kernel(T* x, const int32_t* pos, const float* inv_freq, int64_t N,
                                                    int heads, int HD, int half, int64_t ld, float sign,
                                                    bool interleaved, float factor) {
  const int64_t total = N * heads * half;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int i = int(idx % half);
    const int64_t nh = idx / half, n = nh / heads, h = nh % heads;
    T* p = x + n * ld + h * HD + (interleaved ? 2 * i : i);
    T* q = p + (interleaved ? 1 : half);
    const float ang = float(pos[n]) * inv_freq[i];
    const float c = factor * cosf(ang), s = factor * sign * sinf(ang);
    const float a = load1(p), b = load1(q);
    store1(p, a * c - b * s);
    store1(q, b * c + a * s);
  }
}

template <class T>
void rope(T* x, const int32_t* pos, int64_t N, const RopeParams& p, float sign, void* stream, const char* what) {
  KILN_CHECK(p.heads >= 1 && p.HD >= 1 && p.rot_dim >= 0 && p.rot_dim % 2 == 0 && p.rot_dim <= p.HD, what,
             ": bad sizes heads=", p.heads, " HD=", p.HD, " rot_dim=", p.rot_dim);
  const int64_t ld = p.ld == 0 ? int64_t(p.heads) * p.HD : p.ld;
  KILN_CHECK(ld >= int64_t(p.heads) * p.HD, what, ": ld = ", p.ld, " is shorter than heads·HD");
  const int half = p.rot_dim / 2;
  const int64_t total = N * p.heads * half;
  if (total <= 0) return;
  KILN_CHECK(x && pos && p.inv_freq, what, ": null pointer argument");
  const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 4096));
  simt::launch(rope_kernel<T>, dim3(blocks), dim3(256), 0, static_cast<cudaStream_t>(stream), x, pos, p.inv_freq, N,
               p.heads, p.HD, half, ld, sign, p.interleaved, p.factor);
}

}  // namespace

void rope_forward(uint16_t* x, const int32_t* pos, int64_t N, const RopeParams& p, void* stream) {
  rope(x, pos, N, p, 1.0f, stream, "rope_forward");
}
void rope_forward(float* x, const int32_t* pos, int64_t N, const RopeParams& p, void* stream) {
  rope(x, pos, N, p, 1.0f, stream, "rope_forward");
}
void rope_backward(uint16_t* dx, const int32_t* pos, int64_t N, const RopeParams& p, void* stream) {
  rope(dx, pos, N, p, -1.0f, stream, "rope_backward");
}
void rope_backward(float* dx, const int32_t* pos, int64_t N, const RopeParams& p, void* stream) {
  rope(dx, pos, N, p, -1.0f, stream, "rope_backward");
}

}  // namespace kiln::cuda
