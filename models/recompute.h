// Gradient checkpointing policies (--recompute):
//   none       keep every block's activations
//   block      keep only each block's input; recompute the block during the backward (= every:1)
//   every:K    keep every K-th block input; recompute each segment of K blocks during the backward
//   selective  keep everything but the cheap, large tensors (LayerNorm outputs, GELU output), which the
//              backward recomputes from what was kept
// Recomputation runs the same kernels on the same inputs, so gradients are bit-identical.
#pragma once
#include <string>

#include "core/error.h"

namespace kiln {

struct RecomputePolicy {
  enum Kind { None, Every, Selective } kind = None;
  int k = 1;  // Every: segment length

  static RecomputePolicy parse(const std::string& s) {
    RecomputePolicy p;
    if (s == "none") return p;
    if (s == "selective") { p.kind = Selective; return p; }
    if (s == "block") { p.kind = Every; p.k = 1; return p; }
    if (s.rfind("every:", 0) == 0) {
      std::string n = s.substr(6);
      KILN_CHECK(!n.empty() && n.find_first_not_of("0123456789") == std::string::npos && n.size() < 6,
                 "--recompute every:K needs a positive integer K (got '", n, "')");
      p.kind = Every;
      p.k = std::stoi(n);
      KILN_CHECK(p.k > 0, "--recompute every:K needs K >= 1 (got ", p.k, ")");
      return p;
    }
    fail("--recompute: expected none, block, every:K or selective (got '", s, "')");
  }
  std::string str() const {
    if (kind == None) return "none";
    if (kind == Selective) return "selective";
    return k == 1 ? "block" : "every:" + std::to_string(k);
  }
};

}  // namespace kiln
