// The op table's cases for the image models' ops (see op_table.h): adaLN modulation and gated residuals
// (kernels/adaln.h), upsampling and pixel (un)shuffle (kernels/upsample.h), the normalizing flow's actnorm,
// gather and coupling (kernels/flow.h). Each case runs ref:: (double), cpu:: and cuda:: (SIMT emulator or GPU) on the same inputs;
// gradient cases are also checked against finite differences of the ref:: forward.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/dtype.h"
#include "core/gpu.h"
#include "kernels/adaln.h"
#include "kernels/flow.h"
#include "kernels/upsample.h"
#include "tests/ops/op_table.h"

namespace kiln::ops {
namespace {

constexpr DType F32 = DType::F32, BF16 = DType::BF16;

// A device copy of a tensor in its storage type.
struct Dev {
  gpu::DeviceBuffer buf;
  size_t n;
  DType dt;
  Dev(size_t count, DType t) : buf(std::max<size_t>(count * (t == F32 ? 4 : 2), 4), "ops test"), n(count), dt(t) {}
  float* f() const { return buf.as<float>(); }
  uint16_t* h() const { return buf.as<uint16_t>(); }
};
Dev up(const std::vector<float>& v, DType dt) {
  Dev d(v.size(), dt);
  if (dt == F32) {
    gpu::copy_to_device(d.f(), v.data(), v.size() * 4);
  } else {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); i++) h[i] = f32_to_bf16(v[i]);
    gpu::copy_to_device(d.h(), h.data(), h.size() * 2);
  }
  return d;
}
Dev up(const Tensor& t) { return up(t.v, t.dt); }
Tensor down(const std::string& name, const Dev& d) {
  Tensor t{name, std::vector<float>(d.n), d.dt};
  if (d.dt == F32) {
    gpu::copy_to_host(t.v.data(), d.f(), d.n * 4);
  } else {
    std::vector<uint16_t> h(d.n);
    gpu::copy_to_host(h.data(), d.h(), d.n * 2);
    for (size_t i = 0; i < d.n; i++) t.v[i] = bf16_to_f32(h[i]);
  }
  return t;
}
void* stream() { return gpu::stream(); }

double dot(const std::vector<float>& a, const std::vector<float>& b, double* sq) {
  double s = 0;
  for (size_t i = 0; i < a.size(); i++) {
    s += double(a[i]) * b[i];
    *sq += std::pow(double(a[i]) * b[i], 2);
  }
  return s;
}

OpCase make(std::string op, std::string name, Mode mode, Tensors inputs) {
  OpCase c;
  c.op = std::move(op);
  c.name = std::move(name);
  c.mode = mode;
  c.inputs = std::move(inputs);
  return c;
}

// Calls f with the device pointer typed as its storage type.
template <class Fn>
void typed(const Dev& d, Fn&& f) {
  if (d.dt == F32)
    f(d.f());
  else
    f(d.h());
}

// ------------------------------------------------------------------------------------------------- adaLN

struct Shape {
  int B, T, C, ld;
};

void add_adaln(std::vector<OpCase>& t) {
  // 6 = DiT's six vectors per row (ld = 6C); one sample of many tokens; odd C; T = 1 (the final layer's rows).
  for (Shape s : {Shape{3, 16, 24, 6 * 24}, Shape{1, 49, 64, 2 * 64}, Shape{4, 7, 13, 13 * 3}, Shape{5, 1, 8, 8}}) {
    for (DType dt : {F32, BF16}) {
      const int B = s.B, T = s.T, C = s.C;
      const int64_t ld = s.ld, n = int64_t(B) * T * C;
      char nb[96];
      std::snprintf(nb, sizeof nb, "B%d T%d C%d ld%ld %s", B, T, C, long(ld), dtype_name(dt));
      const std::string name = nb;
      const uint64_t seed = uint64_t(B * 1000 + T * 10 + C);
      const Tensor tx{"x", randn(size_t(n), seed, 1.0f, dt), dt};
      const Tensor tshift{"shift", randn(size_t(B * ld), seed + 1, 0.5f, dt), dt};
      const Tensor tscale{"scale", randn(size_t(B * ld), seed + 2, 0.5f, dt), dt};
      const Tensor tres{"res", randn(size_t(n), seed + 3)};
      const Tensor tu{"u", randn(size_t(n), seed + 4)};
      const Tensor tgate{"gate", randn(size_t(B * ld), seed + 5, 1.0f, dt), dt};
      const double k_sum = 4 + std::sqrt(double(T));  // the sums over T

      // modulate
      OpFn mfwd = [=](const Tensors& in) {
        std::vector<float> out(static_cast<size_t>(n));
        ref::modulate_forward(out.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, T, C, ld);
        return Tensors{{"out", out, dt}};
      };
      {
        OpCase c = make("modulate", name, Mode::Forward, {tx, tshift, tscale});
        c.ref = mfwd;
        if (dt == F32)
          c.cpu = [=](const Tensors& in) {
            std::vector<float> out(static_cast<size_t>(n));
            cpu::modulate_forward(out.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, T, C, ld);
            return Tensors{{"out", out}};
          };
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), sh = up(in[1]), sc = up(in[2]), out(size_t(n), dt);
          if (dt == F32)
            cuda::modulate_forward(out.f(), x.f(), sh.f(), sc.f(), B, T, C, ld, stream());
          else
            cuda::modulate_forward(out.h(), x.h(), sh.h(), sc.h(), B, T, C, ld, stream());
          return Tensors{down("out", out)};
        };
        t.push_back(std::move(c));
      }
      {
        const Tensor tdout{"dout", randn(size_t(n), seed + 6, 1.0f, dt), dt};
        OpCase c = make("modulate", name, Mode::Gradient, {tx, tshift, tscale, tdout});
        auto host = [=](auto fn, const Tensors& in) {
          std::vector<float> dx(static_cast<size_t>(n)), dsh(static_cast<size_t>(B * ld)), dsc(static_cast<size_t>(B * ld));
          fn(dx.data(), dsh.data(), dsc.data(), in[3].v.data(), in[0].v.data(), in[2].v.data(), B, T, C, ld);
          return Tensors{{"dx", dx, dt}, {"dshift", dsh, dt}, {"dscale", dsc, dt}};
        };
        using Bwd = void (*)(float*, float*, float*, const float*, const float*, const float*, int, int, int, int64_t);
        const Bwd rb = ref::modulate_backward, cb = cpu::modulate_backward;
        c.ref = [=](const Tensors& in) { return host(rb, in); };
        if (dt == F32) c.cpu = [=](const Tensors& in) { return host(cb, in); };
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), sc = up(in[2]), dy = up(in[3]), dx(size_t(n), dt), dsh = up(std::vector<float>(B * ld), dt),
              dsc = up(std::vector<float>(B * ld), dt);
          if (dt == F32)
            cuda::modulate_backward(dx.f(), dsh.f(), dsc.f(), dy.f(), x.f(), sc.f(), B, T, C, ld, stream());
          else
            cuda::modulate_backward(dx.h(), dsh.h(), dsc.h(), dy.h(), x.h(), sc.h(), B, T, C, ld, stream());
          return Tensors{down("dx", dx), down("dshift", dsh), down("dscale", dsc)};
        };
        c.loss = [mfwd](const Tensors& in, double* sq) {
          *sq = 0;
          return dot(mfwd(in)[0].v, in[3].v, sq);
        };
        c.grads = {{0, 0}, {1, 1}, {2, 2}};
        c.k = k_sum;
        t.push_back(std::move(c));
      }

      // gate: the residual stream and the branch are fp32, the gate an activation.
      OpFn gfwd = [=](const Tensors& in) {
        std::vector<float> y(static_cast<size_t>(n));
        ref::gate_forward(y.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, T, C, ld);
        return Tensors{{"y", y}};
      };
      {
        OpCase c = make("gate", name, Mode::Forward, {tres, tu, tgate});
        c.ref = gfwd;
        if (dt == F32)
          c.cpu = [=](const Tensors& in) {
            std::vector<float> y(static_cast<size_t>(n));
            cpu::gate_forward(y.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, T, C, ld);
            return Tensors{{"y", y}};
          };
        c.cuda = [=](const Tensors& in) {
          Dev r = up(in[0]), u = up(in[1]), g = up(in[2]), y(size_t(n), F32);
          typed(g, [&](auto* gp) { cuda::gate_forward(y.f(), r.f(), u.f(), gp, B, T, C, ld, stream()); });
          return Tensors{down("y", y)};
        };
        t.push_back(std::move(c));
      }
      {
        const Tensor tdy{"dy", randn(size_t(n), seed + 7)};
        OpCase c = make("gate", name, Mode::Gradient, {tres, tu, tgate, tdy});
        auto host = [=](auto fn, const Tensors& in) {
          std::vector<float> du(static_cast<size_t>(n)), dg(static_cast<size_t>(B * ld));
          fn(du.data(), dg.data(), in[3].v.data(), in[1].v.data(), in[2].v.data(), B, T, C, ld);
          return Tensors{{"du", du, dt}, {"dgate", dg, dt}};
        };
        using Bwd = void (*)(float*, float*, const float*, const float*, const float*, int, int, int, int64_t);
        const Bwd rb = ref::gate_backward, cb = cpu::gate_backward;
        c.ref = [=](const Tensors& in) { return host(rb, in); };
        if (dt == F32) c.cpu = [=](const Tensors& in) { return host(cb, in); };
        c.cuda = [=](const Tensors& in) {
          Dev u = up(in[1]), g = up(in[2]), dy = up(in[3]), du(size_t(n), dt),
              dg = up(std::vector<float>(B * ld), dt);
          if (dt == F32)
            cuda::gate_backward(du.f(), dg.f(), dy.f(), u.f(), g.f(), B, T, C, ld, stream());
          else
            cuda::gate_backward(du.h(), dg.h(), dy.f(), u.f(), g.h(), B, T, C, ld, stream());
          return Tensors{down("du", du), down("dgate", dg)};
        };
        c.loss = [gfwd](const Tensors& in, double* sq) {
          *sq = 0;
          return dot(gfwd(in)[0].v, in[3].v, sq);
        };
        c.grads = {{0, 1}, {1, 2}};
        c.k = k_sum;
        t.push_back(std::move(c));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- upsampling

void add_upsample(std::vector<OpCase>& t) {
  struct U {
    int64_t planes;
    int H, W, s;
  };
  for (Upsample mode : {Upsample::Nearest, Upsample::Bilinear, Upsample::BilinearAligned})
    for (U u : {U{6, 5, 7, 2}, U{2, 4, 4, 3}, U{3, 1, 6, 2}, U{2, 2, 3, 4}}) {
      const int64_t planes = u.planes, n_in = planes * u.H * u.W, n_out = n_in * u.s * u.s;
      const int H = u.H, W = u.W, sc = u.s;
      char nb[96];
      std::snprintf(nb, sizeof nb, "%s planes%ld %dx%d s%d",
                    mode == Upsample::Nearest ? "nearest" : mode == Upsample::Bilinear ? "bilinear" : "bilinear_aligned",
                    long(planes), H, W, sc);
      const std::string name = nb;
      const Tensor tin{"in", randn(size_t(n_in), uint64_t(n_in + sc))};
      OpFn fwd = [=](const Tensors& in) {
        std::vector<float> out(static_cast<size_t>(n_out));
        ref::upsample_forward(out.data(), in[0].v.data(), planes, H, W, sc, mode);
        return Tensors{{"out", out}};
      };
      {
        OpCase c = make("upsample", name, Mode::Forward, {tin});
        c.exact = mode == Upsample::Nearest;  // copies
        c.ref = fwd;
        c.cpu = [=](const Tensors& in) {
          std::vector<float> out(static_cast<size_t>(n_out));
          cpu::upsample_forward(out.data(), in[0].v.data(), planes, H, W, sc, mode);
          return Tensors{{"out", out}};
        };
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), out(static_cast<size_t>(n_out), F32);
          cuda::upsample_forward(out.f(), x.f(), planes, H, W, sc, mode, stream());
          return Tensors{down("out", out)};
        };
        t.push_back(std::move(c));
      }
      {
        OpCase c = make("upsample", name, Mode::Gradient, {tin, {"dout", randn(size_t(n_out), uint64_t(n_out))}});
        auto host = [=](auto fn, const Tensors& in) {
          std::vector<float> din(static_cast<size_t>(n_in));
          fn(din.data(), in[1].v.data(), planes, H, W, sc, mode);
          return Tensors{{"din", din}};
        };
        using Bwd = void (*)(float*, const float*, int64_t, int, int, int, Upsample);
        const Bwd rb = ref::upsample_backward, cb = cpu::upsample_backward;
        c.ref = [=](const Tensors& in) { return host(rb, in); };
        c.cpu = [=](const Tensors& in) { return host(cb, in); };
        c.cuda = [=](const Tensors& in) {
          Dev dy = up(in[1]), dx(static_cast<size_t>(n_in), F32);
          cuda::upsample_backward(dx.f(), dy.f(), planes, H, W, sc, mode, stream());
          return Tensors{down("din", dx)};
        };
        c.loss = [fwd](const Tensors& in, double* sq) {
          *sq = 0;
          return dot(fwd(in)[0].v, in[1].v, sq);
        };
        c.grads = {{0, 0}};
        c.k = 4 + 2 * sc;  // sums of up to (2s)² terms
        t.push_back(std::move(c));
      }
    }
  // pixel shuffle: the unshuffle is its adjoint (the gradient case checks that by finite differences).
  struct S {
    int B, C, H, W, r;
  };
  for (S p : {S{2, 3, 4, 5, 2}, S{1, 2, 3, 3, 3}}) {
    const int B = p.B, C = p.C, H = p.H, W = p.W, r = p.r;
    const int64_t n = int64_t(B) * C * H * W * r * r;
    char nb[64];
    std::snprintf(nb, sizeof nb, "B%d C%d %dx%d r%d", B, C, H, W, r);
    const Tensor tin{"in", randn(size_t(n), uint64_t(n + r))};
    OpFn fwd = [=](const Tensors& in) {
      std::vector<float> out(static_cast<size_t>(n));
      ref::pixel_shuffle(out.data(), in[0].v.data(), B, C, H, W, r);
      return Tensors{{"out", out}};
    };
    {
      OpCase c = make("pixel_shuffle", nb, Mode::Forward, {tin});
      c.exact = true;
      c.ref = fwd;
      c.cpu = [=](const Tensors& in) {
        std::vector<float> out(static_cast<size_t>(n));
        cpu::pixel_shuffle(out.data(), in[0].v.data(), B, C, H, W, r);
        return Tensors{{"out", out}};
      };
      c.cuda = [=](const Tensors& in) {
        Dev x = up(in[0]), out(static_cast<size_t>(n), F32);
        cuda::pixel_shuffle(out.f(), x.f(), B, C, H, W, r, stream());
        return Tensors{down("out", out)};
      };
      t.push_back(std::move(c));
    }
    {
      OpCase c = make("pixel_shuffle", nb, Mode::Gradient, {tin, {"dout", randn(size_t(n), uint64_t(n))}});
      c.exact = true;
      c.ref = [=](const Tensors& in) {
        std::vector<float> d(static_cast<size_t>(n));
        ref::pixel_unshuffle(d.data(), in[1].v.data(), B, C, H, W, r);
        return Tensors{{"din", d}};
      };
      c.cpu = [=](const Tensors& in) {
        std::vector<float> d(static_cast<size_t>(n));
        cpu::pixel_unshuffle(d.data(), in[1].v.data(), B, C, H, W, r);
        return Tensors{{"din", d}};
      };
      c.cuda = [=](const Tensors& in) {
        Dev dy = up(in[1]), dx(static_cast<size_t>(n), F32);
        cuda::pixel_unshuffle(dx.f(), dy.f(), B, C, H, W, r, stream());
        return Tensors{down("din", dx)};
      };
      c.loss = [fwd](const Tensors& in, double* sq) {
        *sq = 0;
        return dot(fwd(in)[0].v, in[1].v, sq);
      };
      c.grads = {{0, 0}};
      t.push_back(std::move(c));
    }
  }
}


// ------------------------------------------------------------------------------------------ normalizing flows

std::vector<double> doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> floats(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// Device copies of an int32 index set and of double arrays.
gpu::DeviceBuffer up_ints(const std::vector<int32_t>& v) {
  gpu::DeviceBuffer b(std::max<size_t>(v.size(), 1) * 4, "ops test");
  gpu::copy_to_device(b.data(), v.data(), v.size() * 4);
  return b;
}
gpu::DeviceBuffer up_doubles(const std::vector<float>& v) {
  const std::vector<double> d = doubles(v);
  gpu::DeviceBuffer b(std::max<size_t>(d.size(), 1) * 8, "ops test");
  gpu::copy_to_device(b.data(), d.data(), d.size() * 8);
  return b;
}
Tensor down_doubles(const std::string& name, const gpu::DeviceBuffer& b, size_t n) {
  std::vector<double> d(n);
  gpu::copy_to_host(d.data(), b.data(), n * 8);
  return {name, floats(d)};
}

void add_actnorm(std::vector<OpCase>& t) {
  struct S {
    int B, C;
    int64_t HW;
  };
  for (S sh : {S{3, 2, 8}, S{2, 5, 7}, S{1, 1, 300}, S{4, 12, 1}}) {
    const int B = sh.B, C = sh.C;
    const int64_t HW = sh.HW, n = int64_t(B) * C * HW;
    char nb[64];
    std::snprintf(nb, sizeof nb, "B%d C%d HW%ld", B, C, long(HW));
    const uint64_t seed = uint64_t(n * 7 + C);
    const Tensor tx{"x", randn(size_t(n), seed, 1.5f)};
    const Tensor tlogs{"logs", randn(size_t(C), seed + 1, 0.5f)}, tbias{"bias", randn(size_t(C), seed + 2)};
    const Tensor tld{"logdet0", randn(size_t(B), seed + 3, 10.0f)};
    // y and the log-det, from x, logs, bias and the log-det accumulated so far.
    OpFn fwd = [=](const Tensors& in) {
      std::vector<float> y(static_cast<size_t>(n));
      std::vector<double> ld = doubles(in[3].v);
      ref::actnorm_forward(y.data(), ld.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, C, HW);
      return Tensors{{"y", y}, {"logdet", floats(ld)}};
    };
    {
      OpCase c = make("actnorm", nb, Mode::Forward, {tx, tlogs, tbias, tld});
      c.ref = fwd;
      c.cpu = [=](const Tensors& in) {
        std::vector<float> y(static_cast<size_t>(n));
        std::vector<double> ld = doubles(in[3].v);
        cpu::actnorm_forward(y.data(), ld.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, C, HW);
        return Tensors{{"y", y}, {"logdet", floats(ld)}};
      };
      c.cuda = [=](const Tensors& in) {
        Dev x = up(in[0]), lg = up(in[1]), bi = up(in[2]), y(size_t(n), F32);
        gpu::DeviceBuffer ld = up_doubles(in[3].v);
        cuda::actnorm_forward(y.f(), ld.as<double>(), x.f(), lg.f(), bi.f(), B, C, HW, stream());
        return Tensors{down("y", y), down_doubles("logdet", ld, size_t(B))};
      };
      t.push_back(std::move(c));
    }
    {
      // The loss Σ dy·y + Σ_b w_b·logdet_b.
      const Tensor tdy{"dy", randn(size_t(n), seed + 4)}, tw{"w", randn(size_t(B), seed + 5)};
      OpCase c = make("actnorm", nb, Mode::Gradient, {tx, tlogs, tbias, tdy, tw});
      auto host = [=](auto fn, const Tensors& in) {
        std::vector<float> dx(static_cast<size_t>(n)), dl(static_cast<size_t>(C)), db(static_cast<size_t>(C));
        double wsum = 0;
        for (float v : in[4].v) wsum += v;
        fn(dx.data(), dl.data(), db.data(), in[3].v.data(), in[0].v.data(), in[1].v.data(), wsum, B, C, HW);
        return Tensors{{"dx", dx}, {"dlogs", dl}, {"dbias", db}};
      };
      using Bwd = void (*)(float*, float*, float*, const float*, const float*, const float*, double, int, int, int64_t);
      const Bwd rb = ref::actnorm_backward, cb = cpu::actnorm_backward;
      c.ref = [=](const Tensors& in) { return host(rb, in); };
      c.cpu = [=](const Tensors& in) { return host(cb, in); };
      c.cuda = [=](const Tensors& in) {
        Dev x = up(in[0]), lg = up(in[1]), dy = up(in[3]), dx(size_t(n), F32), dl = up(std::vector<float>(C), F32),
            db = up(std::vector<float>(C), F32);
        double wsum = 0;
        for (float v : in[4].v) wsum += v;
        cuda::actnorm_backward(dx.f(), dl.f(), db.f(), dy.f(), x.f(), lg.f(), wsum, B, C, HW, stream());
        return Tensors{down("dx", dx), down("dlogs", dl), down("dbias", db)};
      };
      c.loss = [fwd](const Tensors& in, double* sq) {
        *sq = 0;
        const Tensors out = fwd({in[0], in[1], in[2], {"logdet0", std::vector<float>(in[4].v.size())}});
        return dot(out[0].v, in[3].v, sq) + dot(out[1].v, in[4].v, sq);
      };
      c.grads = {{0, 0}, {1, 1}, {2, 2}};
      c.k = 4 + std::sqrt(double(B * HW));  // sums over the channel's B·HW values
      t.push_back(std::move(c));
    }
    {
      OpCase c = make("actnorm_inverse", nb, Mode::Forward, {{"y", tx.v}, tlogs, tbias});
      c.ref = [=](const Tensors& in) {
        std::vector<float> x(static_cast<size_t>(n));
        ref::actnorm_inverse(x.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, C, HW);
        return Tensors{{"x", x}};
      };
      c.cpu = [=](const Tensors& in) {
        std::vector<float> x(static_cast<size_t>(n));
        cpu::actnorm_inverse(x.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), B, C, HW);
        return Tensors{{"x", x}};
      };
      c.cuda = [=](const Tensors& in) {
        Dev y = up(in[0]), lg = up(in[1]), bi = up(in[2]), x(size_t(n), F32);
        cuda::actnorm_inverse(x.f(), y.f(), lg.f(), bi.f(), B, C, HW, stream());
        return Tensors{down("x", x)};
      };
      t.push_back(std::move(c));
    }
    if (B * HW > 1) {
      // The data-dependent init, on values with a per-channel offset (the mean it removes).
      std::vector<float> xo = tx.v;
      for (int64_t e = 0; e < n; e++) xo[size_t(e)] += 0.5f * float(e / HW % C) - 1.0f;
      OpCase c = make("actnorm_init", nb, Mode::Forward, {{"x", xo}});
      auto host = [=](auto fn, const Tensors& in) {
        std::vector<float> lg(static_cast<size_t>(C)), bi(static_cast<size_t>(C));
        fn(lg.data(), bi.data(), in[0].v.data(), B, C, HW);
        return Tensors{{"logs", lg}, {"bias", bi}};
      };
      using Init = void (*)(float*, float*, const float*, int, int, int64_t);
      const Init ri = ref::actnorm_init, ci = cpu::actnorm_init;
      c.ref = [=](const Tensors& in) { return host(ri, in); };
      c.cpu = [=](const Tensors& in) { return host(ci, in); };
      c.cuda = [=](const Tensors& in) {
        Dev x = up(in[0]), lg(size_t(C), F32), bi(size_t(C), F32);
        cuda::actnorm_init(lg.f(), bi.f(), x.f(), B, C, HW, stream());
        return Tensors{down("logs", lg), down("bias", bi)};
      };
      c.k = 4 + std::sqrt(double(B * HW));
      t.push_back(std::move(c));
    }
  }
}

void add_coupling(std::vector<OpCase>& t) {
  // The index sets: a checkerboard of 1×4×4, the first half of 4×2×2's channels, a shuffled split of 13 values.
  struct S {
    const char* what;
    int B;
    std::vector<int32_t> A, T;
    int64_t n;
  };
  std::vector<S> sets;
  {
    S s{"checkerboard 1x4x4", 3, {}, {}, 16};
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) ((i + j) % 2 == 0 ? s.A : s.T).push_back(i * 4 + j);
    sets.push_back(s);
    S h{"channels 4x2x2", 2, {}, {}, 16};
    for (int k = 0; k < 16; k++) (k < 8 ? h.A : h.T).push_back(k);
    sets.push_back(h);
    S r{"shuffled n13", 4, {}, {}, 13};
    const int order[13] = {7, 2, 11, 0, 5, 12, 9, 3, 1, 10, 6, 8, 4};
    for (int k = 0; k < 13; k++) (k < 6 ? r.A : r.T).push_back(order[k]);
    sets.push_back(r);
  }
  for (const S& set : sets)
    for (bool additive : {false, true}) {
      FlowCoupling fc;
      fc.B = set.B, fc.n = set.n, fc.nA = int(set.A.size()), fc.nT = int(set.T.size()), fc.additive = additive;
      const std::vector<int32_t> A = set.A, T = set.T;
      FlowCoupling hc = fc;  // with the host's index arrays (set in each closure, whose copies own them)
      const int B = set.B, ow = fc.out_width(), nT = fc.nT, nA = fc.nA;
      const int64_t n = set.n;
      const std::string name = std::string(set.what) + (additive ? " additive" : " affine");
      const uint64_t seed = uint64_t(n * 31 + B + (additive ? 7 : 0));
      const Tensor tx{"x", randn(size_t(B * n), seed)}, to{"out", randn(size_t(B * ow), seed + 1, 0.8f)};
      const Tensor tscale{"scale", randn(size_t(nT), seed + 2, 0.5f)}, tld{"logdet0", randn(size_t(B), seed + 3, 5.0f)};
      // Inputs x, out, logdet0 (, scale: affine).
      auto host_c = [A, T, hc]() {
        FlowCoupling c = hc;
        c.A = A.data(), c.T = T.data();
        return c;
      };
      struct DevC {
        gpu::DeviceBuffer a, t;
        FlowCoupling c;
      };
      auto dev_c = [A, T, fc]() {
        DevC d{up_ints(A), up_ints(T), fc};
        d.c.A = d.a.as<int32_t>(), d.c.T = d.t.as<int32_t>();
        return d;
      };
      const float* none = nullptr;
      auto scale_of = [additive, none](const Tensors& in, size_t at) { return additive ? none : in[at].v.data(); };
      OpFn fwd = [=](const Tensors& in) {
        const FlowCoupling c = host_c();
        std::vector<float> y(static_cast<size_t>(B * n));
        std::vector<double> ld = doubles(in[2].v);
        ref::coupling_forward(y.data(), ld.data(), in[0].v.data(), in[1].v.data(), scale_of(in, 3), c);
        return Tensors{{"y", y}, {"logdet", floats(ld)}};
      };
      Tensors fin = {tx, to, tld};
      if (!additive) fin.push_back(tscale);
      {
        OpCase c = make("coupling", name, Mode::Forward, fin);
        c.ref = fwd;
        c.cpu = [=](const Tensors& in) {
          const FlowCoupling hcs = host_c();
          std::vector<float> y(static_cast<size_t>(B * n));
          std::vector<double> ld = doubles(in[2].v);
          cpu::coupling_forward(y.data(), ld.data(), in[0].v.data(), in[1].v.data(), scale_of(in, 3), hcs);
          return Tensors{{"y", y}, {"logdet", floats(ld)}};
        };
        c.cuda = [=](const Tensors& in) {
          const DevC d = dev_c();
          Dev x = up(in[0]), o = up(in[1]), sc = up(additive ? std::vector<float>(1) : in[3].v, F32),
              y(size_t(B * n), F32);
          gpu::DeviceBuffer ld = up_doubles(in[2].v);
          cuda::coupling_forward(y.f(), ld.as<double>(), x.f(), o.f(), additive ? nullptr : sc.f(), d.c, stream());
          return Tensors{down("y", y), down_doubles("logdet", ld, size_t(B))};
        };
        t.push_back(std::move(c));
      }
      for (DType dt : {F32, BF16}) {
        // The loss Σ dy·y + Σ_b w_b·logdet_b; dout in the MLP's type (bf16 on the device only).
        const Tensor tdy{"dy", randn(size_t(B * n), seed + 4)}, tw{"w", randn(size_t(B), seed + 5)};
        Tensors gin = {tx, to, tdy, tw};
        if (!additive) gin.push_back(tscale);
        OpCase c = make("coupling", name + " dout " + dtype_name(dt), Mode::Gradient, gin);
        auto host = [=](auto fn, const Tensors& in) {
          const FlowCoupling hcs = host_c();
          std::vector<float> dx(static_cast<size_t>(B * n)), dout(static_cast<size_t>(B * ow)),
              ds(static_cast<size_t>(nT));
          const std::vector<double> w = doubles(in[3].v);
          fn(dx.data(), dout.data(), ds.data(), in[2].v.data(), in[0].v.data(), in[1].v.data(), scale_of(in, 4),
             w.data(), hcs);
          Tensors r = {{"dx", dx}, {"dout", dout, dt}};
          if (!additive) r.push_back({"dscale", ds});
          return r;
        };
        using Bwd = void (*)(float*, float*, float*, const float*, const float*, const float*, const float*,
                             const double*, const FlowCoupling&);
        const Bwd rb = ref::coupling_backward, cb = cpu::coupling_backward;
        c.ref = [=](const Tensors& in) { return host(rb, in); };
        if (dt == F32) c.cpu = [=](const Tensors& in) { return host(cb, in); };
        c.cuda = [=](const Tensors& in) {
          const DevC d = dev_c();
          Dev x = up(in[0]), o = up(in[1]), dy = up(in[2]), sc = up(additive ? std::vector<float>(1) : in[4].v, F32),
              dx(size_t(B * n), F32), dout(size_t(B * ow), dt), ds = up(std::vector<float>(nT), F32);
          gpu::DeviceBuffer w = up_doubles(in[3].v);
          typed(dout, [&](auto* dp) {
            cuda::coupling_backward(dx.f(), dp, additive ? nullptr : ds.f(), dy.f(), x.f(), o.f(),
                                    additive ? nullptr : sc.f(), w.as<double>(), d.c, stream());
          });
          Tensors r = {down("dx", dx), down("dout", dout)};
          if (!additive) r.push_back(down("dscale", ds));
          return r;
        };
        c.loss = [fwd, additive](const Tensors& in, double* sq) {
          *sq = 0;
          Tensors f = {in[0], in[1], {"logdet0", std::vector<float>(in[3].v.size())}};
          if (!additive) f.push_back(in[4]);
          const Tensors out = fwd(f);
          return dot(out[0].v, in[2].v, sq) + dot(out[1].v, in[3].v, sq);
        };
        c.grads = {{0, 0}, {1, 1}};
        if (!additive) c.grads.push_back({2, 4});
        c.k = 4 + std::sqrt(double(B));  // dscale sums over the samples
        t.push_back(std::move(c));
      }
      {
        Tensors iin = {{"y", tx.v}, to};
        if (!additive) iin.push_back(tscale);
        OpCase c = make("coupling_inverse", name, Mode::Forward, iin);
        auto host = [=](auto fn, const Tensors& in) {
          const FlowCoupling hcs = host_c();
          std::vector<float> x(static_cast<size_t>(B * n));
          fn(x.data(), in[0].v.data(), in[1].v.data(), scale_of(in, 2), hcs);
          return Tensors{{"x", x}};
        };
        using Inv = void (*)(float*, const float*, const float*, const float*, const FlowCoupling&);
        const Inv ri = ref::coupling_inverse, ci = cpu::coupling_inverse;
        c.ref = [=](const Tensors& in) { return host(ri, in); };
        c.cpu = [=](const Tensors& in) { return host(ci, in); };
        c.cuda = [=](const Tensors& in) {
          const DevC d = dev_c();
          Dev y = up(in[0]), o = up(in[1]), sc = up(additive ? std::vector<float>(1) : in[2].v, F32),
              x(size_t(B * n), F32);
          cuda::coupling_inverse(x.f(), y.f(), o.f(), additive ? nullptr : sc.f(), d.c, stream());
          return Tensors{down("x", x)};
        };
        t.push_back(std::move(c));
      }
      if (additive) continue;
      // The gather (x_A into the MLP's input) and its backward (dx += dxa at A), fp32 and bf16 on the device.
      for (DType dt : {F32, BF16}) {
        const std::string gname = std::string(set.what) + " " + dtype_name(dt);
        OpFn gfwd = [=](const Tensors& in) {
          std::vector<float> xa(static_cast<size_t>(B * nA));
          ref::flow_gather(xa.data(), in[0].v.data(), host_c());
          return Tensors{{"xa", round_to(xa, dt), dt}};
        };
        {
          OpCase c = make("flow_gather", gname, Mode::Forward, {tx});
          c.exact = true;
          c.ref = gfwd;
          if (dt == F32)
            c.cpu = [=](const Tensors& in) {
              std::vector<float> xa(static_cast<size_t>(B * nA));
              cpu::flow_gather(xa.data(), in[0].v.data(), host_c());
              return Tensors{{"xa", xa}};
            };
          c.cuda = [=](const Tensors& in) {
            const DevC d = dev_c();
            Dev x = up(in[0]), xa(size_t(B * nA), dt);
            typed(xa, [&](auto* p) { cuda::flow_gather(p, x.f(), d.c, stream()); });
            return Tensors{down("xa", xa)};
          };
          t.push_back(std::move(c));
        }
        {
          const Tensor tdxa{"dxa", randn(size_t(B * nA), seed + 6, 1.0f, dt), dt};
          const Tensor tdx0{"dx0", randn(size_t(B * n), seed + 7)};
          OpCase c = make("flow_gather", gname, Mode::Gradient, {tx, tdxa, tdx0});
          auto host = [=](auto fn, const Tensors& in) {
            std::vector<float> dx = in[2].v;
            fn(dx.data(), in[1].v.data(), host_c());
            return Tensors{{"dx", dx}};
          };
          using Bwd = void (*)(float*, const float*, const FlowCoupling&);
          const Bwd rb = ref::flow_gather_backward, cb = cpu::flow_gather_backward;
          c.ref = [=](const Tensors& in) { return host(rb, in); };
          if (dt == F32) c.cpu = [=](const Tensors& in) { return host(cb, in); };
          c.cuda = [=](const Tensors& in) {
            const DevC d = dev_c();
            Dev dxa = up(in[1]), dx = up(in[2]);
            typed(dxa, [&](auto* p) { cuda::flow_gather_backward(dx.f(), p, d.c, stream()); });
            return Tensors{down("dx", dx)};
          };
          // Σ dxa·x_A, on the gathered values before their rounding to the MLP's type.
          c.loss = [=](const Tensors& in, double* sq) {
            *sq = 0;
            std::vector<float> xa(static_cast<size_t>(B * nA));
            ref::flow_gather(xa.data(), in[0].v.data(), host_c());
            return dot(xa, in[1].v, sq);
          };
          c.grads = {{0, 0, 2}};
          c.exact = true;  // one addition per value
          t.push_back(std::move(c));
        }
      }
    }
}

}  // namespace

void add_image_ops(std::vector<OpCase>& t) {
  add_adaln(t);
  add_upsample(t);
  add_actnorm(t);
  add_coupling(t);
}

}  // namespace kiln::ops
