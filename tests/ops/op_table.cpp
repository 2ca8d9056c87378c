// The op table: every op's cases, declared once (see op_table.h for what a case is and how it is judged).
//
// Shapes are small (the emulator runs every CUDA thread as a fiber) but cover each kernel's paths: vector
// widths (C a multiple of 8) and the scalar fallback (odd sizes, pointers one element off), tails, the
// multi-slot rows of the norms (C > 1024), partial attention tiles, packed sequences (one empty), grouped
// and sliding-window attention, the split decode path; a few CPU-only cases pass the threading thresholds.
// bf16 cases round their bf16 inputs once, so the reference sees exactly what the GPU reads.
#include "tests/ops/op_table.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "core/dtype.h"
#include "core/gpu.h"
#include "core/rng.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/crossentropy.h"
#include "kernels/decode_attention.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "kernels/matmul_lowp.h"
#include "kernels/gemv.h"
#include "kernels/narrow_gemv.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "models/model_config.h"
#include "nn/backend.h"

namespace kiln::ops {
namespace {

constexpr DType F32 = DType::F32, BF16 = DType::BF16;

// ------------------------------------------------------------------------------------------- helpers

// A device copy of a float tensor in its storage type, `off` elements into the allocation (off = 1 makes
// the pointer misaligned for the vector paths).
struct Dev {
  gpu::DeviceBuffer buf;
  size_t n = 0;
  DType dt = F32;
  int off = 0;
  Dev(size_t count, DType t, int offset = 0)
      : buf(std::max<size_t>((count + size_t(offset)) * (t == F32 ? 4 : 2), 4), "ops test"),
        n(count),
        dt(t),
        off(offset) {}
  void* ptr() const { return static_cast<char*>(buf.data()) + size_t(off) * (dt == F32 ? 4 : 2); }
  float* f() const { return static_cast<float*>(ptr()); }
  uint16_t* h() const { return static_cast<uint16_t*>(ptr()); }
  // Calls fn with the typed pointer (the cuda:: ops are overloaded on fp32 / bf16).
  template <class Fn>
  void with(Fn&& fn) const {
    if (dt == F32)
      fn(f());
    else
      fn(h());
  }
};

Dev up(const std::vector<float>& v, DType dt, int off = 0) {
  Dev d(v.size(), dt, off);
  if (dt == F32) {
    gpu::copy_to_device(d.ptr(), v.data(), v.size() * 4);
  } else {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); i++) h[i] = f32_to_bf16(v[i]);
    gpu::copy_to_device(d.ptr(), h.data(), h.size() * 2);
  }
  return d;
}
Dev up(const Tensor& t, int off = 0) { return up(t.v, t.dt, off); }

Tensor down(const std::string& name, const Dev& d) {
  Tensor t{name, std::vector<float>(d.n), d.dt};
  if (d.dt == F32) {
    gpu::copy_to_host(t.v.data(), d.ptr(), d.n * 4);
  } else {
    std::vector<uint16_t> h(d.n);
    gpu::copy_to_host(h.data(), d.ptr(), d.n * 2);
    for (size_t i = 0; i < d.n; i++) t.v[i] = bf16_to_f32(h[i]);
  }
  return t;
}

struct DevInts {
  gpu::DeviceBuffer buf;
  explicit DevInts(const std::vector<int32_t>& v) : buf(std::max<size_t>(v.size() * 4, 4), "ops test") {
    gpu::copy_to_device(buf.data(), v.data(), v.size() * 4);
  }
  int32_t* get() const { return buf.as<int32_t>(); }
};

void* stream() { return gpu::stream(); }

// Σ a·b in double; *sq gets Σ(a·b)² (the scale of the loss's rounding noise).
double dot(const std::vector<float>& a, const std::vector<float>& b, double* sq) {
  double s = 0, s2 = 0;
  for (size_t i = 0; i < a.size(); i++) {
    s += double(a[i]) * b[i];
    s2 += std::pow(double(a[i]) * b[i], 2);
  }
  if (sq) *sq += s2;
  return s;
}

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

// The loss <fwd(in)[out_index], in[weight_index]> for a gradient case.
std::function<double(const Tensors&, double*)> dot_loss(OpFn fwd, int out_index, int weight_index) {
  return [fwd, out_index, weight_index](const Tensors& in, double* sq) {
    *sq = 0;
    return dot(fwd(in)[size_t(out_index)].v, in[size_t(weight_index)].v, sq);
  };
}

constexpr float kEps = 1e-5f;

// The tolerance factor of an output that sums `len` terms: each partial sum rounds once, and K random
// roundings grow like sqrt(K), against the yardstick's one rounding per input.
double ksum(double len) { return 4 + std::sqrt(len); }
// bf16 outputs: their own rounding (and the bf16 inputs') dominate the fp32 arithmetic inside the kernels.
double kfor(DType out, double len) { return out == BF16 ? 4 : ksum(len); }

// Row-wise ops (the norms): N rows of C, in fp32 and, where the GPU runs the shape, with bf16 activations.
struct Rows {
  int64_t N;
  int C;
  bool gpu;
};
struct RowCase {
  int64_t N;
  int C;
  bool gpu;
  DType dt;
  std::string name;
};
std::vector<RowCase> row_cases(std::initializer_list<Rows> shapes) {
  std::vector<RowCase> r;
  for (const Rows& s : shapes)
    for (DType dt : {F32, BF16})
      if (dt == F32 || s.gpu) r.push_back({s.N, s.C, s.gpu, dt, fmt("N%ld C%d %s", long(s.N), s.C, dtype_name(dt))});
  return r;
}

// --------------------------------------------------------------------------------------------- layernorm

void add_layernorm(std::vector<OpCase>& t) {
  // 72, 256: the CUDA vector path (one warp / one 8-column slot per thread); 50: scalar fallback; 1030: the
  // fallback with 4 slots per thread; 203×16: many rows per block in the backward; 300×100: CPU threads.
  for (const RowCase& r : row_cases(
           {{37, 72, true}, {21, 256, true}, {13, 50, true}, {5, 1030, true}, {203, 16, true}, {300, 100, false}})) {
    const int64_t N = r.N;
    const int C = r.C;
    const bool gpu = r.gpu;
    const DType dt = r.dt;
    const std::string& name = r.name;
    auto x = randn(size_t(N * C), 11 + C, 2.0f);
    for (auto& v : x) v += 3.0f;  // an offset: the variance must not come from E[x²] - E[x]²
    const Tensor tx{"x", x}, tw{"weight", randn(size_t(C), 12 + C)}, tb{"bias", randn(size_t(C), 13 + C)};
    // fn = ref:: or cpu:: layernorm_forward: {out, mean, rstd}.
    auto host_fwd = [=](auto fn, const Tensors& in) {
      std::vector<float> out(size_t(N * C)), mean(static_cast<size_t>(N)), rstd(static_cast<size_t>(N));
      fn(out.data(), mean.data(), rstd.data(), in[0].v.data(), in[1].v.data(), in[2].v.data(), N, C, kEps);
      return Tensors{{"out", out, dt}, {"mean", mean}, {"rstd", rstd}};
    };
    using Fwd = void (*)(float*, float*, float*, const float*, const float*, const float*, int64_t, int, float);
    const Fwd ref_f = ref::layernorm_forward, cpu_f = cpu::layernorm_forward;
    OpFn fwd = [=](const Tensors& in) { return host_fwd(ref_f, in); };
    {
      OpCase c = make("layernorm", name, Mode::Forward, {tx, tw, tb});
      c.k = kfor(dt, C);
      c.ref = fwd;
      if (dt == F32) c.cpu = [=](const Tensors& in) { return host_fwd(cpu_f, in); };
      if (gpu)
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), w = up(in[1]), b = up(in[2]), out(size_t(N * C), dt), mean(size_t(N), F32),
              rstd(size_t(N), F32);
          out.with([&](auto* o) {
            cuda::layernorm_forward(o, mean.f(), rstd.f(), x.f(), w.f(), b.f(), N, C, kEps, stream());
          });
          return Tensors{down("out", out), down("mean", mean), down("rstd", rstd)};
        };
      t.push_back(std::move(c));
    }
    {
      // The gradients accumulate: they start from random values.
      OpCase c = make("layernorm", name, Mode::Gradient,
                      {tx,
                       tw,
                       tb,
                       {"dout", randn(size_t(N * C), 23 + C, 1.0f, dt), dt},
                       {"dinp0", randn(size_t(N * C), 24 + C)},
                       {"dweight0", randn(size_t(C), 25 + C)},
                       {"dbias0", randn(size_t(C), 26 + C)}});
      c.ref = [=](const Tensors& in) {
        const Tensors f = fwd(in);
        auto dx = in[4].v, dw = in[5].v, db = in[6].v;
        ref::layernorm_backward(dx.data(), dw.data(), db.data(), in[3].v.data(), in[0].v.data(), in[1].v.data(),
                                f[1].v.data(), f[2].v.data(), N, C);
        return Tensors{{"dinp", dx}, {"dweight", dw}, {"dbias", db}};
      };
      if (dt == F32)
        c.cpu = [=](const Tensors& in) {
          const Tensors f = host_fwd(cpu_f, in);
          auto dx = in[4].v, dw = in[5].v, db = in[6].v;
          cpu::layernorm_backward(dx.data(), dw.data(), db.data(), in[3].v.data(), in[0].v.data(), in[1].v.data(),
                                  f[1].v.data(), f[2].v.data(), N, C);
          return Tensors{{"dinp", dx}, {"dweight", dw}, {"dbias", db}};
        };
      if (gpu)
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), w = up(in[1]), b = up(in[2]), dy = up(in[3]), dx = up(in[4]), dw = up(in[5]),
              db = up(in[6]), out(size_t(N * C), F32), mean(size_t(N), F32), rstd(size_t(N), F32),
              scratch(cuda::layernorm_backward_scratch_floats(N, C), F32);
          cuda::layernorm_forward(out.f(), mean.f(), rstd.f(), x.f(), w.f(), b.f(), N, C, kEps, stream());
          dy.with([&](auto* d) {
            cuda::layernorm_backward(dx.f(), dw.f(), db.f(), d, x.f(), w.f(), mean.f(), rstd.f(), N, C, scratch.f(),
                                     stream());
          });
          return Tensors{down("dinp", dx), down("dweight", dw), down("dbias", db)};
        };
      c.loss = dot_loss(fwd, 0, 3);
      c.grads = {{0, 0, 4}, {1, 1, 5}, {2, 2, 6}};
      c.k = ksum(double(std::max<int64_t>(N, C)));  // dweight sums over the rows
      t.push_back(std::move(c));
    }
  }
}

// ----------------------------------------------------------------------------------------------- rmsnorm

void add_rmsnorm(std::vector<OpCase>& t) {
  // The residual-stream form (one group per row): fp32 in, fp32 or bf16 out, dinp fp32 (= or +=).
  for (const RowCase& r : row_cases(
           {{37, 72, true}, {21, 256, true}, {13, 50, true}, {5, 1030, true}, {7, 37, false}, {300, 100, false}})) {
    const int64_t N = r.N;
    const int C = r.C;
    const bool gpu = r.gpu;
    const DType dt = r.dt;
    const std::string& name = r.name;
    const Tensor tx{"x", randn(size_t(N * C), 1 + C, 2.0f)}, tw{"weight", randn(size_t(C), 2 + C)};
    OpFn fwd = [=](const Tensors& in) {
      std::vector<float> out(size_t(N * C)), rstd(static_cast<size_t>(N));
      ref::rmsnorm_forward(out.data(), rstd.data(), in[0].v.data(), in[1].v.data(), N, C, kEps);
      return Tensors{{"out", out, dt}, {"rstd", rstd}};
    };
    {
      OpCase c = make("rmsnorm", name, Mode::Forward, {tx, tw});
      c.k = kfor(dt, C);
      c.ref = fwd;
      if (dt == F32)
        c.cpu = [=](const Tensors& in) {
          std::vector<float> out(size_t(N * C)), rstd(static_cast<size_t>(N));
          cpu::rmsnorm_forward(out.data(), rstd.data(), in[0].v.data(), in[1].v.data(), N, C, kEps);
          return Tensors{{"out", out}, {"rstd", rstd}};
        };
      if (gpu)
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), w = up(in[1]), out(size_t(N * C), dt), rstd(size_t(N), F32);
          out.with([&](auto* o) { cuda::rmsnorm_forward(o, rstd.f(), x.f(), w.f(), N, C, kEps, stream()); });
          return Tensors{down("out", out), down("rstd", rstd)};
        };
      t.push_back(std::move(c));
    }
    for (bool acc : {false, true}) {
      OpCase c = make("rmsnorm", name + (acc ? " accumulate" : " overwrite"), Mode::Gradient,
                      {tx,
                       tw,
                       {"dout", randn(size_t(N * C), 3 + C, 1.0f, dt), dt},
                       {"dinp0", randn(size_t(N * C), 4 + C)},
                       {"dweight0", randn(size_t(C), 5 + C)}});
      c.ref = [=](const Tensors& in) {
        const Tensors f = fwd(in);
        auto dx = in[3].v, dw = in[4].v;
        ref::rmsnorm_backward(dx.data(), dw.data(), in[2].v.data(), in[0].v.data(), in[1].v.data(), f[1].v.data(), N, C,
                              acc);
        return Tensors{{"dinp", dx}, {"dweight", dw}};
      };
      if (dt == F32)
        c.cpu = [=](const Tensors& in) {
          std::vector<float> out(size_t(N * C)), rstd(static_cast<size_t>(N));
          cpu::rmsnorm_forward(out.data(), rstd.data(), in[0].v.data(), in[1].v.data(), N, C, kEps);
          auto dx = in[3].v, dw = in[4].v;
          cpu::rmsnorm_backward(dx.data(), dw.data(), in[2].v.data(), in[0].v.data(), in[1].v.data(), rstd.data(), N, C,
                                acc);
          return Tensors{{"dinp", dx}, {"dweight", dw}};
        };
      if (gpu)
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), w = up(in[1]), dy = up(in[2]), dx = up(in[3]), dw = up(in[4]), out(size_t(N * C), F32),
              rstd(size_t(N), F32), scratch(cuda::rmsnorm_backward_scratch_floats(N, C), F32);
          cuda::rmsnorm_forward(out.f(), rstd.f(), x.f(), w.f(), N, C, kEps, stream());
          dy.with([&](auto* d) {
            cuda::rmsnorm_backward(dx.f(), dw.f(), d, x.f(), w.f(), rstd.f(), N, C, acc, scratch.f(), stream());
          });
          return Tensors{down("dinp", dx), down("dweight", dw)};
        };
      c.loss = dot_loss(fwd, 0, 2);
      c.grads = {{0, 0, acc ? 3 : -1}, {1, 1, 4}};
      c.k = ksum(double(std::max<int64_t>(N, C)));
      t.push_back(std::move(c));
    }
  }

  // The per-head form (Qwen3's q/k norms): `heads` groups of C side by side from `off` into rows of ld
  // values (the rest of the row passes through). In place on the row buffer; the backward in place on dout.
  // The CPU kernels take it in fp32, the CUDA kernels in bf16.
  struct H {
    int64_t N;
    int C, heads;
    int64_t ld, off;
  };
  for (H s : {H{5, 24, 3, 3 * 24 + 5, 0}, H{65, 16, 4, 0, 0}, H{9, 64, 4, 8 * 64, 0}, H{9, 64, 2, 8 * 64, 4 * 64},
              H{6, 128, 3, 3 * 128, 0}})
    for (DType dt : {F32, BF16}) {
      const int64_t N = s.N, L = s.ld > 0 ? s.ld : int64_t(s.heads) * s.C, off = s.off;
      const int C = s.C, heads = s.heads;
      const bool gpu = dt == BF16 && C % 8 == 0 && L % 8 == 0;
      if (dt == BF16 && !gpu) continue;
      const std::string name =
          fmt("N%ld C%d heads %d ld %ld off %ld %s", long(N), C, heads, long(L), long(off), dtype_name(dt));
      const Tensor tx{"x", randn(size_t(N * L), 6 + C + heads, 2.0f, dt), dt}, tw{"weight", randn(size_t(C), 7)};
      OpFn fwd = [=](const Tensors& in) {
        auto out = in[0].v;
        std::vector<float> rstd(size_t(N * heads));
        ref::rmsnorm_forward(out.data() + off, rstd.data(), in[0].v.data() + off, in[1].v.data(), N, C, kEps, heads, L);
        return Tensors{{"out", out, dt}, {"rstd", rstd}};
      };
      auto cpu_fwd = [=](const Tensors& in) {
        auto out = in[0].v;
        std::vector<float> rstd(size_t(N * heads));
        cpu::rmsnorm_forward(out.data() + off, rstd.data(), in[0].v.data() + off, in[1].v.data(), N, C, kEps, heads, L);
        return Tensors{{"out", out}, {"rstd", rstd}};
      };
      {
        OpCase c = make("rmsnorm_heads", name, Mode::Forward, {tx, tw});
        c.k = kfor(dt, C);
        c.ref = fwd;
        if (dt == F32) c.cpu = cpu_fwd;
        if (gpu)
          c.cuda = [=](const Tensors& in) {
            Dev x = up(in[0]), w = up(in[1]), rstd(size_t(N * heads), F32);
            cuda::rmsnorm_forward(x.h() + off, rstd.f(), x.h() + off, w.f(), N, C, kEps, heads, L, stream());
            return Tensors{down("out", x), down("rstd", rstd)};
          };
        t.push_back(std::move(c));
      }
      {
        // dinp overwrites dout in place, so outside the groups it keeps dout: the gradient of the loss
        // Σ out·dout there, where out passes x through.
        OpCase c =
            make("rmsnorm_heads", name, Mode::Gradient,
                 {tx, tw, {"dout", randn(size_t(N * L), 8 + C, 1.0f, dt), dt}, {"dweight0", randn(size_t(C), 9 + C)}});
        c.ref = [=](const Tensors& in) {
          const Tensors f = fwd(in);
          auto dx = in[2].v, dw = in[3].v;
          ref::rmsnorm_backward(dx.data() + off, dw.data(), dx.data() + off, in[0].v.data() + off, in[1].v.data(),
                                f[1].v.data(), N, C, false, heads, L);
          return Tensors{{"dinp", dx, dt}, {"dweight", dw}};
        };
        if (dt == F32)
          c.cpu = [=](const Tensors& in) {
            const Tensors f = cpu_fwd(in);
            auto dx = in[2].v, dw = in[3].v;
            cpu::rmsnorm_backward(dx.data() + off, dw.data(), dx.data() + off, in[0].v.data() + off, in[1].v.data(),
                                  f[1].v.data(), N, C, false, heads, L);
            return Tensors{{"dinp", dx}, {"dweight", dw}};
          };
        if (gpu)
          c.cuda = [=](const Tensors& in) {
            Dev x = up(in[0]), w = up(in[1]), dy = up(in[2]), dw = up(in[3]), out(size_t(N * L), BF16),
                rstd(size_t(N * heads), F32), scratch(cuda::rmsnorm_backward_scratch_floats(N * heads, C), F32);
            cuda::rmsnorm_forward(out.h() + off, rstd.f(), x.h() + off, w.f(), N, C, kEps, heads, L, stream());
            cuda::rmsnorm_backward(dy.h() + off, dw.f(), dy.h() + off, x.h() + off, w.f(), rstd.f(), N, C, false, heads,
                                   L, scratch.f(), stream());
            return Tensors{down("dinp", dy), down("dweight", dw)};
          };
        c.loss = dot_loss(fwd, 0, 2);
        c.grads = {{0, 0, -1}, {1, 1, 3}};
        c.k = kfor(dt, double(std::max<int64_t>(N * heads, C)));
        t.push_back(std::move(c));
      }
    }
}

// -------------------------------------------------------------------------------------------------- rope

std::vector<float> plain_inv_freq(int rot_dim, double base) {
  std::vector<float> f(size_t(rot_dim / 2));
  for (int i = 0; i < rot_dim / 2; i++) f[size_t(i)] = float(std::pow(base, -2.0 * i / rot_dim));
  return f;
}
// Llama 3.1's banded frequencies, as the model computes them (models/model_config.cpp).
std::vector<float> llama3_inv_freq(int HD) {
  ModelConfig cfg;
  cfg.head_dim = HD;
  cfg.rope_theta = 500000.0;
  cfg.rope_scaling.kind = RopeScaling::Llama3;
  cfg.rope_scaling.factor = 8.0;
  cfg.rope_scaling.low_freq_factor = 1.0;
  cfg.rope_scaling.high_freq_factor = 4.0;
  cfg.rope_scaling.original_max_positions = 8192;
  return cfg.rope_inv_freq();
}

void add_rope(std::vector<OpCase>& t) {
  struct S {
    int heads, HD, rot;
    int64_t ld;
    bool llama3;
    bool interleaved = false;
    float factor = 1.0f;
  };
  // Partial rotary with padding between rows; full; an odd pair count; Llama 3 frequencies on long positions;
  // DeepSeek's interleaved pairs, with yarn's cos/sin factor.
  for (S s : {S{5, 24, 16, 5 * 24 + 8, false}, S{3, 64, 64, 0, false}, S{2, 10, 6, 0, false},
              S{4, 64, 64, 6 * 64, true}, S{2, 128, 128, 0, true}, S{3, 24, 8, 3 * 24 + 8, false, true},
              S{2, 64, 64, 0, false, true, 1.25f}})
    for (DType dt : {F32, BF16}) {
      const int64_t N = 9, L = s.ld > 0 ? s.ld : int64_t(s.heads) * s.HD;
      const auto freq = s.llama3 ? llama3_inv_freq(s.rot) : plain_inv_freq(s.rot, 10000.0);
      std::vector<int32_t> pos(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; n++)
        pos[size_t(n)] = int32_t(s.llama3 ? (n * 4093 + 5) % 32768 : (n * 977 + 3) % 4096);
      RopeParams p;
      p.heads = s.heads, p.HD = s.HD, p.rot_dim = s.rot, p.ld = s.ld;
      p.interleaved = s.interleaved, p.factor = s.factor;
      const std::string name = fmt("heads %d HD %d rot %d ld %ld %s%s factor %g %s", s.heads, s.HD, s.rot, long(L),
                                   s.llama3 ? "llama3" : "plain", s.interleaved ? " interleaved" : "",
                                   double(s.factor), dtype_name(dt));
      // fn(x, pos, N, p) in place on a copy of in[i].
      auto host = [=](auto fn, const std::vector<float>& x) {
        auto y = x;
        RopeParams q = p;
        q.inv_freq = freq.data();
        fn(y.data(), pos.data(), N, q);
        return y;
      };
      auto dev = [=](bool backward, const Tensor& x) {
        Dev d = up(x), f = up(freq, F32);
        DevInts dp(pos);
        RopeParams q = p;
        q.inv_freq = f.f();
        d.with([&](auto* v) {
          if (backward)
            cuda::rope_backward(v, dp.get(), N, q, stream());
          else
            cuda::rope_forward(v, dp.get(), N, q, stream());
        });
        return down(x.name, d);
      };
      using Fn = void (*)(float*, const int32_t*, int64_t, const RopeParams&);
      const Fn ref_f = ref::rope_forward, ref_b = ref::rope_backward, cpu_f = cpu::rope_forward,
               cpu_b = cpu::rope_backward;
      const Tensor tx{"x", randn(size_t(N * L), 31 + s.HD, 1.0f, dt), dt};
      OpFn fwd = [=](const Tensors& in) { return Tensors{{"out", host(ref_f, in[0].v), dt}}; };
      {
        OpCase c = make("rope", name, Mode::Forward, {tx});
        c.ref = fwd;
        if (dt == F32) c.cpu = [=](const Tensors& in) { return Tensors{{"out", host(cpu_f, in[0].v)}}; };
        c.cuda = [=](const Tensors& in) { return Tensors{dev(false, in[0])}; };
        t.push_back(std::move(c));
      }
      {
        OpCase c = make("rope", name, Mode::Gradient, {tx, {"dout", randn(size_t(N * L), 32, 1.0f, dt), dt}});
        c.ref = [=](const Tensors& in) { return Tensors{{"dx", host(ref_b, in[1].v), dt}}; };
        if (dt == F32) c.cpu = [=](const Tensors& in) { return Tensors{{"dx", host(cpu_b, in[1].v)}}; };
        c.cuda = [=](const Tensors& in) { return Tensors{dev(true, in[1])}; };
        c.loss = dot_loss(fwd, 0, 1);
        c.grads = {{0, 0, -1}};
        t.push_back(std::move(c));
      }
    }
}

// ------------------------------------------------------------------------------------------ activations

const char* act_name(Activation a) {
  switch (a) {
    case Activation::GeluTanh:
      return "gelu_tanh";
    case Activation::GeluErf:
      return "gelu_erf";
    case Activation::Relu:
      return "relu";
    case Activation::Silu:
      return "silu";
    case Activation::Relu2:
      return "relu2";
  }
  return "?";
}
// The derivatives chain some fifteen operations (x³, tanh or erf through exp and a division, 1 − tanh²,
// products), and for negative x the 1 + tanh of gelu' cancels, amplifying tanh's few-ulp error ~10×.
constexpr double kActGradK = 32;
bool kinked(Activation a) { return a == Activation::Relu || a == Activation::Relu2; }

// Inputs for an activation's gradient check: away from relu's kink, which a difference must not straddle.
std::vector<float> act_inputs(size_t n, uint64_t seed, Activation a, DType dt, bool gradient) {
  auto x = randn(n, seed, 3.0f);
  if (!gradient && n > 10) x[0] = -12.0f, x[1] = 12.0f, x[2] = 0.0f, x[3] = -30.0f, x[4] = 40.0f;
  if (gradient && kinked(a))
    for (auto& v : x)
      if (std::fabs(v) < 0.1f) v = v < 0 ? -0.1f : 0.1f;
  return round_to(x, dt);
}

void add_activations(std::vector<OpCase>& t) {
  const Activation acts[] = {Activation::GeluTanh, Activation::GeluErf, Activation::Relu, Activation::Silu,
                             Activation::Relu2};
  // Plain: 1003 = 125 vectors of 8 and a tail, at offset 0 and 1 (misaligned: the scalar path); CPU: a
  // single element and a threaded length. gpt2_gelu: the GPT-2 entry points (gelu_forward/backward).
  struct S {
    int64_t n;
    int off;
    bool gpu;
  };
  for (int ai = 0; ai <= 5; ai++) {
    const bool gpt2 = ai == 5;
    const Activation a = gpt2 ? Activation::GeluTanh : acts[ai];
    const std::string op = gpt2 ? "gelu_gpt2" : "activation";
    for (S s : {S{1003, 0, true}, S{1003, 1, true}, S{1, 0, false}, S{40003, 0, false}})
      for (DType dt : {F32, BF16}) {
        if (dt == BF16 && !s.gpu) continue;
        const int64_t n = s.n;
        const int off = s.off;
        const std::string name = fmt("%s n %ld off %d %s", act_name(a), long(n), off, dtype_name(dt));
        OpFn fwd = [=](const Tensors& in) {
          std::vector<float> out(static_cast<size_t>(n));
          if (gpt2)
            ref::gelu_forward(out.data(), in[0].v.data(), n);
          else
            ref::activation_forward(out.data(), in[0].v.data(), n, a);
          return Tensors{{"out", out, dt}};
        };
        for (Mode mode : {Mode::Forward, Mode::Gradient}) {
          const bool grad = mode == Mode::Gradient;
          Tensors inputs{{"x", act_inputs(size_t(n), 51 + ai, a, dt, grad), dt}};
          if (grad) inputs.push_back({"dout", randn(size_t(n), 52, 1.0f, dt), dt});
          OpCase c = make(op, name, mode, inputs);
          if (!grad) {
            c.ref = fwd;
            if (dt == F32)
              c.cpu = [=](const Tensors& in) {
                std::vector<float> out(static_cast<size_t>(n));
                if (gpt2)
                  cpu::gelu_forward(out.data(), in[0].v.data(), n);
                else
                  cpu::activation_forward(out.data(), in[0].v.data(), n, a);
                return Tensors{{"out", out}};
              };
            if (s.gpu)
              c.cuda = [=](const Tensors& in) {
                Dev x = up(in[0], off), out(size_t(n), dt, off);
                out.with([&](auto* o) {
                  using T = std::remove_pointer_t<decltype(o)>;
                  const T* xi = static_cast<const T*>(x.ptr());
                  if (gpt2)
                    cuda::gelu_forward(o, xi, n, stream());
                  else
                    cuda::activation_forward(o, xi, n, a, stream());
                });
                return Tensors{down("out", out)};
              };
          } else {
            c.ref = [=](const Tensors& in) {
              std::vector<float> dx(static_cast<size_t>(n));
              if (gpt2)
                ref::gelu_backward(dx.data(), in[0].v.data(), in[1].v.data(), n);
              else
                ref::activation_backward(dx.data(), in[0].v.data(), in[1].v.data(), n, a);
              return Tensors{{"dx", dx, dt}};
            };
            if (dt == F32)
              c.cpu = [=](const Tensors& in) {
                std::vector<float> dx(static_cast<size_t>(n));
                if (gpt2)
                  cpu::gelu_backward(dx.data(), in[0].v.data(), in[1].v.data(), n);
                else
                  cpu::activation_backward(dx.data(), in[0].v.data(), in[1].v.data(), n, a);
                return Tensors{{"dx", dx}};
              };
            // In place: dinp aliases dout.
            if (s.gpu)
              c.cuda = [=](const Tensors& in) {
                Dev x = up(in[0], off), dy = up(in[1], off);
                dy.with([&](auto* d) {
                  using T = std::remove_pointer_t<decltype(d)>;
                  const T* xi = static_cast<const T*>(x.ptr());
                  if (gpt2)
                    cuda::gelu_backward(d, xi, d, n, stream());
                  else
                    cuda::activation_backward(d, xi, d, n, a, stream());
                });
                return Tensors{down("dx", dy)};
              };
            c.loss = dot_loss(fwd, 0, 1);
            c.grads = {{0, 0, -1}};
            if (kinked(a)) c.fd_step = 1e-3;
            c.k = kActGradK;
          }
          t.push_back(std::move(c));
        }
      }
  }

  // Gated (SwiGLU = silu, GeGLU = gelu): rows of [gate | up].
  struct G {
    int64_t N;
    int I;
    bool gpu;
  };
  for (Activation a : acts)
    for (G s : {G{7, 37, true}, G{4, 256, true}, G{33, 1003, false}})
      for (DType dt : {F32, BF16}) {
        if (dt == BF16 && !s.gpu) continue;
        const int64_t N = s.N;
        const int I = s.I;
        const std::string name = fmt("%s N %ld I %d %s", act_name(a), long(N), I, dtype_name(dt));
        OpFn fwd = [=](const Tensors& in) {
          std::vector<float> out(size_t(N * I));
          ref::gated_forward(out.data(), in[0].v.data(), N, I, a);
          return Tensors{{"out", out, dt}};
        };
        for (Mode mode : {Mode::Forward, Mode::Gradient}) {
          const bool grad = mode == Mode::Gradient;
          Tensors inputs{{"gate_up", act_inputs(size_t(N * 2 * I), 61, a, dt, grad), dt}};
          if (grad) inputs.push_back({"dout", randn(size_t(N * I), 62, 1.0f, dt), dt});
          OpCase c = make("gated", name, mode, inputs);
          if (!grad) {
            c.ref = fwd;
            if (dt == F32)
              c.cpu = [=](const Tensors& in) {
                std::vector<float> out(size_t(N * I));
                cpu::gated_forward(out.data(), in[0].v.data(), N, I, a);
                return Tensors{{"out", out}};
              };
            if (s.gpu)
              c.cuda = [=](const Tensors& in) {
                Dev x = up(in[0]), out(size_t(N * I), dt);
                out.with([&](auto* o) {
                  using T = std::remove_pointer_t<decltype(o)>;
                  cuda::gated_forward(o, static_cast<const T*>(x.ptr()), N, I, a, stream());
                });
                return Tensors{down("out", out)};
              };
          } else {
            c.ref = [=](const Tensors& in) {
              std::vector<float> dx(size_t(N * 2 * I));
              ref::gated_backward(dx.data(), in[0].v.data(), in[1].v.data(), N, I, a);
              return Tensors{{"dgate_up", dx, dt}};
            };
            if (dt == F32)
              c.cpu = [=](const Tensors& in) {
                std::vector<float> dx(size_t(N * 2 * I));
                cpu::gated_backward(dx.data(), in[0].v.data(), in[1].v.data(), N, I, a);
                return Tensors{{"dgate_up", dx}};
              };
            if (s.gpu)
              c.cuda = [=](const Tensors& in) {
                Dev x = up(in[0]), dy = up(in[1]), dx(size_t(N * 2 * I), dt);
                dx.with([&](auto* d) {
                  using T = std::remove_pointer_t<decltype(d)>;
                  cuda::gated_backward(d, static_cast<const T*>(x.ptr()), static_cast<const T*>(dy.ptr()), N, I, a,
                                       stream());
                });
                return Tensors{down("dgate_up", dx)};
              };
            c.loss = dot_loss(fwd, 0, 1);
            c.grads = {{0, 0, -1}};
            if (kinked(a)) c.fd_step = 1e-3;
            c.k = kActGradK;
          }
          t.push_back(std::move(c));
        }
      }
}

// ------------------------------------------------------------------------------------------------ matmul

void add_matmul(std::vector<OpCase>& t) {
  // gemm in all four layouts with padded leading dimensions, alpha and beta (C pre-filled). fp32 operands
  // on the CPU (sgemm); bf16 operands on the CPU (gemm_lowp, the AVX512-BF16 kernel) and the GPU
  // (cuBLASLt, or its emulation), with fp32 or (GPU) bf16 output.
  struct S {
    int64_t M, N, K;
  };
  for (S s : {S{37, 53, 29}, S{64, 48, 72}})
    for (int tr = 0; tr < 4; tr++)
      for (int kind = 0; kind < 3; kind++)       // 0: fp32; 1: bf16 → fp32; 2: bf16 → bf16
        for (bool accumulate : {true, false}) {  // beta = 0: C is not read
          const bool ta = tr & 1, tb = tr & 2;
          const int64_t M = s.M, N = s.N, K = s.K;
          const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
          const int64_t arows = ta ? K : M, brows = tb ? N : K;
          const DType din = kind == 0 ? F32 : BF16, dout = kind == 2 ? BF16 : F32;
          const float alpha = accumulate ? 0.7f : -1.0f, beta = accumulate ? 0.3f : 0.0f;
          const std::string name = fmt("M%ld N%ld K%ld %c%c %s->%s alpha %g beta %g", long(M), long(N), long(K),
                                       ta ? 'T' : 'N', tb ? 'T' : 'N', dtype_name(din), dtype_name(dout), alpha, beta);
          OpCase c = make("gemm", name, Mode::Forward,
                          {{"A", randn(size_t(arows * lda), 101 + tr, 1.0f, din), din},
                           {"B", randn(size_t(brows * ldb), 102 + tr, 1.0f, din), din},
                           {"C", randn(size_t(M * ldc), 103, 1.0f, dout), dout}});
          c.k = kfor(dout, double(K));
          c.ref = [=](const Tensors& in) {
            auto C = in[2].v;
            ref::gemm(ta, tb, M, N, K, alpha, in[0].v.data(), lda, in[1].v.data(), ldb, beta, C.data(), ldc);
            return Tensors{{"C", C, dout}};
          };
          if (kind == 0)
            c.cpu = [=](const Tensors& in) {
              auto C = in[2].v;
              cpu::gemm(ta, tb, M, N, K, alpha, in[0].v.data(), lda, in[1].v.data(), ldb, beta, C.data(), ldc);
              return Tensors{{"C", C}};
            };
          if (kind == 1)
            c.cpu = [=](const Tensors& in) {
              auto C = in[2].v;
              std::vector<char> scratch(kLowpScratchBytes + 64);
              void* sp = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64);
              cpu::gemm_lowp(LowpType::BF16, ta, tb, M, N, K, alpha, f32_operand(in[0].v.data(), lda),
                             f32_operand(in[1].v.data(), ldb), beta, C.data(), ldc, sp);
              return Tensors{{"C", C}};
            };
          if (kind > 0)
            c.cuda = [=](const Tensors& in) {
              Dev A = up(in[0]), B = up(in[1]), C = up(in[2]);
              C.with([&](auto* cp) {
                cuda::gemm(ta, tb, M, N, K, alpha, A.h(), lda, B.h(), ldb, beta, cp, ldc, stream());
              });
              return Tensors{down("C", C)};
            };
          t.push_back(std::move(c));
        }

  // Linear layers (Conv1D layout, weight [C, OC]): forward with and without bias, the fused GELU
  // (OC % 8 == 0: cuBLASLt's epilogue; 36: the separate pass), the fused residual add; the backward
  // (dinp overwritten, dweight and dbias accumulated).
  struct L {
    int64_t N;
    int C, OC;
    bool bias;
  };
  for (L s : {L{37, 72, 200, true}, L{5, 64, 36, true}, L{16, 48, 64, false}})
    for (DType dt : {F32, BF16}) {
      const int64_t N = s.N;
      const int C = s.C, OC = s.OC;
      const bool has_bias = s.bias;
      const std::string name = fmt("N%ld C%d OC%d%s %s", long(N), C, OC, has_bias ? "" : " no bias", dtype_name(dt));
      const Tensor tin{"inp", randn(size_t(N * C), 111, 1.0f, dt), dt},
          tw{"weight", randn(size_t(C * OC), 112, 0.2f, dt), dt}, tb{"bias", randn(size_t(OC), 113)};
      auto scratch = [] {
        auto v = std::make_shared<std::vector<char>>(kLowpScratchBytes + 64);
        return v;
      };
      auto aligned = [](std::vector<char>& v) {
        return static_cast<void*>(v.data() + (64 - reinterpret_cast<uintptr_t>(v.data()) % 64));
      };
      auto to16 = [](const std::vector<float>& v) {
        std::vector<uint16_t> h(v.size());
        for (size_t i = 0; i < v.size(); i++) h[i] = f32_to_bf16(v[i]);
        return h;
      };
      OpFn fwd = [=](const Tensors& in) {
        std::vector<float> out(size_t(N * OC));
        ref::matmul_forward(out.data(), in[0].v.data(), in[1].v.data(), has_bias ? in[2].v.data() : nullptr, N, C, OC);
        return Tensors{{"out", out, dt}};
      };
      {
        OpCase c = make("matmul", name, Mode::Forward, {tin, tw, tb});
        c.k = ksum(C);  // the CPU's bf16 product writes fp32
        c.ref = fwd;
        c.cpu = [=](const Tensors& in) {
          std::vector<float> out(size_t(N * OC));
          const float* b = has_bias ? in[2].v.data() : nullptr;
          if (dt == F32) {
            cpu::matmul_forward(out.data(), in[0].v.data(), in[1].v.data(), b, N, C, OC);
          } else {
            auto sc = scratch();
            const auto w16 = to16(in[1].v);
            cpu::matmul_forward_lowp(out.data(), in[0].v.data(), w16.data(), b, N, C, OC, LowpType::BF16, aligned(*sc));
          }
          return Tensors{{"out", out}};
        };
        if (dt == BF16)
          c.cuda = [=](const Tensors& in) {
            Dev x = up(in[0]), w = up(in[1]), b = up(in[2]), out(size_t(N * OC), BF16);
            cuda::matmul_forward(out.h(), x.h(), w.h(), has_bias ? b.f() : nullptr, N, C, OC, stream());
            return Tensors{down("out", out)};
          };
        t.push_back(std::move(c));
      }
      if (dt == BF16) {
        // gelu_pre = inp·W + b, out = gelu_tanh(gelu_pre); the GPU rounds gelu_pre to bf16 (the separate
        // pass reads it back), which the yardstick's bf16 rounding of the product covers.
        OpCase c = make("matmul_gelu", name, Mode::Forward, {tin, tw, tb});
        c.ref = [=](const Tensors& in) {
          auto pre = fwd(in)[0].v;
          std::vector<float> out(pre.size());
          ref::gelu_forward(out.data(), pre.data(), int64_t(pre.size()));
          return Tensors{{"out", out, BF16}, {"gelu_pre", pre, BF16}};
        };
        c.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), w = up(in[1]), b = up(in[2]), out(size_t(N * OC), BF16), pre(size_t(N * OC), BF16);
          cuda::matmul_forward(out.h(), x.h(), w.h(), has_bias ? b.f() : nullptr, N, C, OC, stream(), pre.h());
          return Tensors{down("out", out), down("gelu_pre", pre)};
        };
        c.k = 2 * kfor(BF16, C);  // two roundings of the product (gelu_pre, then out) against the yardstick's one
        t.push_back(std::move(c));

        OpCase r =
            make("matmul_residual", name, Mode::Forward, {tin, tw, tb, {"residual", randn(size_t(N * OC), 114)}});
        r.k = ksum(C);
        r.ref = [=](const Tensors& in) {
          auto out = fwd(in)[0].v;
          for (size_t i = 0; i < out.size(); i++) out[i] = float(double(out[i]) + in[3].v[i]);
          return Tensors{{"out", out}};
        };
        r.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), w = up(in[1]), b = up(in[2]), res = up(in[3]);
          cuda::matmul_forward_residual(res.f(), res.f(), x.h(), w.h(), has_bias ? b.f() : nullptr, N, C, OC,
                                        stream());  // in place: out aliases the residual
          return Tensors{down("out", res)};
        };
        t.push_back(std::move(r));
      }
      {
        OpCase c = make("matmul", name, Mode::Gradient,
                        {tin,
                         tw,
                         tb,
                         {"dout", randn(size_t(N * OC), 115, 1.0f, dt), dt},
                         {"dweight0", randn(size_t(C * OC), 116)},
                         {"dbias0", randn(size_t(OC), 117)}});
        c.ref = [=](const Tensors& in) {
          std::vector<float> dx(size_t(N * C), 9.0f);
          auto dw = in[4].v, db = in[5].v;
          ref::matmul_backward(dx.data(), dw.data(), db.data(), in[3].v.data(), in[0].v.data(), in[1].v.data(), N, C,
                               OC);
          return Tensors{{"dinp", dx, dt}, {"dweight", dw}, {"dbias", db}};
        };
        c.cpu = [=](const Tensors& in) {
          std::vector<float> dx(size_t(N * C), 9.0f);  // overwritten
          auto dw = in[4].v, db = in[5].v;
          if (dt == F32) {
            cpu::matmul_backward(dx.data(), dw.data(), db.data(), in[3].v.data(), in[0].v.data(), in[1].v.data(), N, C,
                                 OC);
          } else {
            auto sc = scratch();
            const auto w16 = to16(in[1].v);
            cpu::matmul_backward_lowp(dx.data(), dw.data(), db.data(), in[3].v.data(), in[0].v.data(), w16.data(), N, C,
                                      OC, LowpType::BF16, aligned(*sc));
          }
          return Tensors{{"dinp", dx}, {"dweight", dw}, {"dbias", db}};
        };
        if (dt == BF16)
          c.cuda = [=](const Tensors& in) {
            Dev x = up(in[0]), w = up(in[1]), dy = up(in[3]), dw = up(in[4]), db = up(in[5]),
                dx = up(std::vector<float>(size_t(N * C), 9.0f), BF16);
            cuda::matmul_backward(dx.h(), dw.f(), db.f(), dy.h(), x.h(), w.h(), N, C, OC, stream());
            return Tensors{down("dinp", dx), down("dweight", dw), down("dbias", db)};
          };
        c.loss = dot_loss(fwd, 0, 3);
        c.grads = {{0, 0, -1}, {1, 1, 4}};
        if (has_bias) c.grads.push_back({2, 2, 5});
        c.k = ksum(double(std::max<int64_t>({N, C, OC})));
        t.push_back(std::move(c));
      }
    }
}

// --------------------------------------------------------------------------------------------- attention

struct Attn {
  int NH, NKV, HD;
  bool causal;
  int window;
  std::vector<int32_t> lens;  // sequence lengths
  bool packed;                // cu_seqlens (else B sequences of equal length)
  bool gpu;
  float scale_mul = 1.0f;  // > 1: peaky softmax (the running max moves between key tiles)
  int HDv = 0;             // value head dim (MLA); 0: HD
};

void add_attention(std::vector<OpCase>& t) {
  const Attn cases[] = {
      {2, 2, 64, true, 0, {70, 70}, false, true},         // MHA, two sequences, partial tiles
      {2, 2, 128, false, 0, {130}, false, true},          // HD 128, not causal, two key tiles
      {4, 1, 64, false, 0, {50}, false, true},            // MQA, not causal
      {4, 2, 64, true, 40, {150}, false, true},           // GQA, window inside the 128-row tile
      {2, 1, 128, true, 30, {1, 37, 0, 90}, true, true},  // packed (one empty), window, HD 128
      {2, 2, 64, false, 0, {5, 0, 65, 1}, true, true},    // packed, not causal
      {3, 1, 48, true, 0, {33, 33, 33}, false, false},    // CPU: HD 48 (not a tile multiple), B = 3
      {2, 2, 32, true, 7, {1}, false, false},             // CPU: T = 1
      {2, 1, 32, true, 0, {129}, false, false, 8.0f},     // CPU: large scores across key tiles
      {2, 2, 48, true, 0, {70, 70}, false, false, 1.0f, 32},  // CPU: MLA, q/k heads 48, v heads 32
      {4, 4, 32, true, 0, {5, 66, 0}, true, false, 1.0f, 64}, // CPU: MLA packed, v heads wider than q/k
      {2, 2, 64, true, 0, {70, 70}, false, true, 1.0f, 32},   // MLA: q/k heads 64, v heads 32 (both sides)
      {4, 4, 64, true, 0, {5, 66, 0}, true, true, 1.0f, 32},  // ... packed (one empty)
      {2, 2, 192, true, 0, {40}, false, true, 1.0f, 128},     // DeepSeek's 192/128
  };
  for (const Attn& a : cases)
    for (DType dt : {F32, BF16}) {
      if (dt == BF16 && !a.gpu) continue;
      const bool run_cpu = dt == F32, run_gpu = dt == BF16;
      std::vector<int32_t> cu{0};
      for (int32_t l : a.lens) cu.push_back(cu.back() + l);
      const int64_t N = cu.back();
      const int max_len = *std::max_element(a.lens.begin(), a.lens.end());
      AttentionParams p;
      p.NH = a.NH, p.NKV = a.NKV, p.HD = a.HD, p.causal = a.causal, p.window = a.window, p.HDv = a.HDv;
      p.scale = a.scale_mul / std::sqrt(float(a.HD));
      if (a.packed) {
        p.num_seqs = int(a.lens.size()), p.max_seqlen = max_len, p.total_tokens = N;
      } else {
        p.B = int(a.lens.size()), p.T = a.lens[0];
      }
      const int64_t L = qkv_row(p), C = attention_out_row(p);
      std::string lens;
      for (int32_t l : a.lens) {
        if (!lens.empty()) lens += ',';
        lens += std::to_string(l);
      }
      const std::string name =
          fmt("NH %d NKV %d HD %d%s %s w %d %s {%s}%s %s", a.NH, a.NKV, a.HD,
              a.HDv ? fmt(" HDv %d", a.HDv).c_str() : "", a.causal ? "causal" : "full", a.window,
              a.packed ? "packed" : "batched", lens.c_str(), a.scale_mul > 1 ? " x8" : "", dtype_name(dt));
      // fn(p with host cu_seqlens) for the host sides.
      auto host_p = [=](const std::vector<int32_t>& cuh) {
        AttentionParams q = p;
        if (a.packed) q.cu_seqlens = cuh.data();
        return q;
      };
      OpFn fwd = [=](const Tensors& in) {
        std::vector<float> out(size_t(N * C)), lse(size_t(a.NH * N));
        ref::attention_forward(out.data(), lse.data(), in[0].v.data(), host_p(cu));
        return Tensors{{"out", out, dt}, {"lse", lse}};
      };
      auto cpu_fwd = [=](const Tensors& in) {
        std::vector<float> out(size_t(N * C)), lse(size_t(a.NH * N));
        cpu::attention_forward(out.data(), lse.data(), in[0].v.data(), host_p(cu));
        return Tensors{{"out", out}, {"lse", lse}};
      };
      const Tensor tq{"qkv", randn(size_t(N * L), 201 + a.HD + a.NKV, 1.0f, dt), dt};
      {
        OpCase c = make("attention", name, Mode::Forward, {tq});
        c.k = kfor(dt, a.HD + max_len);  // a dot product of HD, then a sum over the keys
        c.ref = fwd;
        if (run_cpu) c.cpu = cpu_fwd;
        if (run_gpu)
          c.cuda = [=](const Tensors& in) {
            Dev qkv = up(in[0]), out(size_t(N * C), BF16), lse(size_t(a.NH * N), F32);
            DevInts dcu(cu);
            AttentionParams q = p;
            if (a.packed) q.cu_seqlens = dcu.get();
            cuda::attention_forward(out.h(), lse.f(), qkv.h(), q, stream());
            return Tensors{down("out", out), down("lse", lse)};
          };
        t.push_back(std::move(c));
      }
      {
        OpCase c = make("attention", name, Mode::Gradient, {tq, {"dout", randn(size_t(N * C), 202, 1.0f, dt), dt}});
        c.ref = [=](const Tensors& in) {
          const Tensors f = fwd(in);
          std::vector<float> dqkv(size_t(N * L));
          ref::attention_backward(dqkv.data(), in[1].v.data(), in[0].v.data(), f[0].v.data(), f[1].v.data(),
                                  host_p(cu));
          return Tensors{{"dqkv", dqkv, dt}};
        };
        if (run_cpu)
          c.cpu = [=](const Tensors& in) {
            const Tensors f = cpu_fwd(in);
            std::vector<float> dqkv(size_t(N * L));
            cpu::attention_backward(dqkv.data(), in[1].v.data(), in[0].v.data(), f[0].v.data(), f[1].v.data(),
                                    host_p(cu));
            return Tensors{{"dqkv", dqkv}};
          };
        if (run_gpu)
          c.cuda = [=](const Tensors& in) {
            Dev qkv = up(in[0]), dy = up(in[1]), out(size_t(N * C), BF16), lse(size_t(a.NH * N), F32),
                dqkv(size_t(N * L), BF16);
            DevInts dcu(cu);
            AttentionParams q = p;
            if (a.packed) q.cu_seqlens = dcu.get();
            gpu::DeviceBuffer scratch(std::max<size_t>(cuda::attention_backward_scratch_bytes(q), 4), "ops test");
            cuda::attention_forward(out.h(), lse.f(), qkv.h(), q, stream());
            cuda::attention_backward(dqkv.h(), dy.h(), qkv.h(), out.h(), lse.f(), q, scratch.data(), stream());
            return Tensors{down("dqkv", dqkv)};
          };
        c.loss = dot_loss(fwd, 0, 1);
        c.grads = {{0, 0, -1}};
        c.k = 3 * kfor(dt, a.HD + max_len);  // three chained reductions: D = rowsum(dO∘O), dP = dO·Vᵀ, then dS·K
        t.push_back(std::move(c));
      }
    }
}

// -------------------------------------------------------------------------------------- decode attention

void add_decode_attention(std::vector<OpCase>& t) {
  struct D {
    int NH, NKV, HD, Tq, window, cap;
    std::vector<int32_t> past;
    bool gpu;
    int HDv = 0;  // MLA: value heads of their own width (0: HD)
    std::vector<uint64_t> tree = {};  // tree attention: query i's mask over the new keys (empty: causal)
  };
  // Medusa-style candidate trees: node i sees its ancestors and itself. A root with two chains of 3 and 2, and
  // a 16-node tree (parents 0,0,0,1,1,2,4,4,5,7,7,8,10,11,13 for nodes 1..15).
  auto tree_of = [](const std::vector<int>& parent) {
    std::vector<uint64_t> m(parent.size() + 1, 1);
    for (size_t i = 1; i <= parent.size(); i++) m[i] = m[size_t(parent[i - 1])] | (uint64_t(1) << i);
    return m;
  };
  const std::vector<uint64_t> small_tree = tree_of({0, 1, 2, 0, 4});
  const std::vector<uint64_t> big_tree = tree_of({0, 0, 0, 1, 1, 2, 4, 4, 5, 7, 7, 8, 10, 11, 13});
  // 24 nodes (past the tensor-core kernel's 16 queries: cuda:: takes its SIMT kernel for every tree).
  const std::vector<uint64_t> wide_tree =
      tree_of({0, 0, 1, 1, 2, 3, 3, 4, 6, 6, 7, 8, 9, 9, 10, 12, 12, 13, 15, 16, 18, 19, 20});
  // 320 cached positions: 5 tiles, several splits merged; 16 queries continuing a prefix; HD 20: the CPU's
  // scalar path; a long cache with one head: the CPU's split path.
  const D cases[] = {
      {4, 2, 64, 1, 0, 320, {0, 300}, true},    {4, 1, 64, 3, 50, 320, {77, 250}, true},
      {4, 4, 128, 1, 130, 320, {0, 300}, true}, {2, 2, 64, 16, 0, 96, {5, 70}, true},
      {3, 1, 20, 2, 9, 64, {11, 40}, false},    {1, 1, 32, 1, 0, 4000, {3990}, false},
      {4, 1, 48, 2, 0, 320, {7, 300}, true, 32},   // MLA absorbed: one latent head, values narrower than keys
      {8, 1, 24, 1, 0, 4000, {3990}, false, 16},   // ... on the split path
      {2, 2, 32, 3, 0, 64, {0, 40}, true, 48},     // values wider than keys
      {4, 1, 80, 1, 0, 200, {0, 150}, true, 64},   // absorbed, kv_lora_rank 64 + rope 16 (the SIMT kernel)
      {4, 2, 64, 6, 0, 96, {5, 40}, true, 0, small_tree},  // tree attention
      {2, 1, 32, 16, 0, 600, {300, 7}, true, 0, big_tree},
      {4, 4, 128, 24, 0, 160, {100, 3}, true, 0, wide_tree},
  };
  for (const D& d : cases)
    for (DType dt : {F32, BF16}) {
      if (dt == BF16 && !d.gpu) continue;
      const int B = int(d.past.size());
      const int HDv = d.HDv ? d.HDv : d.HD;
      const int64_t L = int64_t(d.NH + 2 * d.NKV) * d.HD, KC = int64_t(d.NKV) * d.HD, C = int64_t(d.NH) * HDv;
      const int64_t VC = int64_t(d.NKV) * HDv;
      const float scale = 1.0f / std::sqrt(float(d.HD));
      std::string past;
      for (int32_t v : d.past) {
        if (!past.empty()) past += ',';
        past += std::to_string(v);
      }
      const std::string name = fmt("NH %d NKV %d HD %d HDv %d Tq %d w %d cap %d past {%s}%s %s", d.NH, d.NKV, d.HD,
                                   HDv, d.Tq, d.window, d.cap, past.c_str(), d.tree.empty() ? "" : " tree",
                                   dtype_name(dt));
      auto host = [=](auto fn, const Tensors& in) {
        DecodeAttentionParams p;
        p.B = B, p.Tq = d.Tq, p.past_per_seq = d.past.data(), p.NH = d.NH, p.HD = d.HD, p.NKV = d.NKV;
        p.window = d.window, p.scale = scale, p.q = in[0].v.data(), p.q_stride = L, p.k = in[1].v.data();
        p.v = in[2].v.data(), p.kv_batch_stride = d.cap * KC, p.kv_stride = KC;
        if (d.HDv) p.HDv = HDv, p.v_batch_stride = d.cap * VC, p.v_stride = VC;
        if (!d.tree.empty()) p.tree = d.tree.data();
        std::vector<float> out(size_t(B * d.Tq * C));
        p.out = out.data(), p.out_stride = C;
        fn(p);
        return out;
      };
      OpCase c = make("decode_attention", name, Mode::Forward,
                      {{"q", randn(size_t(B * d.Tq * L), 301 + d.HD, 1.0f, dt), dt},
                       {"k_cache", randn(size_t(B * d.cap * KC), 302, 1.0f, dt), dt},
                       {"v_cache", randn(size_t(B * d.cap * VC), 303, 1.0f, dt), dt}});
      c.k = kfor(dt, d.HD + d.cap);
      c.ref = [=](const Tensors& in) { return Tensors{{"out", host(ref::decode_attention, in), dt}}; };
      if (dt == F32) c.cpu = [=](const Tensors& in) { return Tensors{{"out", host(cpu::decode_attention, in)}}; };
      if (dt == BF16)
        c.cuda = [=](const Tensors& in) {
          Dev q = up(in[0]), k = up(in[1]), v = up(in[2]), out(size_t(B * d.Tq * C), BF16);
          DevInts dp(d.past);
          cuda::DecodeAttention p;
          p.B = B, p.Tq = d.Tq, p.past_per_seq = dp.get(), p.max_past = d.cap, p.NH = d.NH, p.NKV = d.NKV;
          p.HD = d.HD, p.window = d.window, p.scale = scale, p.q = q.h(), p.q_stride = L, p.k = k.h(), p.v = v.h();
          p.kv_batch_stride = d.cap * KC, p.kv_stride = KC, p.out = out.h(), p.out_stride = C;
          if (d.HDv) p.HDv = HDv, p.v_batch_stride = d.cap * VC, p.v_stride = VC;
          gpu::DeviceBuffer tree(std::max<size_t>(d.tree.size() * sizeof(uint64_t), 8), "ops test");
          if (!d.tree.empty()) {
            gpu::copy_to_device(tree.data(), d.tree.data(), d.tree.size() * sizeof(uint64_t));
            p.tree = tree.as<uint64_t>();
          }
          gpu::DeviceBuffer scratch(std::max<size_t>(cuda::decode_attention_scratch_bytes(p), 4), "ops test");
          cuda::decode_attention(p, scratch.data(), stream());
          return Tensors{down("out", out)};
        };
      t.push_back(std::move(c));
    }

  // A paged cache: the same attention with each sequence's positions in blocks of 64 scattered over a pool
  // through a block table. The reference gathers the blocks back into the contiguous layout and runs the
  // contiguous reference; cpu:: and cuda:: read the pool through the table. Head dims other than 64 and 128
  // and trees take cuda::'s SIMT kernel (the paged decoder's Medusa trees and latent attention).
  struct P {
    int NH, NKV, Tq, window;
    std::vector<int32_t> past;
    int HD = 64;
    std::vector<uint64_t> tree = {};
  };
  for (const P& d : {P{4, 2, 1, 0, {0, 300}}, P{4, 1, 3, 50, {77, 250}}, P{2, 2, 16, 0, {5, 130}},
                     P{2, 1, 2, 0, {70, 190}, 96}, P{4, 2, 6, 0, {64, 130}, 64, small_tree},
                     P{2, 2, 16, 0, {127, 5}, 64, big_tree}})
    for (DType dt : {F32, BF16}) {
      const int B = int(d.past.size()), HD = d.HD, bs = 64, per_seq = 5, pool = 13, cap = per_seq * bs;
      const int64_t L = int64_t(d.NH + 2 * d.NKV) * HD, KC = int64_t(d.NKV) * HD, C = int64_t(d.NH) * HD;
      // Block ids: sequence b's i-th block is (7·(b·per_seq + i) + 3) mod pool (a permutation, pool prime).
      std::vector<int32_t> table(size_t(B * per_seq));
      for (int i = 0; i < B * per_seq; i++) table[size_t(i)] = (7 * i + 3) % pool;
      const float scale = 1.0f / std::sqrt(float(HD));
      const std::string name = fmt("paged NH %d NKV %d HD %d Tq %d w %d past {%d,%d}%s %s", d.NH, d.NKV, HD, d.Tq,
                                   d.window, d.past[0], d.past[1], d.tree.empty() ? "" : " tree", dtype_name(dt));
      auto params = [=](const float* q, const float* k, const float* v, float* out) {
        DecodeAttentionParams p;
        p.B = B, p.Tq = d.Tq, p.past_per_seq = d.past.data(), p.NH = d.NH, p.HD = HD, p.NKV = d.NKV;
        p.window = d.window, p.scale = scale, p.q = q, p.q_stride = L, p.k = k, p.v = v, p.kv_stride = KC;
        p.out = out, p.out_stride = C;
        if (!d.tree.empty()) p.tree = d.tree.data();
        return p;
      };
      OpCase c = make("decode_attention", name, Mode::Forward,
                      {{"q", randn(size_t(B * d.Tq * L), 311, 1.0f, dt), dt},
                       {"k_pool", randn(size_t(pool * bs * KC), 312, 1.0f, dt), dt},
                       {"v_pool", randn(size_t(pool * bs * KC), 313, 1.0f, dt), dt}});
      c.k = kfor(dt, HD + cap);
      c.ref = [=](const Tensors& in) {
        std::vector<float> k(size_t(B * cap * KC)), v(k.size()), out(size_t(B * d.Tq * C));
        for (int b = 0; b < B; b++)
          for (int i = 0; i < per_seq; i++) {
            const size_t src = size_t(table[size_t(b * per_seq + i)]) * bs * KC, dst = size_t(b * cap + i * bs) * KC;
            std::copy_n(in[1].v.begin() + long(src), bs * KC, k.begin() + long(dst));
            std::copy_n(in[2].v.begin() + long(src), bs * KC, v.begin() + long(dst));
          }
        DecodeAttentionParams p = params(in[0].v.data(), k.data(), v.data(), out.data());
        p.kv_batch_stride = cap * KC;
        ref::decode_attention(p);
        return Tensors{{"out", out, dt}};
      };
      if (dt == F32)
        c.cpu = [=](const Tensors& in) {
          std::vector<float> out(size_t(B * d.Tq * C));
          DecodeAttentionParams p = params(in[0].v.data(), in[1].v.data(), in[2].v.data(), out.data());
          p.pages = KVPages{table.data(), bs, per_seq};
          cpu::decode_attention(p);
          return Tensors{{"out", out}};
        };
      if (dt == BF16)
        c.cuda = [=](const Tensors& in) {
          Dev q = up(in[0]), k = up(in[1]), v = up(in[2]), out(size_t(B * d.Tq * C), BF16);
          DevInts dp(d.past), dt_(table);
          cuda::DecodeAttention p;
          p.B = B, p.Tq = d.Tq, p.past_per_seq = dp.get(), p.max_past = cap, p.NH = d.NH, p.NKV = d.NKV;
          p.HD = HD, p.window = d.window, p.scale = scale, p.q = q.h(), p.q_stride = L, p.k = k.h(), p.v = v.h();
          p.kv_stride = KC, p.out = out.h(), p.out_stride = C;
          p.pages = KVPages{dt_.get(), bs, per_seq};
          gpu::DeviceBuffer tree(std::max<size_t>(d.tree.size() * sizeof(uint64_t), 8), "ops test");
          if (!d.tree.empty()) {
            gpu::copy_to_device(tree.data(), d.tree.data(), d.tree.size() * sizeof(uint64_t));
            p.tree = tree.as<uint64_t>();
          }
          gpu::DeviceBuffer scratch(std::max<size_t>(cuda::decode_attention_scratch_bytes(p), 4), "ops test");
          cuda::decode_attention(p, scratch.data(), stream());
          return Tensors{down("out", out)};
        };
      t.push_back(std::move(c));
    }

  // The KV-cache append: the new keys and values of the fused QKV rows copied to each sequence's position.
  struct A {
    int NH, NKV, HD;
  };
  for (A a : {A{2, 2, 64}, A{4, 2, 64}, A{4, 1, 128}}) {
    const int B = 2, Tq = 3, cap = 16;
    const std::vector<int32_t> past = {3, 10};
    const int64_t L = int64_t(a.NH + 2 * a.NKV) * a.HD, KC = int64_t(a.NKV) * a.HD;
    OpCase c = make("kv_append", fmt("NH %d NKV %d HD %d", a.NH, a.NKV, a.HD), Mode::Forward,
                    {{"qkv", randn(size_t(B * Tq * L), 51, 1.0f, BF16), BF16},
                     {"k_cache", randn(size_t(B * cap * KC), 52, 1.0f, BF16), BF16},
                     {"v_cache", randn(size_t(B * cap * KC), 53, 1.0f, BF16), BF16}});
    c.exact = true;
    c.ref = [=](const Tensors& in) {
      auto kc = in[1].v, vc = in[2].v;
      for (int b = 0; b < B; b++)
        for (int i = 0; i < Tq; i++)
          for (int64_t e = 0; e < KC; e++) {
            const int64_t row = b * Tq + i, at = (b * cap + past[size_t(b)] + i) * KC + e;
            kc[size_t(at)] = in[0].v[size_t(row * L + a.NH * a.HD + e)];
            vc[size_t(at)] = in[0].v[size_t(row * L + a.NH * a.HD + KC + e)];
          }
      return Tensors{{"k_cache", kc, BF16}, {"v_cache", vc, BF16}};
    };
    c.cuda = [=](const Tensors& in) {
      Dev qkv = up(in[0]), k = up(in[1]), v = up(in[2]);
      DevInts dp(past);
      cuda::kv_cache_append(k.h(), v.h(), qkv.h(), dp.get(), B, Tq, a.NH, a.NKV, a.HD, cap * KC, stream());
      return Tensors{down("k_cache", k), down("v_cache", v)};
    };
    t.push_back(std::move(c));
  }
}

// The paged KV-cache append: the same copy into the blocks a table names (blocks of 64, scattered).
void add_kv_append_paged(std::vector<OpCase>& t) {
  const int B = 2, Tq = 3, NH = 4, NKV = 2, HD = 64, bs = 64, per_seq = 2, pool = 5;
  const std::vector<int32_t> past = {62, 100}, table = {3, 0, 4, 1};  // sequence 0 crosses a block boundary
  const int64_t L = int64_t(NH + 2 * NKV) * HD, KC = int64_t(NKV) * HD;
  for (DType dt : {F32, BF16}) {
    OpCase c = make("kv_append", fmt("paged %s", dtype_name(dt)), Mode::Forward,
                    {{"qkv", randn(size_t(B * Tq * L), 54, 1.0f, dt), dt},
                     {"k_pool", randn(size_t(pool * bs * KC), 55, 1.0f, dt), dt},
                     {"v_pool", randn(size_t(pool * bs * KC), 56, 1.0f, dt), dt}});
    c.exact = true;
    c.ref = [=](const Tensors& in) {
      auto kc = in[1].v, vc = in[2].v;
      for (int b = 0; b < B; b++)
        for (int i = 0; i < Tq; i++) {
          const int j = past[size_t(b)] + i;
          const int64_t row = b * Tq + i, at = (int64_t(table[size_t(b * per_seq + j / bs)]) * bs + j % bs) * KC;
          for (int64_t e = 0; e < KC; e++) {
            kc[size_t(at + e)] = in[0].v[size_t(row * L + NH * HD + e)];
            vc[size_t(at + e)] = in[0].v[size_t(row * L + NH * HD + KC + e)];
          }
        }
      return Tensors{{"k_pool", kc, dt}, {"v_pool", vc, dt}};
    };
    if (dt == F32)
      c.cpu = [=](const Tensors& in) {
        auto be = nn::make_cpu_backend();
        auto qkv = in[0].v, kc = in[1].v, vc = in[2].v;
        be->kv_append(nn::Act{kc.data(), kiln::DType::F32}, nn::Act{vc.data(), kiln::DType::F32}, 0,
                      nn::Act{qkv.data(), kiln::DType::F32}, NH, NKV, HD, B, Tq, past.data(),
                      KVPages{table.data(), bs, per_seq});
        return Tensors{{"k_pool", kc}, {"v_pool", vc}};
      };
    if (dt == BF16)
      c.cuda = [=](const Tensors& in) {
        Dev qkv = up(in[0]), k = up(in[1]), v = up(in[2]);
        DevInts dp(past), dtab(table);
        cuda::kv_cache_append(k.h(), v.h(), qkv.h(), dp.get(), B, Tq, NH, NKV, HD, 0, stream(),
                              KVPages{dtab.get(), bs, per_seq});
        return Tensors{down("k_pool", k), down("v_pool", v)};
      };
    t.push_back(std::move(c));
  }
}

// ------------------------------------------------------------------------- latent attention's row glue

// sum_heads (the shared rotary key's gradient summed over the heads' rows) and rows_append (latent rows into a
// per-sequence cache at each sequence's cached length), through the backends' ops against naive loops.
void add_latent_glue(std::vector<OpCase>& t) {
  struct S {
    int64_t N;
    int heads, width;
    int64_t ld_in, head_stride, ld_out;
  };
  for (S c0 : {S{37, 4, 16, 4 * 48 + 8, 48, 80}, S{5, 1, 64, 64, 0, 64}, S{300, 16, 64, 16 * 192, 192, 576}})
    for (DType dt : {F32, BF16}) {
      const S c = c0;
      OpCase oc = make("sum_heads", fmt("N %lld heads %d width %d %s", (long long)c.N, c.heads, c.width,
                                        dtype_name(dt)),
                       Mode::Forward, {{"in", randn(size_t(c.N * c.ld_in), 61 + c.heads, 1.0f, dt), dt}});
      oc.k = kfor(dt, c.heads);
      const int64_t out_n = c.N * c.ld_out;
      oc.ref = [=](const Tensors& in) {
        std::vector<float> out(static_cast<size_t>(out_n));
        for (int64_t n = 0; n < c.N; n++)
          for (int d = 0; d < c.width; d++) {
            double s = 0;
            for (int h = 0; h < c.heads; h++) s += in[0].v[size_t(n * c.ld_in + h * c.head_stride + d)];
            out[size_t(n * c.ld_out + d)] = float(s);
          }
        return Tensors{{"out", out, dt}};
      };
      if (dt == F32)
        oc.cpu = [=](const Tensors& in) {
          auto be = nn::make_cpu_backend();
          std::vector<float> x = in[0].v, out(static_cast<size_t>(out_n));
          be->sum_heads(nn::Act{out.data(), kiln::DType::F32}, c.ld_out, nn::Act{x.data(), kiln::DType::F32}, c.ld_in,
                        c.N, c.heads, c.head_stride, c.width);
          return Tensors{{"out", out}};
        };
      if (dt == BF16)
        oc.cuda = [=](const Tensors& in) {
          Dev x = up(in[0]), out(size_t(out_n), BF16);
          gpu::memset(out.ptr(), 0, size_t(out_n) * 2);
          cuda::sum_heads(out.h(), c.ld_out, x.h(), c.ld_in, c.N, c.heads, c.head_stride, c.width, stream());
          return Tensors{down("out", out)};
        };
      t.push_back(std::move(oc));
    }
  // rows_append: B = 3 sequences of Tq = 2 new rows (stride 40, width 24) into a cache of 10 positions each.
  const int B = 3, Tq = 2, W = 24, cap = 10;
  const int64_t ld = 40, bs = int64_t(cap) * W;
  const std::vector<int32_t> past = {0, 7, 3};
  for (DType dt : {F32, BF16}) {
    OpCase c = make("rows_append", fmt("B %d Tq %d width %d %s", B, Tq, W, dtype_name(dt)), Mode::Forward,
                    {{"src", randn(size_t(B * Tq * ld), 71, 1.0f, dt), dt},
                     {"cache", randn(size_t(B * bs), 72, 1.0f, dt), dt}});
    c.exact = true;
    c.ref = [=](const Tensors& in) {
      auto cache = in[1].v;
      for (int b = 0; b < B; b++)
        for (int i = 0; i < Tq; i++)
          for (int d = 0; d < W; d++)
            cache[size_t(b * bs + (past[size_t(b)] + i) * W + d)] = in[0].v[size_t((b * Tq + i) * ld + d)];
      return Tensors{{"cache", cache, dt}};
    };
    if (dt == F32)
      c.cpu = [=](const Tensors& in) {
        auto be = nn::make_cpu_backend();
        auto src = in[0].v, cache = in[1].v;
        be->rows_append(nn::Act{cache.data(), kiln::DType::F32}, bs, nn::Act{src.data(), kiln::DType::F32}, ld, W, B,
                        Tq, past.data());
        return Tensors{{"cache", cache}};
      };
    if (dt == BF16)
      c.cuda = [=](const Tensors& in) {
        Dev src = up(in[0]), cache = up(in[1]);
        DevInts dp(past);
        cuda::rows_append(cache.h(), bs, src.h(), ld, W, B, Tq, dp.get(), stream());
        return Tensors{down("cache", cache)};
      };
    t.push_back(std::move(c));
  }
  // The same rows into a paged cache: a pool of 8 blocks of 4 rows, each sequence's 3 blocks scattered over it
  // (sequence 1's rows 7 and 8 straddle its second and third blocks).
  const int block = 4, per_seq = 3, pool = 8;
  const std::vector<int32_t> table = {5, 1, 7, 2, 6, 0, 3, 4, 1};
  for (DType dt : {F32, BF16}) {
    OpCase c = make("rows_append", fmt("paged B %d Tq %d width %d %s", B, Tq, W, dtype_name(dt)), Mode::Forward,
                    {{"src", randn(size_t(B * Tq * ld), 73, 1.0f, dt), dt},
                     {"cache", randn(size_t(pool * block * W), 74, 1.0f, dt), dt}});
    c.exact = true;
    c.ref = [=](const Tensors& in) {
      auto cache = in[1].v;
      for (int b = 0; b < B; b++)
        for (int i = 0; i < Tq; i++) {
          const int j = past[size_t(b)] + i, row = table[size_t(b * per_seq + j / block)] * block + j % block;
          for (int d = 0; d < W; d++) cache[size_t(row * W + d)] = in[0].v[size_t((b * Tq + i) * ld + d)];
        }
      return Tensors{{"cache", cache, dt}};
    };
    if (dt == F32)
      c.cpu = [=](const Tensors& in) {
        auto be = nn::make_cpu_backend();
        auto src = in[0].v, cache = in[1].v;
        be->rows_append(nn::Act{cache.data(), kiln::DType::F32}, 0, nn::Act{src.data(), kiln::DType::F32}, ld, W, B,
                        Tq, past.data(), KVPages{table.data(), block, per_seq});
        return Tensors{{"cache", cache}};
      };
    if (dt == BF16)
      c.cuda = [=](const Tensors& in) {
        Dev src = up(in[0]), cache = up(in[1]);
        DevInts dp(past), dtab(table);
        cuda::rows_append(cache.h(), 0, src.h(), ld, W, B, Tq, dp.get(), stream(), KVPages{dtab.get(), block, per_seq});
        return Tensors{down("cache", cache)};
      };
    t.push_back(std::move(c));
  }
}

// --------------------------------------------------------------------------------------------- embedding

void add_embedding(std::vector<OpCase>& t) {
  struct E {
    int64_t N;
    int C, V, T;
    bool wpe;
  };
  // 72, 256: vector paths; 50: scalar; 2100 rows pad to 4096 sort keys (two chunks merged); no wpe: rotary.
  for (E e : {E{300, 72, 97, 64, true}, E{129, 256, 50, 40, true}, E{77, 50, 30, 16, true}, E{2100, 8, 300, 128, true},
              E{40, 24, 11, 1, false}}) {
    const int64_t N = e.N;
    const int C = e.C;
    const bool has_wpe = e.wpe;
    Rng r(51 + uint64_t(N) + uint64_t(C));
    std::vector<int32_t> tok(static_cast<size_t>(N)), pos(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; n++) {
      // A third of the rows share one hot token (a long run for one thread group); the rest spread out.
      tok[size_t(n)] = (r.next_u64() % 3 == 0) ? 7 % e.V : int32_t(r.next_u64() % uint64_t(e.V));
      pos[size_t(n)] = int32_t(n % e.T);
    }
    const std::string name = fmt("N%ld C%d V%d T%d%s", long(N), C, e.V, e.T, has_wpe ? "" : " no wpe");
    const Tensor twte{"wte", randn(size_t(e.V) * C, 52)}, twpe{"wpe", randn(size_t(e.T) * C, 53)};
    OpFn fwd = [=](const Tensors& in) {
      std::vector<float> out(size_t(N * C));
      ref::embedding_forward(out.data(), tok.data(), pos.data(), in[0].v.data(), has_wpe ? in[1].v.data() : nullptr, N,
                             C);
      return Tensors{{"out", out}};
    };
    {
      OpCase c = make("embedding", name, Mode::Forward, {twte, twpe});
      c.exact = true;  // one fp32 addition
      c.ref = fwd;
      c.cpu = [=](const Tensors& in) {
        std::vector<float> out(size_t(N * C));
        cpu::embedding_forward(out.data(), tok.data(), pos.data(), in[0].v.data(), has_wpe ? in[1].v.data() : nullptr,
                               N, C);
        return Tensors{{"out", out}};
      };
      c.cuda = [=](const Tensors& in) {
        Dev wte = up(in[0]), wpe = up(in[1]), out(size_t(N * C), F32);
        DevInts dt(tok), dp(pos);
        cuda::embedding_forward(out.f(), dt.get(), dp.get(), wte.f(), has_wpe ? wpe.f() : nullptr, N, C, stream());
        return Tensors{down("out", out)};
      };
      t.push_back(std::move(c));
    }
    {
      OpCase c = make("embedding", name, Mode::Gradient,
                      {twte,
                       twpe,
                       {"dout", randn(size_t(N * C), 54)},
                       {"dwte0", randn(twte.v.size(), 55)},
                       {"dwpe0", randn(twpe.v.size(), 56)}});
      c.ref = [=](const Tensors& in) {
        auto dwte = in[3].v, dwpe = in[4].v;
        ref::embedding_backward(dwte.data(), has_wpe ? dwpe.data() : nullptr, in[2].v.data(), tok.data(), pos.data(), N,
                                C);
        return Tensors{{"dwte", dwte}, {"dwpe", dwpe}};
      };
      c.cpu = [=](const Tensors& in) {
        auto dwte = in[3].v, dwpe = in[4].v;
        cpu::embedding_backward(dwte.data(), has_wpe ? dwpe.data() : nullptr, in[2].v.data(), tok.data(), pos.data(), N,
                                C);
        return Tensors{{"dwte", dwte}, {"dwpe", dwpe}};
      };
      c.cuda = [=](const Tensors& in) {
        Dev dy = up(in[2]), dwte = up(in[3]), dwpe = up(in[4]);
        DevInts dt(tok), dp(pos);
        gpu::DeviceBuffer scratch(std::max<size_t>(cuda::embedding_backward_scratch_bytes(N), 4), "ops test");
        cuda::embedding_backward(dwte.f(), has_wpe ? dwpe.f() : nullptr, dy.f(), dt.get(), dp.get(), N, C,
                                 scratch.data(), stream());
        return Tensors{down("dwte", dwte), down("dwpe", dwpe)};
      };
      c.loss = dot_loss(fwd, 0, 2);
      c.grads = {{0, 0, 3}};
      c.k = ksum(double(N));  // a hot token's rows summed
      if (has_wpe) c.grads.push_back({1, 1, 4});
      t.push_back(std::move(c));
    }
  }
}

// ---------------------------------------------------------------------------------------- cross-entropy

void add_crossentropy(std::vector<OpCase>& t) {
  struct X {
    int64_t N;
    int V;
    int64_t ld;
    bool gpu;
  };
  // 1000/1024: vector path with 24 padding columns; 1000/1001: scalar (rows misaligned); 5000/5008: several
  // vectors per thread; 37/40: one warp; 300×517: CPU threads.
  for (X x : {X{6, 1000, 1024, true}, X{5, 1000, 1001, true}, X{4, 5000, 5008, true}, X{5, 37, 40, true},
              X{300, 517, 520, false}})
    for (DType dt : {F32, BF16}) {
      if (dt == BF16 && !x.gpu) continue;
      const int64_t N = x.N, ld = x.ld;
      const int V = x.V;
      auto logits = randn(size_t(N * ld), 61 + V, 3.0f, dt);
      // Padding that would dominate if read as logits (exact in bf16).
      for (int64_t n = 0; n < N; n++)
        for (int64_t c = V; c < ld; c++) logits[size_t(n * ld + c)] = 8192.0f;
      Rng r(62);
      std::vector<int32_t> tgt(static_cast<size_t>(N));
      for (auto& v : tgt) v = int32_t(r.next_u64() % uint64_t(V));
      tgt[1] = -1;  // ignored row
      tgt[size_t(N - 1)] = V - 1;
      int valid = 0;
      for (int32_t v : tgt) valid += v >= 0;
      const float gs = 1.0f / float(valid);  // the mean over the rows that count, as the trainer takes it
      const std::string name = fmt("N%ld V%d ld %ld %s", long(N), V, long(ld), dtype_name(dt));
      // Returns {losses, logits after the call}.
      auto host = [=](auto fn, const Tensors& in, float scale) {
        auto l = in[0].v;
        std::vector<float> losses(static_cast<size_t>(N));
        fn(l.data(), losses.data(), tgt.data(), N, V, ld, scale);
        return Tensors{{"losses", losses}, {"logits", l, dt}};
      };
      auto dev = [=](const Tensors& in, float scale) {
        Dev l = up(in[0]), losses = up(std::vector<float>(size_t(N), 123.0f), F32);
        DevInts dt(tgt);
        l.with([&](auto* p) { cuda::softmax_crossentropy(p, losses.f(), dt.get(), N, V, ld, scale, stream()); });
        return Tensors{down("losses", losses), down("logits", l)};
      };
      using Fn = void (*)(float*, float*, const int32_t*, int64_t, int, int64_t, float);
      const Fn ref_fn = ref::softmax_crossentropy, cpu_fn = cpu::softmax_crossentropy;
      const Tensor tl{"logits", logits, dt};
      {
        // Without a gradient: the losses, and the logits left untouched.
        OpCase c = make("crossentropy", name, Mode::Forward, {tl});
        c.k = ksum(V);
        c.exact_outputs = {1};
        c.ref = [=](const Tensors& in) { return host(ref_fn, in, 0.0f); };
        if (dt == F32) c.cpu = [=](const Tensors& in) { return host(cpu_fn, in, 0.0f); };
        if (x.gpu) c.cuda = [=](const Tensors& in) { return dev(in, 0.0f); };
        t.push_back(std::move(c));
      }
      {
        // The gradient of mean loss in place of the logits; padding columns and the ignored row get zero.
        OpCase c = make("crossentropy", name, Mode::Gradient, {tl});
        c.k = kfor(dt, V);
        // cpu:: and ref:: leave the padding columns as they were (cuda:: zeroes them): their gradient is zero.
        auto zero_pad = [=](Tensor g) {
          for (int64_t n = 0; n < N; n++)
            for (int64_t c = V; c < ld; c++) g.v[size_t(n * ld + c)] = 0.0f;
          return Tensors{g};
        };
        c.ref = [=](const Tensors& in) { return zero_pad(host(ref_fn, in, gs)[1]); };
        if (dt == F32) c.cpu = [=](const Tensors& in) { return zero_pad(host(cpu_fn, in, gs)[1]); };
        if (x.gpu) c.cuda = [=](const Tensors& in) { return Tensors{dev(in, gs)[1]}; };
        c.loss = [=](const Tensors& in, double* sq) {
          const auto l = host(ref_fn, in, 0.0f)[0].v;
          double s = 0;
          *sq = 0;
          for (float v : l) s += double(v) * gs, *sq += std::pow(double(v) * gs, 2);
          return s;
        };
        c.grads = {{0, 0, -1}};
        c.fd_h = 1e-2;  // absolute: the padding's 8192 would inflate a step relative to the rms
        t.push_back(std::move(c));
      }
    }
}

// ------------------------------------------------------------------------------------------------- adamw

void add_adamw(std::vector<OpCase>& t) {
  struct S {
    int64_t n;
    int off;
    bool zero, p16, gpu;
  };
  for (S s : {S{1003, 0, false, true, true}, S{1003, 1, true, true, true}, S{1003, 0, false, false, true},
              S{40003, 0, true, false, false}}) {
    AdamWHyper h;
    h.lr = 1e-2f, h.weight_decay = 0.1f, h.t = 3, h.grad_scale = 0.5f, h.zero_grad = s.zero;
    const int64_t n = s.n;
    const int off = s.off;
    const bool p16 = s.p16;
    auto v = randn(size_t(n), 74, 0.1f);
    for (auto& e : v) e = e * e;
    OpCase c = make(
        "adamw", fmt("n %ld off %d%s%s", long(n), off, s.zero ? " zero_grad" : "", p16 ? " param16" : ""),
        Mode::Forward,
        {{"param", randn(size_t(n), 71)}, {"grad", randn(size_t(n), 72)}, {"m", randn(size_t(n), 73, 0.1f)}, {"v", v}});
    c.ref = [=](const Tensors& in) {
      auto p = in[0].v, g = in[1].v, m = in[2].v, vv = in[3].v;
      ref::adamw_update(p.data(), g.data(), m.data(), vv.data(), n, h);
      if (h.zero_grad) std::fill(g.begin(), g.end(), 0.0f);
      return Tensors{{"param", p}, {"m", m}, {"v", vv}, {"grad", g}};
    };
    c.cpu = [=](const Tensors& in) {
      auto p = in[0].v, g = in[1].v, m = in[2].v, vv = in[3].v;
      cpu::adamw_update(p.data(), g.data(), m.data(), vv.data(), n, h);
      return Tensors{{"param", p}, {"m", m}, {"v", vv}, {"grad", g}};
    };
    if (s.gpu)
      c.cuda = [=](const Tensors& in) {
        Dev p = up(in[0], off), g = up(in[1], off), m = up(in[2], off), vv = up(in[3], off), h16(size_t(n), BF16, off);
        cuda::adamw_update(p.f(), p16 ? h16.h() : nullptr, g.f(), m.f(), vv.f(), n, h, stream());
        Tensors r{down("param", p), down("m", m), down("v", vv), down("grad", g)};
        if (p16) {
          // The bf16 copy is the updated parameter rounded: a property of this backend alone.
          const Tensor c16 = down("param16", h16);
          for (int64_t i = 0; i < n; i++)
            KILN_CHECK(c16.v[size_t(i)] == round_bf16(r[0].v[size_t(i)]), "adamw: param16[", i,
                       "] is not the rounded parameter");
        }
        return r;
      };
    t.push_back(std::move(c));
  }

  // The global gradient norm's sum of squares (the CUDA one adds into its output).
  for (int64_t n : {int64_t(5), int64_t(100003)})
    for (int off : {0, 1}) {
      OpCase c = make("sum_squares", fmt("n %ld off %d", long(n), off), Mode::Forward,
                      {{"x", randn(size_t(n), 81 + uint64_t(n))}});
      c.ref = [=](const Tensors& in) { return Tensors{{"sum", {float(1.5 + ref::sum_squares(in[0].v.data(), n))}}}; };
      c.cpu = [=](const Tensors& in) { return Tensors{{"sum", {float(1.5 + cpu::sum_squares(in[0].v.data(), n))}}}; };
      c.cuda = [=](const Tensors& in) {
        Dev x = up(in[0], off), out = up(std::vector<float>{1.5f}, F32),
            scratch(cuda::sum_squares_scratch_floats(n), F32);
        cuda::sum_squares(out.f(), x.f(), n, scratch.f(), stream());
        return Tensors{down("sum", out)};
      };
      t.push_back(std::move(c));
    }
}

}  // namespace

// ------------------------------------------------------------------------------------ narrow-weight gemm

// The weight arrives as fp32 and each side converts it the same way (narrow_convert is deterministic), so all
// read the same narrow matrix. Shapes: a column tail (29, 200), two 16-column chunks (96), GPT-2's width; row
// counts 1 (decoding), 3, 8 (a verification pass) and kNarrowDirectRows + 1 (cpu:: keeps x in fp32 there, so
// the q8_0 case runs on ref and cuda only).
void add_narrow_gemm(std::vector<OpCase>& t) {
  struct S {
    int64_t M, K, N;
  };
  for (WeightFormat f : {WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0})
    for (S sh : {S{70, 96, 1}, S{33, 29, 3}, S{130, 768, 8}, S{20, 200, kNarrowDirectRows + 1}}) {
      const int64_t M = sh.M, K = sh.K, N = sh.N;
      const bool acc = N % 2 == 1;
      OpCase c = make("narrow_gemm", fmt("%s M%ld K%ld N%ld%s", weight_format_name(f), long(M), long(K), long(N),
                                         acc ? " accumulate" : ""),
                      Mode::Forward,
                      {{"x", randn(size_t(N * K), 81)},
                       {"w", randn(size_t(M * K), 82, 0.1f)},
                       {"bias", randn(size_t(M), 83)},
                       {"y0", randn(size_t(N * M), 84)}});
      auto host = [=](const Tensors& in, bool use_ref) {
        std::vector<uint8_t> storage(narrow_bytes(f, M, K));
        const NarrowMatrix A = narrow_convert(storage.data(), f, in[1].v.data(), M, K, false);
        std::vector<float> y = in[3].v;
        if (use_ref)
          ref::narrow_gemm(y.data(), M, in[0].v.data(), K, N, A, in[2].v.data(), acc);
        else
          cpu::narrow_gemm(y.data(), M, in[0].v.data(), K, N, A, in[2].v.data(), acc);
        return Tensors{{"y", y}};
      };
      c.ref = [=](const Tensors& in) { return host(in, true); };
      if (!(f == WeightFormat::Q8_0 && N > kNarrowDirectRows)) c.cpu = [=](const Tensors& in) { return host(in, false); };
      c.cuda = [=](const Tensors& in) {
        std::vector<uint8_t> storage(narrow_bytes(f, M, K));
        NarrowMatrix A = narrow_convert(storage.data(), f, in[1].v.data(), M, K, false);
        gpu::DeviceBuffer dq(storage.size(), "ops test");
        gpu::copy_to_device(dq.data(), storage.data(), storage.size());
        // The same layout on the device: q at the start, d at its offset.
        const size_t d_off = A.d ? size_t(reinterpret_cast<const uint8_t*>(A.d) - storage.data()) : 0;
        A.q = dq.data();
        if (A.d) A.d = reinterpret_cast<const uint16_t*>(static_cast<const uint8_t*>(dq.data()) + d_off);
        Dev x = up(in[0]), b = up(in[2]), y = up(in[3]);
        gpu::DeviceBuffer scratch(cuda::narrow_gemm_scratch_bytes(N, K), "ops test");
        cuda::narrow_gemm(y.f(), M, x.f(), K, N, A, b.f(), acc, scratch.data(), stream());
        return Tensors{down("y", y)};
      };
      c.k = ksum(double(K));
      t.push_back(std::move(c));
    }
}

// ------------------------------------------------------------------------------- decoding-batch products

// vecmat_batch (W [K, N]) and matvec_batch (A [M, K]) at R rows, with row strides wider than the rows (x and y
// inside larger buffers, as a verification pass's rows are). Shapes: tails in every dimension (N 29, 100 = one
// 64-tile + 36; M 70 = 17 tiles of 4 + 2; K 29 < 16·2), GPT-2's width, and R = 1, 5, 7 and 16 (register-tile tails
// of 6 rows and of 4). CPU only: the GPU decoder's products are cuBLAS's.
void add_batch_gemv(std::vector<OpCase>& t) {
  struct S {
    int64_t R, K, N;
  };
  for (bool out_in : {false, true})
    for (S sh : {S{1, 96, 100}, S{5, 29, 70}, S{7, 768, 130}, S{16, 200, 29}}) {
      const int64_t R = sh.R, K = sh.K, N = sh.N, ldx = K + 3, ldy = N + 5;
      const bool acc = R % 2 == 1;
      OpCase c = make(out_in ? "matvec_batch" : "vecmat_batch",
                      fmt("R%ld K%ld N%ld%s", long(R), long(K), long(N), acc ? " accumulate" : ""), Mode::Forward,
                      {{"x", randn(size_t(R * ldx), 91)},
                       {"w", randn(size_t(K * N), 92, 0.1f)},
                       {"bias", randn(size_t(N), 93)},
                       {"y0", randn(size_t(R * ldy), 94)}});
      auto host = [=](const Tensors& in, bool use_ref) {
        std::vector<float> y = in[3].v;
        const float* x = in[0].v.data();
        const float* w = in[1].v.data();
        const float* b = in[2].v.data();
        if (out_in)
          (use_ref ? ref::matvec_batch : cpu::matvec_batch)(y.data(), ldy, x, ldx, R, w, b, N, K, acc);
        else
          (use_ref ? ref::vecmat_batch : cpu::vecmat_batch)(y.data(), ldy, x, ldx, R, w, b, K, N, acc);
        return Tensors{{"y", y}};
      };
      c.ref = [=](const Tensors& in) { return host(in, true); };
      c.cpu = [=](const Tensors& in) { return host(in, false); };
      c.k = ksum(double(K));
      t.push_back(std::move(c));
    }
}

std::vector<OpCase> op_table() {
  std::vector<OpCase> t;
  add_layernorm(t);
  add_rmsnorm(t);
  add_rope(t);
  add_activations(t);
  add_matmul(t);
  add_attention(t);
  add_decode_attention(t);
  add_kv_append_paged(t);
  add_latent_glue(t);
  add_embedding(t);
  add_crossentropy(t);
  add_adamw(t);
  add_narrow_gemm(t);
  add_batch_gemv(t);
  add_image_ops(t);
  add_moe_cases(t);
  return t;
}

}  // namespace kiln::ops
