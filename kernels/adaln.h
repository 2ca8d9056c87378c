// Adaptive layer-norm modulation (DiT's adaLN-Zero): per-sample vectors from the conditioning act on every token
// of that sample's sequence. B sequences of T tokens, rows of C; the per-sample vectors are rows of stride ld
// (slices of the [B, ld] modulation product, shift / scale / gate side by side).
//   modulate:  out[b,t,c] = x[b,t,c]·(1 + scale[b,c]) + shift[b,c]
//              dx = dout·(1 + scale);  dshift[b,c] = Σ_t dout;  dscale[b,c] = Σ_t dout·x
//   gate:      y[b,t,c] = res[b,t,c] + gate[b,c]·u[b,t,c]      (the gated residual branch; y may alias res)
//              du = gate·dy;  dgate[b,c] = Σ_t dy·u;  (dres = dy: the caller keeps it)
// Backward outputs are overwritten (dshift, dscale, dgate: the modulation product's gradient rows).
#pragma once
#include <cstdint>

namespace kiln {

namespace cpu {
void modulate_forward(float* out, const float* x, const float* shift, const float* scale, int B, int T, int C,
                      int64_t ld);
void modulate_backward(float* dx, float* dshift, float* dscale, const float* dout, const float* x,
                       const float* scale, int B, int T, int C, int64_t ld);
void gate_forward(float* y, const float* res, const float* u, const float* gate, int B, int T, int C, int64_t ld);
void gate_backward(float* du, float* dgate, const float* dy, const float* u, const float* gate, int B, int T, int C,
                   int64_t ld);
}  // namespace cpu

// cuda:: (kernels/cuda/adaln.cu): the activations (x, out, shift, scale, gate, du and the gradient rows) in fp32
// or bf16; the residual stream (res, y, dy) and the branch u fp32. Sums over T in fp32, in token order (one thread
// per (b, c): deterministic).
namespace cuda {
void modulate_forward(float* out, const float* x, const float* shift, const float* scale, int B, int T, int C,
                      int64_t ld, void* stream);
void modulate_forward(uint16_t* out, const uint16_t* x, const uint16_t* shift, const uint16_t* scale, int B, int T,
                      int C, int64_t ld, void* stream);
void modulate_backward(float* dx, float* dshift, float* dscale, const float* dout, const float* x,
                       const float* scale, int B, int T, int C, int64_t ld, void* stream);
void modulate_backward(uint16_t* dx, uint16_t* dshift, uint16_t* dscale, const uint16_t* dout, const uint16_t* x,
                       const uint16_t* scale, int B, int T, int C, int64_t ld, void* stream);
void gate_forward(float* y, const float* res, const float* u, const float* gate, int B, int T, int C, int64_t ld,
                  void* stream);
void gate_forward(float* y, const float* res, const float* u, const uint16_t* gate, int B, int T, int C, int64_t ld,
                  void* stream);
void gate_backward(float* du, float* dgate, const float* dy, const float* u, const float* gate, int B, int T, int C,
                   int64_t ld, void* stream);
void gate_backward(uint16_t* du, uint16_t* dgate, const float* dy, const float* u, const uint16_t* gate, int B,
                   int T, int C, int64_t ld, void* stream);
}  // namespace cuda

// ref:: accumulates in double.
namespace ref {
void modulate_forward(float* out, const float* x, const float* shift, const float* scale, int B, int T, int C,
                      int64_t ld);
void modulate_backward(float* dx, float* dshift, float* dscale, const float* dout, const float* x,
                       const float* scale, int B, int T, int C, int64_t ld);
void gate_forward(float* y, const float* res, const float* u, const float* gate, int B, int T, int C, int64_t ld);
void gate_backward(float* du, float* dgate, const float* dy, const float* u, const float* gate, int B, int T, int C,
                   int64_t ld);
}  // namespace ref

}  // namespace kiln
