// Learning-rate schedules: constant, or linear warmup then cosine decay to a floor (as llm.c and
// nanoGPT do). step is 0-based; total is the number of optimizer steps in the run.
#pragma once
#include <cmath>
#include <string>

#include "core/error.h"

namespace kiln {

struct LrSchedule {
  enum Kind { Constant, Cosine } kind = Cosine;
  float lr = 6e-4f, min_lr = 0.0f;
  int warmup = 0;
  int total = 1;

  static Kind parse(const std::string& s) {
    if (s == "constant") return Constant;
    if (s == "cosine") return Cosine;
    fail("--lr-schedule: expected constant or cosine, got '", s, "'");
  }
  float at(int step) const {
    if (warmup > 0 && step < warmup) return lr * float(step + 1) / float(warmup);
    if (kind == Constant) return lr;
    if (total <= warmup) return lr;
    double ratio = double(step - warmup) / double(std::max(1, total - warmup));
    if (ratio > 1) ratio = 1;
    double coeff = 0.5 * (1.0 + std::cos(M_PI * ratio));
    return float(min_lr + coeff * (lr - min_lr));
  }
};

}  // namespace kiln
