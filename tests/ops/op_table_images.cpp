// The op table's cases for the image models' ops (see op_table.h): adaLN modulation and gated residuals
// (kernels/adaln.h). Each case runs ref:: (double), cpu:: and cuda:: (SIMT emulator or GPU) on the same inputs;
// gradient cases are also checked against finite differences of the ref:: forward.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/dtype.h"
#include "core/gpu.h"
#include "kernels/adaln.h"
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

}  // namespace

void add_image_ops(std::vector<OpCase>& t) {
  add_adaln(t);
  add_upsample(t);
}

}  // namespace kiln::ops
