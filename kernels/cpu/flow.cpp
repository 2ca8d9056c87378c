// The flow's elementwise layers on the CPU (kernels/flow.h): threads over samples or channels, each reduction
// summed in one thread in a fixed order (the same arithmetic as the sequential loops, so results do not depend
// on the thread count).
#include <algorithm>
#include <cmath>

#include "kernels/flow.h"

namespace kiln::cpu {

namespace {
constexpr int64_t kParallel = 16384;  // values below which threads cost more than they save
}

void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                     int64_t HW) {
  double ld = 0;
  for (int c = 0; c < C; c++) ld += double(logs[c]) * HW;
  const int64_t n = C * HW;
  if (logdet)
    for (int b = 0; b < B; b++) logdet[b] += ld;
#pragma omp parallel for collapse(2) schedule(static) if (B * n > kParallel)
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++) {
      const float e = std::exp(logs[c]);
      for (int64_t i = 0; i < HW; i++) y[b * n + c * HW + i] = x[b * n + c * HW + i] * e + bias[c];
    }
}

void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                      double wsum, int B, int C, int64_t HW) {
  const int64_t n = C * HW;
#pragma omp parallel for schedule(static) if (B * n > kParallel)
  for (int c = 0; c < C; c++) {
    const float e = std::exp(logs[c]);
    double gl = wsum * double(HW), gb = 0;
    for (int b = 0; b < B; b++)
      for (int64_t i = 0; i < HW; i++) {
        const int64_t at = b * n + c * HW + i;
        dx[at] = dy[at] * e;
        gl += double(dy[at]) * x[at] * e, gb += dy[at];
      }
    dlogs[c] += float(gl), dbias[c] += float(gb);
  }
}

void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW) {
  const int64_t n = C * HW;
#pragma omp parallel for collapse(2) schedule(static) if (B * n > kParallel)
  for (int b = 0; b < B; b++)
    for (int c = 0; c < C; c++) {
      const float e = std::exp(-logs[c]);
      for (int64_t i = 0; i < HW; i++) x[b * n + c * HW + i] = (y[b * n + c * HW + i] - bias[c]) * e;
    }
}

void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW) {
  const int64_t n = C * HW;
#pragma omp parallel for schedule(static) if (B * n > kParallel)
  for (int c = 0; c < C; c++) {
    double s = 0, ss = 0;
    for (int b = 0; b < B; b++)
      for (int64_t i = 0; i < HW; i++) {
        const double v = x[b * n + c * HW + i];
        s += v, ss += v * v;
      }
    const double cnt = double(B) * HW, mean = s / cnt, var = std::max(0.0, ss / cnt - mean * mean);
    const double sd = std::sqrt(var + 1e-6);
    logs[c] = float(-std::log(sd)), bias[c] = float(-mean / sd);
  }
}

void flow_gather(float* xa, const float* x, const FlowCoupling& c) {
#pragma omp parallel for schedule(static) if (int64_t(c.B) * c.nA > kParallel)
  for (int b = 0; b < c.B; b++)
    for (int i = 0; i < c.nA; i++) xa[int64_t(b) * c.nA + i] = x[b * c.n + c.A[i]];
}

void flow_gather_backward(float* dx, const float* dxa, const FlowCoupling& c) {
#pragma omp parallel for schedule(static) if (int64_t(c.B) * c.nA > kParallel)
  for (int b = 0; b < c.B; b++)
    for (int i = 0; i < c.nA; i++) dx[b * c.n + c.A[i]] += dxa[int64_t(b) * c.nA + i];
}

void coupling_forward(float* y, double* logdet, const float* x, const float* o, const float* scale,
                      const FlowCoupling& c) {
  const int nT = c.nT, ow = c.out_width();
#pragma omp parallel for schedule(static) if (c.B * c.n > kParallel)
  for (int b = 0; b < c.B; b++) {
    const int64_t base = b * c.n;
    const float* ob = o + int64_t(b) * ow;
    for (int i = 0; i < c.nA; i++) y[base + c.A[i]] = x[base + c.A[i]];
    double ld = 0;
    for (int j = 0; j < nT; j++) {
      const int64_t at = base + c.T[j];
      if (c.additive) {
        y[at] = x[at] + ob[j];
      } else {
        const double s = std::exp(double(scale[j])) * std::tanh(double(ob[j]));
        y[at] = float(x[at] * std::exp(s) + ob[nT + j]);
        ld += s;
      }
    }
    logdet[b] += ld;
  }
}

void coupling_backward(float* dx, float* dout, float* dscale, const float* dy, const float* x, const float* o,
                       const float* scale, const double* w, const FlowCoupling& c) {
  const int nT = c.nT, ow = c.out_width();
#pragma omp parallel for schedule(static) if (int64_t(c.B) * c.nA > kParallel)
  for (int b = 0; b < c.B; b++)
    for (int i = 0; i < c.nA; i++) dx[b * c.n + c.A[i]] = dy[b * c.n + c.A[i]];  // y_A = x_A
  // One thread per j walks the samples in order: dscale's sum over b is sequential.
#pragma omp parallel for schedule(static) if (int64_t(c.B) * nT > kParallel)
  for (int j = 0; j < nT; j++) {
    double g = 0;
    for (int b = 0; b < c.B; b++) {
      const int64_t at = b * c.n + c.T[j];
      float* db = dout + int64_t(b) * ow;
      if (c.additive) {
        dx[at] = dy[at], db[j] = dy[at];  // dt
        continue;
      }
      const double es = std::exp(double(scale[j])), th = std::tanh(double(o[int64_t(b) * ow + j]));
      const double s = es * th, e = std::exp(s);
      const double ds = double(dy[at]) * x[at] * e + w[b];
      dx[at] = float(dy[at] * e);
      g += ds * s;  // ∂s/∂scale = s
      db[j] = float(ds * es * (1 - th * th));
      db[nT + j] = dy[at];
    }
    if (!c.additive) dscale[j] += float(g);
  }
}

void coupling_inverse(float* x, const float* y, const float* o, const float* scale, const FlowCoupling& c) {
  const int nT = c.nT, ow = c.out_width();
#pragma omp parallel for schedule(static) if (c.B * c.n > kParallel)
  for (int b = 0; b < c.B; b++) {
    const int64_t base = b * c.n;
    const float* ob = o + int64_t(b) * ow;
    for (int i = 0; i < c.nA; i++) x[base + c.A[i]] = y[base + c.A[i]];
    for (int j = 0; j < nT; j++) {
      const int64_t at = base + c.T[j];
      if (c.additive) {
        x[at] = y[at] - ob[j];
      } else {
        const double s = std::exp(double(scale[j])) * std::tanh(double(ob[j]));
        x[at] = float((y[at] - ob[nT + j]) * std::exp(-s));
      }
    }
  }
}

}  // namespace kiln::cpu
