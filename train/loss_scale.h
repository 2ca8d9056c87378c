// Dynamic loss scaling for fp16 training: the loss gradient is multiplied by `scale` so small gradients
// survive fp16's range; a step whose gradients overflowed (inf/NaN) is skipped and the scale halved;
// after `window` clean steps in a row the scale doubles. Too many skipped steps in a row means the model
// overflows whatever the scale: training stops with a clear message instead of training on NaN.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/error.h"

namespace kiln {

struct LossScaler {
  bool enabled = false;
  float scale = 1.0f;
  int window = 1000;            // clean steps before the scale doubles
  int max_consecutive_skips = 20;
  int clean = 0, consecutive_skips = 0;
  int64_t skipped = 0;

  static LossScaler dynamic(float initial, int window, int max_skips) {
    LossScaler s;
    s.enabled = true;
    s.scale = initial;
    s.window = window;
    s.max_consecutive_skips = max_skips;
    return s;
  }
  // Records whether this step's gradients were finite; returns true if the step should be applied.
  bool record(bool finite, int64_t step) {
    if (!enabled) return finite;
    if (!finite) {
      skipped++;
      clean = 0;
      scale = std::max(scale * 0.5f, 1e-30f);
      KILN_CHECK(++consecutive_skips < max_consecutive_skips, "loss scaling: gradients overflowed at ", consecutive_skips,
                 " steps in a row (up to step ", step, ", loss scale now ", scale,
                 "); the model overflows fp16 at any scale: train in bf16 or fp32");
      return false;
    }
    consecutive_skips = 0;
    if (++clean >= window) {
      clean = 0;
      scale = std::min(scale * 2.0f, 1e30f);
    }
    return true;
  }
};

}  // namespace kiln
