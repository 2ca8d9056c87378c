// Naive reference token + position embedding; tests only.
#include "kernels/embedding.h"

namespace kiln::ref {

void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C) {
  for (int64_t n = 0; n < N; n++) {
    const float* t = wte + int64_t(tokens[n]) * C;
    for (int c = 0; c < C; c++) out[n * C + c] = t[c] + (wpe ? wpe[int64_t(pos[n]) * C + c] : 0.0f);
  }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C) {
  for (int64_t n = 0; n < N; n++) {
    for (int c = 0; c < C; c++) {
      if (dwte) dwte[int64_t(tokens[n]) * C + c] += dout[n * C + c];
      if (dwpe) dwpe[int64_t(pos[n]) * C + c] += dout[n * C + c];
    }
  }
}

}  // namespace kiln::ref
