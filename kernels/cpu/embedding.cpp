// Token + position embedding. Forward threads over rows. Backward threads over slices of the C channels
// (every thread walks all rows but owns its channels), so repeated tokens never race and the sums are
// deterministic.
#include "kernels/embedding.h"

#include <cstring>

#include <omp.h>

#include <algorithm>

#include "core/error.h"

namespace kiln::cpu {

namespace {
// The vocabulary and context sizes are not known here (nn::Embedding checks the upper bounds); a negative
// id would read before the table, so refuse it.
void check_ids(const int32_t* tokens, const int32_t* pos, int64_t N) {
  for (int64_t n = 0; n < N; n++) {
    KILN_CHECK(tokens[n] >= 0, "embedding: token id ", tokens[n], " at row ", n, " is negative");
    KILN_CHECK(pos[n] >= 0, "embedding: position id ", pos[n], " at row ", n, " is negative");
  }
}
}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C) {
  check_ids(tokens, pos, N);
#pragma omp parallel for schedule(static) if (N * C > 16384)
  for (int64_t n = 0; n < N; n++) {
    const float* t = wte + int64_t(tokens[n]) * C;
    float* o = out + n * C;
    if (!wpe) {
      std::memcpy(o, t, sizeof(float) * size_t(C));
      continue;
    }
    const float* p = wpe + int64_t(pos[n]) * C;
#pragma omp simd
    for (int c = 0; c < C; c++) o[c] = t[c] + p[c];
  }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C) {
  check_ids(tokens, pos, N);
#pragma omp parallel if (N * C > 16384)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int per = ((C + nt - 1) / nt + 15) / 16 * 16;
    const int c0 = std::min(C, per * t), c1 = std::min(C, c0 + per);
    for (int64_t n = 0; n < N && c0 < c1; n++) {
      const float* d = dout + n * C;
      if (dwte) {
        float* w = dwte + int64_t(tokens[n]) * C;
#pragma omp simd
        for (int c = c0; c < c1; c++) w[c] += d[c];
      }
      if (dwpe) {
        float* w = dwpe + int64_t(pos[n]) * C;
#pragma omp simd
        for (int c = c0; c < c1; c++) w[c] += d[c];
      }
    }
  }
}

}  // namespace kiln::cpu
