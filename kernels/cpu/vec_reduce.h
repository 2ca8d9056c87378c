// Horizontal sums of 16-float vectors for the CPU kernels, in fixed orders (results do not depend on what else
// is computed beside them).
#pragma once

#include "kernels/cpu/vec16.h"

namespace kiln::cpu::vred {

typedef float f32x8v __attribute__((vector_size(32)));
typedef float f32x4v __attribute__((vector_size(16)));

// One vector: (lanes i and i+8), then (i, i+4), (i, i+2), (i, i+1).
inline float hsum(f32x16 v) {
#ifdef __AVX512F__
  const f32x8v a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const f32x8v a = v.lo + v.hi;
#endif
  const f32x4v b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Sixteen vectors at once: out[t] = Σ_i p[t][i], each summed in hsum's order. With AVX-512, each level adds the
// two halves of pairs of vectors (16 → 8 → 4 → 2 → 1 partials per vector), which leaves vector t's sum in lane
// bitrev4(t); the last shuffle puts it back: about 3 operations per sum instead of a full reduction each.
inline f32x16 hsum16x16(const f32x16* p) {
#ifdef __AVX512F__
  f32x16 q[8], r[4], u[2];
  for (int j = 0; j < 8; j++)
    q[j] = __builtin_shufflevector(p[2 * j], p[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * j], p[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; j++)
    r[j] = __builtin_shufflevector(q[2 * j], q[2 * j + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(q[2 * j], q[2 * j + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; j++)
    u[j] = __builtin_shufflevector(r[2 * j], r[2 * j + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(r[2 * j], r[2 * j + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const f32x16 w = __builtin_shufflevector(u[0], u[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                   __builtin_shufflevector(u[0], u[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return __builtin_shufflevector(w, w, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
#else
  alignas(32) float s[16];
  for (int t = 0; t < 16; t++) s[t] = hsum(p[t]);
  return load16(s);
#endif
}

}  // namespace kiln::cpu::vred
