// The mixture-of-experts ops' cases (kernels/moe.h): routing (softmax and sigmoid affinities, a selection
// bias, group-limited routing, normalised and scaled gates) forward and backward, the counting-sort dispatch,
// gather, combine and the grouped products, on the CPU against the reference; the reference's backwards
// against finite differences. Routing inputs keep the top-k choices well separated, so neither the
// yardstick's input roundings nor the finite-difference steps change which experts are chosen.
#include <cmath>
#include <cstdio>
#include <tuple>

#include "core/dtype.h"
#include "core/gpu.h"
#include "core/rng.h"
#include "kernels/moe.h"
#include "tests/ops/op_table.h"

namespace kiln::ops {
namespace {

std::string fmt(const char* f, auto... args) {
  char b[200];
  std::snprintf(b, sizeof b, f, args...);
  return b;
}

OpCase make(std::string op, std::string name, Mode mode, Tensors inputs) {
  OpCase c;
  c.op = std::move(op);
  c.name = std::move(name);
  c.mode = mode;
  c.inputs = std::move(inputs);
  return c;
}

double dot(const std::vector<float>& a, const std::vector<float>& b, double* sq) {
  double s = 0;
  for (size_t i = 0; i < a.size(); i++) {
    s += double(a[i]) * b[i];
    *sq += std::pow(double(a[i]) * b[i], 2);
  }
  return s;
}

// Σ out_j · weights over several (output, weight-input) pairs of the reference forward.
std::function<double(const Tensors&, double*)> dot_loss(OpFn fwd, std::vector<std::pair<int, int>> pairs) {
  return [fwd, pairs](const Tensors& in, double* sq) {
    *sq = 0;
    const Tensors out = fwd(in);
    double s = 0;
    for (auto [o, w] : pairs) s += dot(out[size_t(o)].v, in[size_t(w)].v, sq);
    return s;
  };
}


// Device copies for the cuda:: cases: fp32 or bf16 (each element rounded to bf16 as it goes up) or int32.
struct DevBuf {
  gpu::DeviceBuffer buf;
  size_t n;
  bool bf16;
  DevBuf(size_t count, bool half) : buf(std::max<size_t>(count * (half ? 2 : 4), 4), "moe ops test"), n(count), bf16(half) {}
  float* f() const { return buf.as<float>(); }
  uint16_t* h() const { return buf.as<uint16_t>(); }
  int32_t* i() const { return buf.as<int32_t>(); }
};
DevBuf upf(const std::vector<float>& v, bool half = false) {
  DevBuf d(v.size(), half);
  if (half) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); i++) h[i] = f32_to_bf16(v[i]);
    gpu::copy_to_device(d.buf.data(), h.data(), h.size() * 2);
  } else {
    gpu::copy_to_device(d.buf.data(), v.data(), v.size() * 4);
  }
  gpu::synchronize();
  return d;
}
DevBuf upi(const std::vector<int32_t>& v) {
  DevBuf d(v.size(), false);
  gpu::copy_to_device(d.buf.data(), v.data(), v.size() * 4);
  gpu::synchronize();
  return d;
}
std::vector<float> downf(const DevBuf& d) {
  std::vector<float> v(d.n);
  if (d.bf16) {
    std::vector<uint16_t> h(d.n);
    gpu::copy_to_host(h.data(), d.buf.data(), d.n * 2);
    for (size_t i = 0; i < d.n; i++) v[i] = bf16_to_f32(h[i]);
  } else {
    gpu::copy_to_host(v.data(), d.buf.data(), d.n * 4);
  }
  return v;
}
std::vector<int32_t> downi(const DevBuf& d) {
  std::vector<int32_t> v(d.n);
  gpu::copy_to_host(v.data(), d.buf.data(), d.n * 4);
  return v;
}
void* stream() { return gpu::stream(); }

std::vector<float> as_float(const std::vector<int32_t>& v) { return {v.begin(), v.end()}; }

// Random expert choices [N, K], distinct per token; expert `cold` never chosen (an empty batch).
std::vector<int32_t> random_choices(int64_t N, int K, int E, int cold, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> idx(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; n++)
    for (int k = 0; k < K; k++) {
      int32_t e;
      bool dup;
      do {
        e = int32_t(r.next_u64() % uint64_t(E));
        dup = e == cold;
        for (int j = 0; j < k; j++) dup |= idx[size_t(n * K + j)] == e;
      } while (dup);
      idx[size_t(n * K + k)] = e;
    }
  return idx;
}

void add_route(std::vector<OpCase>& t) {
  struct R {
    int64_t N;
    int E, K, G, TG;
    bool sigmoid, norm, bias;
    float scale;
  };
  for (R s : {R{37, 8, 2, 1, 1, false, true, false, 1.0f}, R{21, 16, 4, 1, 1, false, false, false, 1.0f},
              R{29, 16, 3, 4, 2, true, true, true, 2.5f}, R{70, 64, 6, 8, 3, true, true, true, 1.5f},
              R{13, 12, 2, 1, 1, true, false, true, 1.0f}}) {
    MoeRouting r;
    r.E = s.E, r.K = s.K, r.groups = s.G, r.topk_groups = s.TG, r.sigmoid = s.sigmoid, r.norm_topk = s.norm;
    r.scale = s.scale;
    const int64_t N = s.N;
    const int E = s.E, K = s.K;
    const bool has_bias = s.bias;
    const std::string name = fmt("N%ld E%d K%d G%d/%d %s%s%s scale %.1f", long(N), E, K, s.G, s.TG,
                                 s.sigmoid ? "sigmoid" : "softmax", s.norm ? " norm" : "", s.bias ? " bias" : "",
                                 double(s.scale));
    Rng rng(71 + uint64_t(E) * 7 + uint64_t(N));
    // A bias that reorders the choices.
    std::vector<float> bias(static_cast<size_t>(E), 0.0f);
    if (has_bias)
      for (int e = 0; e < E; e++) bias[size_t(e)] = 0.05f * rng.normal();
    // Random logits, each token's drawn again until its choices survive perturbations several times larger
    // than the finite-difference steps: clear margins between chosen and unchosen experts and groups.
    std::vector<float> logits(static_cast<size_t>(N * E));
    for (int64_t n = 0; n < N; n++) {
      float* u = logits.data() + n * E;
      for (bool stable = false; !stable;) {
        for (int e = 0; e < E; e++) u[e] = rng.normal();
        std::vector<float> sc(static_cast<size_t>(E)), w(static_cast<size_t>(K)), up(static_cast<size_t>(E));
        std::vector<int32_t> id0(static_cast<size_t>(K)), id(static_cast<size_t>(K));
        ref::moe_route(sc.data(), id0.data(), w.data(), u, has_bias ? bias.data() : nullptr, 1, r);
        stable = true;
        for (int trial = 0; trial < 6 && stable; trial++) {
          for (int e = 0; e < E; e++) up[size_t(e)] = u[e] + 0.02f * rng.normal();
          ref::moe_route(sc.data(), id.data(), w.data(), up.data(), has_bias ? bias.data() : nullptr, 1, r);
          stable = id == id0;
        }
      }
    }
    OpFn fwd = [=](const Tensors& in) {
      std::vector<float> scores(static_cast<size_t>(N * E)), w(static_cast<size_t>(N * K));
      std::vector<int32_t> idx(static_cast<size_t>(N * K));
      ref::moe_route(scores.data(), idx.data(), w.data(), in[0].v.data(), has_bias ? bias.data() : nullptr, N, r);
      return Tensors{{"scores", scores}, {"w", w}, {"idx", as_float(idx)}};
    };
    {
      OpCase c = make("moe_route", name, Mode::Forward, {{"logits", logits}});
      c.ref = fwd;
      c.cpu = [=](const Tensors& in) {
        std::vector<float> scores(static_cast<size_t>(N * E)), w(static_cast<size_t>(N * K));
        std::vector<int32_t> idx(static_cast<size_t>(N * K));
        cpu::moe_route(scores.data(), idx.data(), w.data(), in[0].v.data(), has_bias ? bias.data() : nullptr, N, r);
        return Tensors{{"scores", scores}, {"w", w}, {"idx", as_float(idx)}};
      };
      c.cuda = [=](const Tensors& in) {
        DevBuf u = upf(in[0].v), sc(size_t(N * E), false), w(size_t(N * K), false), id(size_t(N * K), false);
        DevBuf b = upf(has_bias ? bias : std::vector<float>{0.0f});
        cuda::moe_route(sc.f(), id.i(), w.f(), u.f(), has_bias ? b.f() : nullptr, N, r, stream());
        return Tensors{{"scores", downf(sc)}, {"w", downf(w)}, {"idx", as_float(downi(id))}};
      };
      c.exact_outputs = {2};
      c.k = 4 + std::sqrt(double(E));
      t.push_back(std::move(c));
    }
    {
      // The selection of the unperturbed logits, fixed for the backward (it is piecewise constant).
      std::vector<float> scores(static_cast<size_t>(N * E)), w(static_cast<size_t>(N * K));
      std::vector<int32_t> idx(static_cast<size_t>(N * K));
      ref::moe_route(scores.data(), idx.data(), w.data(), logits.data(), has_bias ? bias.data() : nullptr, N, r);
      OpCase c = make("moe_route", name, Mode::Gradient, {{"logits", logits}, {"dw", randn(size_t(N * K), 72)}});
      auto back = [=](bool use_ref, const Tensors& in) {
        // The affinities from the (possibly perturbed) logits, the choices fixed.
        std::vector<float> sc(static_cast<size_t>(N * E)), ww(static_cast<size_t>(N * K)), du(static_cast<size_t>(N * E));
        std::vector<int32_t> id(static_cast<size_t>(N * K));
        ref::moe_route(sc.data(), id.data(), ww.data(), in[0].v.data(), has_bias ? bias.data() : nullptr, N, r);
        if (use_ref)
          ref::moe_route_backward(du.data(), in[1].v.data(), sc.data(), idx.data(), N, r);
        else
          cpu::moe_route_backward(du.data(), in[1].v.data(), sc.data(), idx.data(), N, r);
        return Tensors{{"dlogits", du}};
      };
      c.cuda = [=](const Tensors& in) {
        std::vector<float> sc(static_cast<size_t>(N * E)), ww(static_cast<size_t>(N * K));
        std::vector<int32_t> id(static_cast<size_t>(N * K));
        ref::moe_route(sc.data(), id.data(), ww.data(), in[0].v.data(), has_bias ? bias.data() : nullptr, N, r);
        DevBuf dsc = upf(sc), dw = upf(in[1].v), did = upi(idx), du(size_t(N * E), false);
        cuda::moe_route_backward(du.f(), dw.f(), dsc.f(), did.i(), N, r, stream());
        return Tensors{{"dlogits", downf(du)}};
      };
      c.ref = [=](const Tensors& in) { return back(true, in); };
      c.cpu = [=](const Tensors& in) { return back(false, in); };
      c.loss = dot_loss(fwd, {{1, 1}});
      c.grads = {{0, 0, -1}};
      c.fd_step = 1e-3;
      c.k = 4 + std::sqrt(double(E));
      t.push_back(std::move(c));
    }
  }
}

void add_dispatch(std::vector<OpCase>& t) {
  struct D {
    int64_t N;
    int E, K, C;
  };
  for (D s : {D{37, 8, 2, 24}, D{100, 16, 6, 40}, D{5, 64, 4, 8}}) {
    const int64_t N = s.N, R = N * s.K;
    const int E = s.E, K = s.K, C = s.C;
    const std::vector<int32_t> idx = random_choices(N, K, E, E / 2, 73 + uint64_t(N));
    const std::string name = fmt("N%ld E%d K%d C%d", long(N), E, K, C);
    auto run = [=](bool use_ref) {
      std::vector<int32_t> off(static_cast<size_t>(E + 1)), rt(static_cast<size_t>(R)), sl(static_cast<size_t>(R));
      (use_ref ? ref::moe_dispatch : cpu::moe_dispatch)(off.data(), rt.data(), sl.data(), idx.data(), N, K, E);
      return std::tuple{off, rt, sl};
    };
    {
      OpCase c = make("moe_dispatch", name, Mode::Forward, {});
      auto out = [=](bool use_ref) {
        auto [off, rt, sl] = run(use_ref);
        return Tensors{{"offsets", as_float(off)}, {"row_token", as_float(rt)}, {"slot", as_float(sl)}};
      };
      c.ref = [=](const Tensors&) { return out(true); };
      c.cpu = [=](const Tensors&) { return out(false); };
      c.cuda = [=](const Tensors&) {
        DevBuf did = upi(idx), off(size_t(E + 1), false), rt(size_t(R), false), sl(size_t(R), false);
        cuda::moe_dispatch(off.i(), rt.i(), sl.i(), did.i(), N, K, E, stream());
        return Tensors{{"offsets", as_float(downi(off))}, {"row_token", as_float(downi(rt))}, {"slot", as_float(downi(sl))}};
      };
      c.exact = true;
      t.push_back(std::move(c));
    }
    const auto [off, rt, sl] = run(true);
    // gather and its backward (dx += extra + Σ_k dxs[slot]).
    {
      OpFn fwd = [=](const Tensors& in) {
        std::vector<float> xs(static_cast<size_t>(R * C));
        ref::moe_gather(xs.data(), in[0].v.data(), rt.data(), R, C);
        return Tensors{{"xs", xs}};
      };
      OpCase f = make("moe_gather", name, Mode::Forward, {{"x", randn(size_t(N * C), 74)}});
      f.ref = fwd;
      f.cpu = [=](const Tensors& in) {
        std::vector<float> xs(static_cast<size_t>(R * C));
        cpu::moe_gather(xs.data(), in[0].v.data(), rt.data(), R, C);
        return Tensors{{"xs", xs}};
      };
      f.cuda = [=](const Tensors& in) {
        DevBuf x = upf(in[0].v), drt = upi(rt), xs(size_t(R * C), false);
        cuda::moe_gather(xs.f(), x.f(), drt.i(), R, C, stream());
        return Tensors{{"xs", downf(xs)}};
      };
      f.exact = true;
      t.push_back(std::move(f));
      OpCase g = make("moe_gather", name, Mode::Gradient,
                      {{"x", randn(size_t(N * C), 74)}, {"dxs", randn(size_t(R * C), 75)},
                       {"dx0", randn(size_t(N * C), 76)}, {"extra", randn(size_t(N * C), 77)}});
      auto back = [=](bool use_ref, const Tensors& in) {
        auto dx = in[2].v;
        (use_ref ? ref::moe_gather_backward : cpu::moe_gather_backward)(dx.data(), in[3].v.data(), in[1].v.data(),
                                                                        sl.data(), N, K, C);
        // The extra term is a plain add; the finite-difference check sees dx − extra.
        for (size_t i = 0; i < dx.size(); i++) dx[i] -= in[3].v[i];
        return Tensors{{"dx", dx}};
      };
      g.ref = [=](const Tensors& in) { return back(true, in); };
      g.cpu = [=](const Tensors& in) { return back(false, in); };
      g.cuda = [=](const Tensors& in) {
        DevBuf dx = upf(in[2].v), ex = upf(in[3].v), dxs = upf(in[1].v), dsl = upi(sl);
        cuda::moe_gather_backward(dx.f(), ex.f(), dxs.f(), dsl.i(), N, K, C, stream());
        auto v = downf(dx);
        for (size_t i = 0; i < v.size(); i++) v[i] -= in[3].v[i];
        return Tensors{{"dx", v}};
      };
      g.loss = dot_loss(fwd, {{0, 1}});
      g.grads = {{0, 0, 2}};
      g.k = 4 + K;
      t.push_back(std::move(g));
    }
    // combine and its backward.
    {
      const std::vector<float> w = randn(size_t(N * K), 78);
      OpFn fwd = [=](const Tensors& in) {
        std::vector<float> y(static_cast<size_t>(N * C));
        ref::moe_combine(y.data(), in[0].v.data(), in[1].v.data(), sl.data(), in[2].v.data(), N, K, C);
        return Tensors{{"y", y}};
      };
      const Tensors inputs{{"residual", randn(size_t(N * C), 79)}, {"ys", randn(size_t(R * C), 80)}, {"w", w}};
      OpCase f = make("moe_combine", name, Mode::Forward, inputs);
      f.ref = fwd;
      f.cpu = [=](const Tensors& in) {
        std::vector<float> y = in[0].v;  // in place, as the block runs it
        cpu::moe_combine(y.data(), y.data(), in[1].v.data(), sl.data(), in[2].v.data(), N, K, C);
        return Tensors{{"y", y}};
      };
      f.cuda = [=](const Tensors& in) {
        DevBuf y = upf(in[0].v), ys = upf(in[1].v), ww = upf(in[2].v), dsl = upi(sl);
        cuda::moe_combine(y.f(), y.f(), ys.f(), dsl.i(), ww.f(), N, K, C, stream());
        return Tensors{{"y", downf(y)}};
      };
      f.k = 4 + K;
      t.push_back(std::move(f));
      Tensors gin = inputs;
      gin.push_back({"dy", randn(size_t(N * C), 81)});
      OpCase g = make("moe_combine", name, Mode::Gradient, gin);
      auto back = [=](bool use_ref, const Tensors& in) {
        std::vector<float> dys(static_cast<size_t>(R * C)), dw(static_cast<size_t>(N * K));
        (use_ref ? ref::moe_combine_backward : cpu::moe_combine_backward)(
            dys.data(), dw.data(), in[3].v.data(), in[1].v.data(), sl.data(), in[2].v.data(), N, K, C);
        return Tensors{{"dys", dys}, {"dw", dw}};
      };
      g.ref = [=](const Tensors& in) { return back(true, in); };
      g.cpu = [=](const Tensors& in) { return back(false, in); };
      g.cuda = [=](const Tensors& in) {
        DevBuf ys = upf(in[1].v), ww = upf(in[2].v), dy = upf(in[3].v), dsl = upi(sl), dys(size_t(R * C), false),
            dw(size_t(N * K), false);
        cuda::moe_combine_backward(dys.f(), dw.f(), dy.f(), ys.f(), dsl.i(), ww.f(), N, K, C, stream());
        return Tensors{{"dys", downf(dys)}, {"dw", downf(dw)}};
      };
      g.loss = dot_loss(fwd, {{0, 3}});
      g.grads = {{0, 1, -1}, {1, 2, -1}};
      g.k = 4 + std::sqrt(double(C));
      t.push_back(std::move(g));
    }
  }
}

void add_grouped(std::vector<OpCase>& t) {
  struct G {
    int64_t N;
    int E, K, in, out;
  };
  for (G s : {G{37, 8, 2, 24, 40}, G{60, 16, 4, 64, 33}, G{9, 6, 3, 17, 8}, G{11, 3, 1, 20, 12}}) {
    const int64_t N = s.N, R = N * s.K;
    const int E = s.E, K = s.K, in = s.in, out = s.out;
    const std::vector<int32_t> idx = random_choices(N, K, E, 1, 82 + uint64_t(N));
    std::vector<int32_t> off(static_cast<size_t>(E + 1)), rt(static_cast<size_t>(R)), sl(static_cast<size_t>(R));
    ref::moe_dispatch(off.data(), rt.data(), sl.data(), idx.data(), N, K, E);
    // y written into a wider row (ldy = out + 3), as the [gate | up] halves are.
    const int64_t ldy = out + 3;
    const std::string name = fmt("R%ld E%d in%d out%d (one empty expert)", long(R), E, in, out);
    OpFn fwd = [=](const Tensors& x) {
      std::vector<float> y(size_t(R * ldy), 0.0f);
      ref::grouped_linear_forward(y.data(), ldy, x[0].v.data(), x[1].v.data(), off.data(), E, in, out);
      return Tensors{{"y", y}};
    };
    const Tensors inputs{{"x", randn(size_t(R * in), 83)}, {"w", randn(size_t(E) * out * in, 84, 0.2f)}};
    OpCase f = make("grouped_linear", name, Mode::Forward, inputs);
    f.ref = fwd;
    f.cpu = [=](const Tensors& x) {
      std::vector<float> y(size_t(R * ldy), 0.0f);
      cpu::grouped_linear_forward(y.data(), ldy, x[0].v.data(), x[1].v.data(), off.data(), E, in, out);
      return Tensors{{"y", y}};
    };
    f.cuda = [=](const Tensors& x) {
      DevBuf dx = upf(x[0].v), dw = upf(x[1].v), doff = upi(off), y = upf(std::vector<float>(size_t(R * ldy), 0.0f));
      cuda::grouped_linear_forward(y.f(), ldy, dx.f(), dw.f(), doff.i(), E, in, out, stream());
      return Tensors{{"y", downf(y)}};
    };
    f.k = 4 + std::sqrt(double(in));
    t.push_back(std::move(f));
    for (float beta : {0.0f, 1.0f}) {
      Tensors gin = inputs;
      gin.push_back({"dy", randn(size_t(R * ldy), 85)});
      gin.push_back({"dx0", randn(size_t(R * in), 86)});
      gin.push_back({"dw0", randn(size_t(E) * out * in, 87)});
      OpCase g = make("grouped_linear", name + (beta != 0.0f ? " dx+=" : ""), Mode::Gradient, gin);
      auto back = [=](bool use_ref, const Tensors& x) {
        std::vector<float> dx = beta != 0.0f ? x[3].v : std::vector<float>(size_t(R * in), NAN), dw = x[4].v;
        (use_ref ? ref::grouped_linear_backward : cpu::grouped_linear_backward)(
            dx.data(), beta, dw.data(), x[2].v.data(), ldy, x[0].v.data(), x[1].v.data(), off.data(), E, in, out);
        return Tensors{{"dx", dx}, {"dw", dw}};
      };
      g.ref = [=](const Tensors& x) { return back(true, x); };
      g.cpu = [=](const Tensors& x) { return back(false, x); };
      g.cuda = [=](const Tensors& x) {
        DevBuf dx = upf(beta != 0.0f ? x[3].v : std::vector<float>(size_t(R * in), NAN)), dw = upf(x[4].v),
            dy = upf(x[2].v), xx = upf(x[0].v), w = upf(x[1].v), doff = upi(off);
        cuda::grouped_linear_backward(dx.f(), beta, dw.f(), dy.f(), ldy, xx.f(), w.f(), doff.i(), E, in, out, stream());
        return Tensors{{"dx", downf(dx)}, {"dw", downf(dw)}};
      };
      g.loss = dot_loss(fwd, {{0, 2}});
      g.grads = {{0, 0, beta != 0.0f ? 3 : -1}, {1, 1, 4}};
      g.k = 4 + std::sqrt(double(std::max<int64_t>(R, out)));
      t.push_back(std::move(g));
    }
  }
}

// The sequence-wise balance loss: sequences of uneven lengths (one empty), choices fixed, affinities from
// the logits (softmax or sigmoid); the loss's gradient with respect to the logits.
void add_seq_aux(std::vector<OpCase>& t) {
  for (bool sigmoid : {false, true}) {
    MoeRouting r;
    r.E = 12, r.K = 3, r.sigmoid = sigmoid;
    const int E = r.E, K = r.K;
    const std::vector<int32_t> starts = {0, 7, 7, 30, 41};
    const int S = int(starts.size()) - 1;
    const int64_t N = starts.back();
    const std::vector<int32_t> idx = random_choices(N, K, E, -1, 91);
    const float alpha = 0.37f;
    auto scores_of = [=](const std::vector<float>& logits) {
      std::vector<float> sc(size_t(N * E)), w(size_t(N * K));
      std::vector<int32_t> id(size_t(N * K));
      ref::moe_route(sc.data(), id.data(), w.data(), logits.data(), nullptr, N, r);
      return sc;
    };
    const std::string name = fmt("N%ld E%d K%d S%d %s", long(N), E, K, S, sigmoid ? "sigmoid" : "softmax");
    OpFn fwd = [=](const Tensors& in) {
      const std::vector<float> sc = scores_of(in[0].v);
      std::vector<float> f(size_t(S * E));
      const double loss = ref::moe_seq_aux(f.data(), sc.data(), idx.data(), starts.data(), S, r, alpha);
      return Tensors{{"loss", {float(loss)}}, {"f", f}};
    };
    const std::vector<float> logits = randn(size_t(N * E), 92);
    OpCase f = make("moe_seq_aux", name, Mode::Forward, {{"logits", logits}});
    f.ref = fwd;
    f.cpu = [=](const Tensors& in) {
      const std::vector<float> sc = scores_of(in[0].v);
      std::vector<float> ff(size_t(S * E));
      const double loss = cpu::moe_seq_aux(ff.data(), sc.data(), idx.data(), starts.data(), S, r, alpha);
      return Tensors{{"loss", {float(loss)}}, {"f", ff}};
    };
    f.cuda = [=](const Tensors& in) {
      DevBuf sc = upf(scores_of(in[0].v)), did = upi(idx), ff(size_t(S * E), false);
      const double loss = cuda::moe_seq_aux(ff.f(), sc.f(), did.i(), starts.data(), S, r, alpha, stream());
      return Tensors{{"loss", {float(loss)}}, {"f", downf(ff)}};
    };
    f.k = 4 + std::sqrt(double(N));
    t.push_back(std::move(f));
    OpCase g = make("moe_seq_aux", name, Mode::Gradient, {{"logits", logits}, {"one", {1.0f}}, {"d0", randn(size_t(N * E), 93)}});
    auto back = [=](bool use_ref, const Tensors& in) {
      const std::vector<float> sc = scores_of(in[0].v);
      std::vector<float> ff(size_t(S * E)), du = in[2].v;
      ref::moe_seq_aux(ff.data(), sc.data(), idx.data(), starts.data(), S, r, alpha);
      (use_ref ? ref::moe_seq_aux_backward : cpu::moe_seq_aux_backward)(du.data(), ff.data(), sc.data(), starts.data(),
                                                                        S, r, alpha);
      return Tensors{{"dlogits", du}};
    };
    g.ref = [=](const Tensors& in) { return back(true, in); };
    g.cpu = [=](const Tensors& in) { return back(false, in); };
    g.cuda = [=](const Tensors& in) {
      const std::vector<float> sc = scores_of(in[0].v);
      std::vector<float> ff(size_t(S * E));
      ref::moe_seq_aux(ff.data(), sc.data(), idx.data(), starts.data(), S, r, alpha);
      DevBuf dsc = upf(sc), dff = upf(ff), du = upf(in[2].v);
      cuda::moe_seq_aux_backward(du.f(), dff.f(), dsc.f(), starts.data(), S, r, alpha, stream());
      return Tensors{{"dlogits", downf(du)}};
    };
    g.loss = dot_loss(fwd, {{0, 1}});
    g.grads = {{0, 0, 2}};
    g.k = 4 + std::sqrt(double(E));
    t.push_back(std::move(g));
  }
}


// The experts' products and combine as the bf16 CUDA backend runs them: bf16 activations and weights (rounded
// once here, so the reference reads the same numbers), fp32 sums; bf16 outputs except dW and the fp32 stream.
void add_bf16(std::vector<OpCase>& t) {
  constexpr DType B = DType::BF16;
  auto bf = [](const std::vector<float>& v) { return Tensor{"", v, DType::BF16}; };
  for (auto [N, E, K, in, out] : {std::tuple{37, 8, 2, 24, 40}, std::tuple{60, 16, 4, 64, 33}}) {
    const int64_t R = int64_t(N) * K, ldy = out + 3;
    const std::vector<int32_t> idx = random_choices(N, K, E, 1, 95 + uint64_t(N));
    std::vector<int32_t> off(static_cast<size_t>(E + 1)), rt(static_cast<size_t>(R)), sl(static_cast<size_t>(R));
    ref::moe_dispatch(off.data(), rt.data(), sl.data(), idx.data(), N, K, E);
    const std::string name = fmt("R%ld E%d in%d out%d bf16", long(R), E, in, out);
    Tensor x = bf(randn(size_t(R * in), 96, 1.0f, B)), w = bf(randn(size_t(E) * out * in, 97, 0.2f, B));
    x.name = "x", w.name = "w";
    OpFn fwd = [=](const Tensors& a) {
      std::vector<float> y(size_t(R * ldy), 0.0f);
      ref::grouped_linear_forward(y.data(), ldy, a[0].v.data(), a[1].v.data(), off.data(), E, in, out);
      return Tensors{{"y", y, B}};
    };
    OpCase f = make("grouped_linear", name, Mode::Forward, {x, w});
    f.ref = fwd;
    f.cuda = [=](const Tensors& a) {
      DevBuf dx = upf(a[0].v, true), dw = upf(a[1].v, true), doff = upi(off),
             y = upf(std::vector<float>(size_t(R * ldy), 0.0f), true);
      cuda::grouped_linear_forward(y.h(), ldy, dx.h(), dw.h(), doff.i(), E, in, out, stream());
      return Tensors{{"y", downf(y), B}};
    };
    t.push_back(std::move(f));
    Tensor dy = bf(randn(size_t(R * ldy), 98, 1.0f, B)), dx0 = bf(randn(size_t(R * in), 99, 1.0f, B));
    dy.name = "dy", dx0.name = "dx0";
    OpCase g = make("grouped_linear", name + " dx+=", Mode::Gradient, {x, w, dy, dx0, {"dw0", randn(size_t(E) * out * in, 100)}});
    g.ref = [=](const Tensors& a) {
      std::vector<float> dx = a[3].v, dw = a[4].v;
      ref::grouped_linear_backward(dx.data(), 1.0f, dw.data(), a[2].v.data(), ldy, a[0].v.data(), a[1].v.data(),
                                   off.data(), E, in, out);
      return Tensors{{"dx", dx, B}, {"dw", dw}};
    };
    g.cuda = [=](const Tensors& a) {
      DevBuf dx = upf(a[3].v, true), dw = upf(a[4].v), ddy = upf(a[2].v, true), xx = upf(a[0].v, true),
             ww = upf(a[1].v, true), doff = upi(off);
      cuda::grouped_linear_backward(dx.h(), 1.0f, dw.f(), ddy.h(), ldy, xx.h(), ww.h(), doff.i(), E, in, out, stream());
      return Tensors{{"dx", downf(dx), B}, {"dw", downf(dw)}};
    };
    g.loss = dot_loss(fwd, {{0, 2}});
    g.grads = {{0, 0, 3}, {1, 1, 4}};
    g.k = 4 + std::sqrt(double(std::max<int64_t>(R, out)));
    t.push_back(std::move(g));

    // combine: the fp32 stream plus the gated bf16 expert rows; its backward's dys in bf16.
    const int C = in;
    Tensor ys = bf(randn(size_t(R * C), 101, 1.0f, B));
    ys.name = "ys";
    const Tensors cin{{"residual", randn(size_t(N) * C, 102)}, ys, {"w", randn(size_t(N * K), 103)}};
    OpFn cf = [=](const Tensors& a) {
      std::vector<float> y(size_t(N) * C);
      ref::moe_combine(y.data(), a[0].v.data(), a[1].v.data(), sl.data(), a[2].v.data(), N, K, C);
      return Tensors{{"y", y}};
    };
    OpCase c = make("moe_combine", fmt("N%d K%d C%d bf16", N, K, C), Mode::Forward, cin);
    c.ref = cf;
    c.cuda = [=](const Tensors& a) {
      DevBuf y = upf(a[0].v), dys = upf(a[1].v, true), ww = upf(a[2].v), dsl = upi(sl);
      cuda::moe_combine(y.f(), y.f(), dys.h(), dsl.i(), ww.f(), N, K, C, stream());
      return Tensors{{"y", downf(y)}};
    };
    c.k = 4 + K;
    t.push_back(std::move(c));
    Tensors gin = cin;
    Tensor cdy = bf(randn(size_t(N) * C, 104, 1.0f, B));
    cdy.name = "dy";
    gin.push_back(cdy);
    OpCase cg = make("moe_combine", fmt("N%d K%d C%d bf16", N, K, C), Mode::Gradient, gin);
    cg.ref = [=](const Tensors& a) {
      std::vector<float> dys(size_t(R * C)), dw(size_t(N * K));
      ref::moe_combine_backward(dys.data(), dw.data(), a[3].v.data(), a[1].v.data(), sl.data(), a[2].v.data(), N, K, C);
      return Tensors{{"dys", dys, B}, {"dw", dw}};
    };
    cg.cuda = [=](const Tensors& a) {
      DevBuf dys(size_t(R * C), true), dw(size_t(N * K), false), ddy = upf(a[3].v, true), dyy = upf(a[1].v, true),
          ww = upf(a[2].v), dsl = upi(sl);
      cuda::moe_combine_backward(dys.h(), dw.f(), ddy.h(), dyy.h(), dsl.i(), ww.f(), N, K, C, stream());
      return Tensors{{"dys", downf(dys), B}, {"dw", downf(dw)}};
    };
    cg.loss = dot_loss(cf, {{0, 3}});
    cg.grads = {{0, 1, -1}, {1, 2, -1}};
    cg.k = 4 + std::sqrt(double(C));
    t.push_back(std::move(cg));
  }
}

// The router's product on the CUDA backend: bf16 activations times the fp32 weight [E, in], fp32 logits; the
// reference is the one-expert grouped product.
void add_router(std::vector<OpCase>& t) {
  constexpr DType B = DType::BF16;
  for (auto [N, in, E] : {std::tuple{37, 64, 8}, std::tuple{70, 40, 64}}) {
    const std::vector<int32_t> off = {0, N};
    Tensor x{"x", randn(size_t(N) * in, 105, 1.0f, B), B};
    const Tensors inputs{x, {"w", randn(size_t(E) * in, 106, 0.2f)}};
    OpFn fwd = [=](const Tensors& a) {
      std::vector<float> y(size_t(N) * E);
      ref::grouped_linear_forward(y.data(), E, a[0].v.data(), a[1].v.data(), off.data(), 1, in, E);
      return Tensors{{"logits", y}};
    };
    const std::string name = fmt("N%d in%d E%d bf16 x, fp32 weight", N, in, E);
    OpCase f = make("moe_router", name, Mode::Forward, inputs);
    f.ref = fwd;
    f.cuda = [=](const Tensors& a) {
      DevBuf dx = upf(a[0].v, true), dw = upf(a[1].v), y(size_t(N) * E, false);
      cuda::router_forward(y.f(), dx.h(), dw.f(), N, in, E, stream());
      return Tensors{{"logits", downf(y)}};
    };
    f.k = 4 + std::sqrt(double(in));
    t.push_back(std::move(f));
    Tensors gin = inputs;
    gin.push_back({"dlogits", randn(size_t(N) * E, 107)});
    gin.push_back({"dw0", randn(size_t(E) * in, 108)});
    OpCase g = make("moe_router", name, Mode::Gradient, gin);
    g.ref = [=](const Tensors& a) {
      std::vector<float> dx(size_t(N) * in), dw = a[3].v;
      ref::grouped_linear_backward(dx.data(), 0.0f, dw.data(), a[2].v.data(), E, a[0].v.data(), a[1].v.data(),
                                   off.data(), 1, in, E);
      return Tensors{{"dx", dx, B}, {"dw", dw}};
    };
    g.cuda = [=](const Tensors& a) {
      DevBuf dx(size_t(N) * in, true), dw = upf(a[3].v), du = upf(a[2].v), xx = upf(a[0].v, true), w = upf(a[1].v);
      cuda::router_backward(dx.h(), dw.f(), du.f(), xx.h(), w.f(), N, in, E, stream());
      return Tensors{{"dx", downf(dx), B}, {"dw", downf(dw)}};
    };
    g.loss = dot_loss(fwd, {{0, 2}});
    g.grads = {{0, 0, -1}, {1, 1, 3}};
    g.k = 4 + std::sqrt(double(std::max(N, E)));
    t.push_back(std::move(g));
  }
}

}  // namespace

void add_moe_cases(std::vector<OpCase>& t) {
  add_route(t);
  add_dispatch(t);
  add_grouped(t);
  add_seq_aux(t);
  add_bf16(t);
  add_router(t);
}

}  // namespace kiln::ops
