// Splitting an elementwise range over the OpenMP threads in contiguous, 16-float-aligned slices.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace kiln::cpu {

// Below this many elements an op runs on the calling thread (waking the team costs more than it saves).
inline constexpr int64_t kSerialBelow = 1 << 14;

// Calls fn(begin, end) once per thread on contiguous slices of [0, n) whose starts are multiples of 16.
template <class Fn>
void parallel_ranges(int64_t n, Fn&& fn) {
#pragma omp parallel if (n >= kSerialBelow)
  {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = ((n + nt - 1) / nt + 15) / 16 * 16;
    const int64_t b = std::min(n, per * t), e = std::min(n, b + per);
    if (b < e) fn(b, e);
  }
}

}  // namespace kiln::cpu
