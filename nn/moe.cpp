#include "nn/moe.h"

namespace kiln::nn {

void MoEActivations::allocate(Workspace& ws, int64_t N, const MoEShape& s, bool selective) {
  const int64_t R = N * s.K();
  scores = ws.f32(N * s.E());
  idx = ws.i32(N * s.K());
  w = ws.f32(N * s.K());
  offsets = ws.i32(s.E() + 1);
  row_token = ws.i32(R);
  slot = ws.i32(R);
  hs = ws.act(R * 2 * s.F);
  act = selective ? Act{} : ws.act(R * s.F);
  ys = ws.act(R * s.C);
  if (s.shared_F) shared.allocate(ws, N, s.shared(), selective);
  aux_f = ws.f32(N * s.E());
}

void MoEScratch::allocate(Workspace& ws, int64_t N, const MoEShape& s, bool selective) {
  const int64_t R = N * s.K();
  logits = ws.f32(N * s.E());
  d_w = ws.f32(N * s.K());
  xs = ws.act(R * s.C);
  d_ys = ws.act(R * s.C);
  d_act = ws.act(R * s.F);
  d_hs = ws.act(R * 2 * s.F);
  if (selective) act_tmp = ws.act(R * s.F);
  if (s.shared_F) {
    d_tmp = ws.act(N * s.C);
    shared.allocate(ws, N, s.shared(), selective);
  }
}

void MoE::forward(Backend& be, float* y, const float* residual, Act x, MoEActivations& a, MoEScratch& s,
                  int64_t N) const {
  const MoEShape& S = shape;
  const int E = S.E(), K = S.K(), C = S.C, F = S.F;
  const int64_t R = N * K;
  // Route in fp32, then sort the choices into per-expert rows.
  be.linear_forward(Act{s.logits, DType::F32}, x, router, N);
  be.moe_route(a.scores, a.idx, a.w, s.logits, bias, N, S.routing);
  be.moe_dispatch(a.offsets, a.row_token, a.slot, a.idx, N, K, E);
  a.aux_loss = aux.on() ? be.moe_seq_aux(a.aux_f, a.scores, a.idx, aux.starts, aux.S, S.routing, aux.alpha) : 0.0;
  be.moe_gather(s.xs, x, a.row_token, R, C);
  // The experts: [gate | up] rows of 2F, SwiGLU, down.
  be.grouped_linear_forward(a.hs, 2 * F, s.xs, gate, a.offsets, E, C, F);
  be.grouped_linear_forward(a.hs.at(F), 2 * F, s.xs, up, a.offsets, E, C, F);
  Act act = a.act ? a.act : s.act_tmp;
  be.gated_forward(act, a.hs, R, F, Activation::Silu);
  be.grouped_linear_forward(a.ys, C, act, down, a.offsets, E, F, C);
  // The shared experts first (y = residual + Shared(x)), then the routed rows are added into y.
  if (S.shared_F) {
    shared.forward(be, y, residual, x, a.shared, s.shared, N);
    residual = y;
  }
  if (y) be.moe_combine(y, residual, a.ys, a.slot, a.w, N, K, C);
}

void MoE::backward(Backend& be, Act dx, Act dy, Act x, const MoEActivations& a, MoEScratch& s, int64_t N) const {
  const MoEShape& S = shape;
  const int E = S.E(), K = S.K(), C = S.C, F = S.F;
  const int64_t R = N * K;
  Act act = a.act;
  if (!act) {
    act = s.act_tmp;
    be.gated_forward(act, a.hs, R, F, Activation::Silu);
  }
  // Combine: the rows' gradients and the gate weights' gradients.
  be.moe_combine_backward(s.d_ys, s.d_w, dy, a.ys, a.slot, a.w, N, K, C);
  // Experts, down then SwiGLU then gate and up (both into the gathered inputs' gradient).
  be.grouped_linear_backward(s.d_act, 0.0f, ddown, s.d_ys, C, act, down, a.offsets, E, F, C);
  be.gated_backward(s.d_hs, a.hs, s.d_act, R, F, Activation::Silu);
  be.moe_gather(s.xs, x, a.row_token, R, C);  // the gathered inputs again (the scratch was reused)
  be.grouped_linear_backward(s.d_ys, 0.0f, dgate, s.d_hs, 2 * F, s.xs, gate, a.offsets, E, C, F);
  be.grouped_linear_backward(s.d_ys, 1.0f, dup, s.d_hs.at(F), 2 * F, s.xs, up, a.offsets, E, C, F);
  // Router: dL/dw -> dL/du -> dx (overwritten), then the shared experts' and the rows' shares are added.
  be.moe_route_backward(s.logits, s.d_w, a.scores, a.idx, N, S.routing);
  if (aux.on()) be.moe_seq_aux_backward(s.logits, a.aux_f, a.scores, aux.starts, aux.S, S.routing, aux.alpha * aux.scale);
  be.linear_backward(dx, Act{s.logits, DType::F32}, x, router, N);
  if (S.shared_F) shared.backward(be, s.d_tmp, dy, x, a.shared, s.shared, N);
  be.moe_gather_backward(dx, S.shared_F ? s.d_tmp : Act{}, s.d_ys, a.slot, N, K, C);
}

void moe_bias_update(float* bias, const float* load, int E, float gamma) {
  double mean = 0;
  for (int e = 0; e < E; e++) mean += load[e];
  mean /= E;
  for (int e = 0; e < E; e++) bias[e] += gamma * float((mean > load[e]) - (mean < load[e]));
}

}  // namespace kiln::nn
