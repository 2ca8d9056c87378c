// The probability-flow likelihood of infer/likelihood.h.
#include "infer/likelihood.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace kiln {

namespace {

bool sigma_levels(const Objective& o) { return o.kind == ObjectiveKind::VE || o.kind == ObjectiveKind::EDM; }

// The path ℓ(u) on u ∈ [u0, u1]: ℓ = u (flow, gvp) or ℓ = e^u (ve, edm).
struct Path {
  double u0 = 0, u1 = 1;
  bool log_sigma = false;
  double level(double u) const { return log_sigma ? std::exp(u) : u; }
};

Path path_of(const Objective& o, const LikelihoodOptions& opt) {
  Path p;
  if (sigma_levels(o)) {
    const bool ve = o.kind == ObjectiveKind::VE;
    const double lo = opt.level_min > 0 ? opt.level_min : (ve ? o.sigma_min : 0.002);
    const double hi = opt.level_max > 0 ? opt.level_max : (ve ? o.sigma_max : 80.0);
    p.log_sigma = true, p.u0 = std::log(lo), p.u1 = std::log(hi);
  } else {
    p.u0 = opt.level_min > 0 ? opt.level_min : 1e-3;
    p.u1 = opt.level_max > 0 ? opt.level_max : 1.0;
  }
  return p;
}

// The drift dx/du = α·x + β·F at level ℓ (see the header): a', s' are d a/dℓ, d s/dℓ; g = dℓ/du.
void drift_coefficients(const Objective& o, const Path& p, double u, double& alpha, double& beta) {
  const double l = p.level(u);
  const Coefficients k = o.at(l);
  double da = 0, ds = 1, g = 1;
  if (p.log_sigma) {
    g = l;  // dσ/d(ln σ)
  } else {
    da = k.tx, ds = k.te;  // flow, gvp: the velocity target is a'·x₀ + s'·ε
  }
  const double det = k.a * k.te - k.s * k.tx;
  alpha = g * (da * k.te - ds * k.tx) / det;
  beta = g * (ds * k.a - da * k.s) / det;
}

}  // namespace

void check_likelihood(const Objective& o, const LikelihoodOptions& opt, int64_t P) {
  KILN_CHECK(o.kind != ObjectiveKind::DDPM, "likelihood: the ddpm objective has discrete levels and no "
             "probability-flow ODE here; use a model trained with --objective edm, ve, flow or gvp");
  KILN_CHECK(opt.trace == "hutchinson" || opt.trace == "exact", "--trace '", opt.trace,
             "': expected hutchinson or exact");
  KILN_CHECK(opt.probe == "rademacher" || opt.probe == "gaussian", "--probe '", opt.probe,
             "': expected rademacher or gaussian");
  KILN_CHECK(opt.jacobian == "vjp" || opt.jacobian == "fd", "--jacobian '", opt.jacobian,
             "': expected vjp or fd");
  KILN_CHECK(opt.probes >= 1, "--probes ", opt.probes, ": must be positive");
  KILN_CHECK(opt.steps >= 1, "--steps ", opt.steps, ": must be positive");
  KILN_CHECK(opt.fd_step > 0 && opt.fd_step < 1, "--fd-step ", opt.fd_step, ": must be in (0, 1)");
  KILN_CHECK(opt.trace != "exact" || P <= 4096, "--trace exact: ", P, " dimensions need ", 2 * P + 1,
             " evaluations per stage (vjp: ", P, " backward passes); use --trace hutchinson");
  const Path p = path_of(o, opt);
  KILN_CHECK(p.u0 < p.u1, "--level-min must be below --level-max");
  if (!sigma_levels(o)) KILN_CHECK(p.u0 > 0 && p.u1 <= 1, "--level-min/--level-max: t must lie in (0, 1]");
}

LikelihoodResult log_likelihood(const Objective& o, const LikelihoodOptions& opt, const DiffusionNet& net,
                                const float* x_in, const int32_t* labels, int B, int64_t P,
                                const NoiseSource& noise, const DiffusionVJP& vjp) {
  check_likelihood(o, opt, P);
  const bool reverse = opt.jacobian == "vjp";
  KILN_CHECK(!reverse || vjp, "--jacobian vjp: this network provides no vector-Jacobian product; use --jacobian fd");
  KILN_CHECK(reverse || net, "--jacobian fd: no network to evaluate");
  const Path path = path_of(o, opt);
  const bool exact = opt.trace == "exact";
  const int K = exact ? int(P) : opt.probes;
  const int64_t n = int64_t(B) * P;

  // Probes z_k [K][B·P], drawn once (Hutchinson); the exact trace uses the basis vectors instead.
  std::vector<float> z;
  if (!exact) {
    z.resize(static_cast<size_t>(K) * n);
    noise(z.data(), int64_t(z.size()));
    if (opt.probe == "rademacher")
      for (float& v : z) v = v < 0 ? -1.0f : 1.0f;
  }
  // One call per stage. fd: F on [x | x + h·z_1 | x − h·z_1 | ...], (1 + 2K)·B samples. vjp: F and the VJPs
  // on [x | x | ...] with upstream gradients [z_1 | z_2 | ...] (exact: the basis vectors), K·B samples.
  const int64_t rows = int64_t(reverse ? K : 1 + 2 * K) * B;
  std::vector<float> in(size_t(rows * P)), F(size_t(rows * P)), V, Z;
  std::vector<int32_t> lab(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; r++) lab[size_t(r)] = labels[r % B];
  if (reverse) {
    V.resize(in.size());
    if (exact) {
      Z.assign(in.size(), 0.0f);
      for (int k = 0; k < K; k++)
        for (int b = 0; b < B; b++) Z[size_t((int64_t(k) * B + b) * P + k)] = 1.0f;
    } else {
      Z = z;  // [K][B·P]: the rows' order already
    }
  }

  LikelihoodResult res;
  // f(x, u) into fx [n] and div f into dv [B].
  auto stage = [&](const std::vector<double>& x, double u, std::vector<double>& fx, std::vector<double>& dv) {
    double alpha, beta;
    drift_coefficients(o, path, u, alpha, beta);
    if (reverse) {
      for (int k = 0; k < K; k++)
        for (int64_t j = 0; j < n; j++) in[size_t(k * n + j)] = float(x[size_t(j)]);
      vjp(F.data(), V.data(), in.data(), Z.data(), path.level(u), lab.data(), int(rows));
      res.nfe += K, res.vjps += K;
      for (int64_t j = 0; j < n; j++) fx[size_t(j)] = alpha * x[size_t(j)] + beta * F[size_t(j)];
      for (int b = 0; b < B; b++) {
        double tr = 0;
        for (int k = 0; k < K; k++) {
          const int64_t row = (int64_t(k) * B + b) * P;
          if (exact) {
            tr += V[size_t(row + k)];  // e_kᵀ·J·e_k
          } else {
            double q = 0;
            for (int64_t i = 0; i < P; i++) q += double(Z[size_t(row + i)]) * V[size_t(row + i)];
            tr += q;
          }
        }
        if (!exact) tr /= K;
        dv[size_t(b)] = alpha * double(P) + beta * tr;
      }
      return;
    }
    // The step in the scale of x at this level (√(a² + s²) for data of unit scale), so that the fp32 input
    // resolves it equally well at σ = 80 as at σ = 0.002.
    const Coefficients kl = o.at(path.level(u));
    const double h = opt.fd_step * std::sqrt(kl.a * kl.a + kl.s * kl.s);
    for (int64_t j = 0; j < n; j++) in[size_t(j)] = float(x[size_t(j)]);
    for (int k = 0; k < K; k++) {
      float* xp = in.data() + (1 + 2 * k) * n;
      float* xm = xp + n;
      for (int64_t j = 0; j < n; j++) {
        const double d = exact ? (j % P == k ? h : 0.0) : h * z[size_t(k * n + j)];
        xp[j] = float(x[size_t(j)] + d), xm[j] = float(x[size_t(j)] - d);
      }
    }
    net(F.data(), in.data(), path.level(u), lab.data(), int(rows));
    res.nfe += 1 + 2 * K;
    for (int64_t j = 0; j < n; j++) fx[size_t(j)] = alpha * x[size_t(j)] + beta * F[size_t(j)];
    for (int b = 0; b < B; b++) {
      double tr = 0;
      for (int k = 0; k < K; k++) {
        const float* Fp = F.data() + (1 + 2 * k) * n + int64_t(b) * P;
        const float* Fm = Fp + n;
        if (exact) {
          tr += (double(Fp[k]) - Fm[k]) / (2 * h);  // the (k, k) entry of ∂F/∂x
        } else {
          const float* zk = z.data() + k * n + int64_t(b) * P;
          double s = 0;
          for (int64_t i = 0; i < P; i++) s += double(zk[i]) * (double(Fp[i]) - Fm[i]);
          tr += s / (2 * h);
        }
      }
      if (!exact) tr /= K;
      dv[size_t(b)] = alpha * double(P) + beta * tr;
    }
  };

  // RK4 on the augmented state (x, ∫div f).
  std::vector<double> x(x_in, x_in + n), xs(static_cast<size_t>(n)), integral(static_cast<size_t>(B), 0.0);
  std::vector<double> f[4], d[4];
  for (int i = 0; i < 4; i++) f[i].resize(static_cast<size_t>(n)), d[i].resize(static_cast<size_t>(B));
  const double du = (path.u1 - path.u0) / opt.steps;
  for (int step = 0; step < opt.steps; step++) {
    const double u = path.u0 + step * du;
    stage(x, u, f[0], d[0]);
    for (int64_t j = 0; j < n; j++) xs[size_t(j)] = x[size_t(j)] + 0.5 * du * f[0][size_t(j)];
    stage(xs, u + 0.5 * du, f[1], d[1]);
    for (int64_t j = 0; j < n; j++) xs[size_t(j)] = x[size_t(j)] + 0.5 * du * f[1][size_t(j)];
    stage(xs, u + 0.5 * du, f[2], d[2]);
    for (int64_t j = 0; j < n; j++) xs[size_t(j)] = x[size_t(j)] + du * f[2][size_t(j)];
    stage(xs, u + du, f[3], d[3]);
    for (int64_t j = 0; j < n; j++)
      x[size_t(j)] += du / 6 * (f[0][size_t(j)] + 2 * f[1][size_t(j)] + 2 * f[2][size_t(j)] + f[3][size_t(j)]);
    for (int b = 0; b < B; b++)
      integral[size_t(b)] += du / 6 * (d[0][size_t(b)] + 2 * d[1][size_t(b)] + 2 * d[2][size_t(b)] + d[3][size_t(b)]);
  }
  // The prior N(0, s²·I) at the end of the path.
  const double s = o.at(path.level(path.u1)).s;
  for (int b = 0; b < B; b++) {
    double q = 0;
    for (int64_t i = 0; i < P; i++) q += x[size_t(b * P + i)] * x[size_t(b * P + i)];
    const double prior = -0.5 * double(P) * std::log(2 * M_PI * s * s) - 0.5 * q / (s * s);
    res.prior.push_back(prior);
    res.log_density.push_back(prior + integral[size_t(b)]);
  }
  return res;
}

DiffusionVJP denoiser_vjp(ImageModel& model, const Objective& o, int planned) {
  KILN_CHECK(model.provides(ImageTask::Denoise), "a ", model.type(), " model is not a denoiser: the likelihood "
             "needs one");
  return [&model, o, planned](float* F, float* v, const float* xt, const float* z, double level,
                              const int32_t* labels, int B) {
    const int64_t P = model.pixels();
    const Coefficients k = o.at(level);
    std::vector<float> in(size_t(planned) * P), cn(size_t(planned), float(k.c_noise));
    for (int b0 = 0; b0 < B; b0 += planned) {
      const int nb = std::min(planned, B - b0);
      for (int64_t j = 0; j < nb * P; j++) in[size_t(j)] = float(k.c_in * xt[b0 * P + j]);
      model.denoise(F + b0 * P, in.data(), cn.data(), labels + b0, nb);
      // F(x) = D(c_in·x): the chain rule's c_in on the input gradient.
      model.denoise_vjp(v + b0 * P, z + b0 * P);
      for (int64_t j = 0; j < nb * P; j++) v[b0 * P + j] = float(k.c_in * v[b0 * P + j]);
    }
  };
}

void dequantize(float* x, int64_t n, Rng& r, double scale) {
  for (int64_t i = 0; i < n; i++) x[i] = float(x[i] + (double(r.uniform()) - 0.5) / scale);
}

double bits_per_dim(double log_density, int64_t P, double scale) {
  return -log_density / (double(P) * std::log(2.0)) + std::log2(scale);
}

MeanSE mean_se(const std::vector<double>& v) {
  MeanSE m;
  if (v.empty()) return m;
  for (double x : v) m.mean += x / double(v.size());
  if (v.size() < 2) return m;
  double ss = 0;
  for (double x : v) ss += (x - m.mean) * (x - m.mean);
  m.se = std::sqrt(ss / double(v.size() - 1) / double(v.size()));
  return m;
}

std::vector<double> dataset_bits_per_dim(const Objective& o, const LikelihoodOptions& opt, const DiffusionNet& net,
                                         const float* images, const int32_t* labels, int64_t N, int64_t P,
                                         int batch, uint64_t seed, int* nfe, const DiffusionVJP& vjp) {
  KILN_CHECK(batch > 0, "--batch ", batch, ": must be positive");
  check_likelihood(o, opt, P);
  Rng r(seed);
  std::vector<double> bpd;
  for (int64_t i = 0; i < N; i += batch) {
    const int b = int(std::min<int64_t>(batch, N - i));
    std::vector<float> x(images + i * P, images + (i + b) * P);
    dequantize(x.data(), int64_t(x.size()), r);
    const LikelihoodResult res = log_likelihood(o, opt, net, x.data(), labels + i, b, P, rng_noise(r), vjp);
    for (double l : res.log_density) bpd.push_back(bits_per_dim(l, P));
    if (nfe) *nfe = res.nfe;  // the same for every batch
  }
  return bpd;
}

}  // namespace kiln
