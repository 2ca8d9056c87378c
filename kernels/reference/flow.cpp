// Naive flow layers (kernels/flow.h): every value in double from the definitions, sums in double, the actnorm
// init's variance in two passes.
#include <cmath>
#include <vector>

#include "kernels/flow.h"

namespace kiln::ref {

void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                     int64_t HW) {
  double sum_logs = 0;
  for (int c = 0; c < C; c++) sum_logs += logs[c];
  for (int b = 0; b < B; b++) {
    if (logdet) logdet[b] += double(HW) * sum_logs;
    for (int c = 0; c < C; c++)
      for (int64_t i = 0; i < HW; i++) {
        const int64_t at = (int64_t(b) * C + c) * HW + i;
        y[at] = float(double(x[at]) * std::exp(double(logs[c])) + double(bias[c]));
      }
  }
}

void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                      double wsum, int B, int C, int64_t HW) {
  for (int c = 0; c < C; c++) {
    const double e = std::exp(double(logs[c]));
    double gl = 0, gb = 0;
    for (int b = 0; b < B; b++)
      for (int64_t i = 0; i < HW; i++) {
        const int64_t at = (int64_t(b) * C + c) * HW + i;
        dx[at] = float(double(dy[at]) * e);
        gl += double(dy[at]) * double(x[at]) * e;  // ∂y/∂logs = x·e^{logs}
        gb += double(dy[at]);
      }
    gl += wsum * double(HW);  // the log-det HW·logs_c in each sample, weighted
    dlogs[c] = float(double(dlogs[c]) + gl), dbias[c] = float(double(dbias[c]) + gb);
  }
}

void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW) {
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++)
      for (int64_t i = 0; i < HW; i++) {
        const int64_t at = (int64_t(b) * C + c) * HW + i;
        x[at] = float((double(y[at]) - double(bias[c])) / std::exp(double(logs[c])));
      }
}

void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW) {
  const double cnt = double(B) * double(HW);
  for (int c = 0; c < C; c++) {
    double mean = 0;
    for (int b = 0; b < B; b++)
      for (int64_t i = 0; i < HW; i++) mean += x[(int64_t(b) * C + c) * HW + i];
    mean /= cnt;
    double var = 0;
    for (int b = 0; b < B; b++)
      for (int64_t i = 0; i < HW; i++) var += std::pow(double(x[(int64_t(b) * C + c) * HW + i]) - mean, 2);
    var /= cnt;
    const double sd = std::sqrt(var + 1e-6);
    logs[c] = float(-std::log(sd)), bias[c] = float(-mean / sd);
  }
}

void flow_gather(float* xa, const float* x, const FlowCoupling& c) {
  for (int b = 0; b < c.B; b++)
    for (int i = 0; i < c.nA; i++) xa[int64_t(b) * c.nA + i] = x[int64_t(b) * c.n + c.A[i]];
}

void flow_gather_backward(float* dx, const float* dxa, const FlowCoupling& c) {
  for (int b = 0; b < c.B; b++)
    for (int i = 0; i < c.nA; i++) {
      float& d = dx[int64_t(b) * c.n + c.A[i]];
      d = float(double(d) + double(dxa[int64_t(b) * c.nA + i]));
    }
}

namespace {
// s_j of sample b (0 when additive) and the shift t_j.
double log_scale(const float* ob, const float* scale, int j, const FlowCoupling& c) {
  return c.additive ? 0.0 : std::exp(double(scale[j])) * std::tanh(double(ob[j]));
}
double shift(const float* ob, int j, const FlowCoupling& c) { return ob[c.additive ? j : c.nT + j]; }
}  // namespace

void coupling_forward(float* y, double* logdet, const float* x, const float* o, const float* scale,
                      const FlowCoupling& c) {
  const int ow = c.out_width();
  for (int b = 0; b < c.B; b++) {
    const float* xb = x + int64_t(b) * c.n;
    float* yb = y + int64_t(b) * c.n;
    const float* ob = o + int64_t(b) * ow;
    for (int i = 0; i < c.nA; i++) yb[c.A[i]] = xb[c.A[i]];
    double ld = 0;
    for (int j = 0; j < c.nT; j++) {
      const double s = log_scale(ob, scale, j, c);
      yb[c.T[j]] = float(double(xb[c.T[j]]) * std::exp(s) + shift(ob, j, c));
      ld += s;
    }
    logdet[b] += ld;
  }
}

void coupling_backward(float* dx, float* dout, float* dscale, const float* dy, const float* x, const float* o,
                       const float* scale, const double* w, const FlowCoupling& c) {
  const int ow = c.out_width();
  std::vector<double> gs(size_t(c.nT), 0.0);
  for (int b = 0; b < c.B; b++) {
    const float* xb = x + int64_t(b) * c.n;
    const float* dyb = dy + int64_t(b) * c.n;
    float* dxb = dx + int64_t(b) * c.n;
    const float* ob = o + int64_t(b) * ow;
    float* db = dout + int64_t(b) * ow;
    for (int i = 0; i < c.nA; i++) dxb[c.A[i]] = dyb[c.A[i]];
    for (int j = 0; j < c.nT; j++) {
      const double g = dyb[c.T[j]], s = log_scale(ob, scale, j, c);
      dxb[c.T[j]] = float(g * std::exp(s));
      db[c.additive ? j : c.nT + j] = float(g);  // ∂y/∂t = 1
      if (c.additive) continue;
      // L depends on s through y (x·e^{s}) and the log-det (w_b·s).
      const double dl_ds = g * double(xb[c.T[j]]) * std::exp(s) + w[b];
      const double t = std::tanh(double(ob[j])), es = std::exp(double(scale[j]));
      db[j] = float(dl_ds * es * (1.0 - t * t));  // s = e^{scale}·tanh(s̃)
      gs[size_t(j)] += dl_ds * es * t;            // ∂s/∂scale = e^{scale}·tanh(s̃)
    }
  }
  if (!c.additive)
    for (int j = 0; j < c.nT; j++) dscale[j] = float(double(dscale[j]) + gs[size_t(j)]);
}

void coupling_inverse(float* x, const float* y, const float* o, const float* scale, const FlowCoupling& c) {
  const int ow = c.out_width();
  for (int b = 0; b < c.B; b++) {
    const float* yb = y + int64_t(b) * c.n;
    float* xb = x + int64_t(b) * c.n;
    const float* ob = o + int64_t(b) * ow;
    for (int i = 0; i < c.nA; i++) xb[c.A[i]] = yb[c.A[i]];
    for (int j = 0; j < c.nT; j++)
      xb[c.T[j]] = float((double(yb[c.T[j]]) - shift(ob, j, c)) / std::exp(log_scale(ob, scale, j, c)));
  }
}

}  // namespace kiln::ref
