#include "kernels/argmax.h"

#include <cmath>

namespace kiln {

int32_t argmax(const float* x, int n) {
  int32_t best = 0;
  float bv = -INFINITY;
  bool found = false;
  for (int i = 0; i < n; i++)
    if (x[i] > bv || (!found && x[i] == bv)) {  // the first -inf counts if nothing beats it
      bv = x[i];
      best = i;
      found = true;
    }
  return best;
}

}  // namespace kiln
