#include "nn/ffn.h"

namespace kiln::nn {

void FFNActivations::allocate(Workspace& ws, int64_t N, const FFNShape& s, bool selective) {
  up = ws.act(N * s.up());
  act = selective ? Act{} : ws.act(N * s.F);
}

void FFNScratch::allocate(Workspace& ws, int64_t N, const FFNShape& s, bool selective) {
  d_up = ws.act(N * s.up());
  if (s.gated) d_act = ws.act(N * s.F);
  if (selective) act_tmp = ws.act(N * s.F);
}

namespace {
void activate(Backend& be, Act out, Act up, const FFNShape& S, int64_t N) {
  if (S.gated)
    be.gated_forward(out, up, N, S.F, S.act);
  else
    be.activation_forward(out, up, N * S.F, S.act);
}
}  // namespace

void FeedForward::forward(Backend& be, float* y, const float* residual, Act x, FFNActivations& a, FFNScratch& s,
                          int64_t N) const {
  Act act = a.act ? a.act : s.act_tmp;
  be.linear_forward(a.up, x, up, N);
  activate(be, act, a.up, shape, N);
  if (!y) return;
  be.linear_residual(y, residual, act, down, N);
}

void FeedForward::backward(Backend& be, Act dx, Act dy, Act x, const FFNActivations& a, FFNScratch& s,
                           int64_t N) const {
  const FFNShape& S = shape;
  // Selective recomputation: the activation is rebuilt from the kept pre-activation; the same kernel on the same
  // input gives the same bits as the forward did.
  Act act = a.act;
  if (!act) {
    act = s.act_tmp;
    activate(be, act, a.up, S, N);
  }
  if (S.gated) {
    be.linear_backward(s.d_act, dy, act, down, N);
    be.gated_backward(s.d_up, a.up, s.d_act, N, S.F, S.act);
  } else {
    be.linear_backward(s.d_up, dy, act, down, N);
    be.activation_backward(s.d_up, a.up, s.d_up, N * S.F, S.act);
  }
  be.linear_backward(dx, s.d_up, x, up, N);
}

}  // namespace kiln::nn
