// The non-matmul training ops on the GPU (kernels/cuda/{layernorm,activation,embedding,crossentropy,adamw}.cu)
// against the naive double-precision references (kernels/reference/) on the same inputs; bf16 inputs are
// rounded to bf16 first, so the reference sees exactly what the GPU reads.
//
// Tolerances. fp32 outputs: the GPU computes in fp32 what the reference computes in double, so the error is
// a few fp32 roundings of the operands' magnitude: rtol 1e-5 plus an atol of 1e-5 of the typical magnitude
// where results come from cancellation (layernorm gradients, GELU' near its zero). bf16 outputs: the GPU
// rounds an fp32 result r (within ~1e-6 of the reference value y) once to bf16, so |bf16(r) - y| <=
// 2^-9·|r| + |r - y|: rtol 4e-3 (a bit over half an ulp, 2^-9 ≈ 2e-3) with the fp32 atol covers it.
//
// Sizes are small (the emulator runs every CUDA thread as a fiber) but cover the vector path (C a multiple
// of 8, aligned), the scalar fallback (odd C, misaligned pointers), tails (n not a multiple of 8 or of the
// block) and the multi-slot layernorm rows (C > 1024 in the fallback).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/dtype.h"
#include "core/gpu.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/crossentropy.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {
using test::all_close;
using test::DeviceVec;

constexpr double kRtol32 = 1e-5, kRtol16 = 4e-3;

std::vector<float> bits_of(const std::vector<uint16_t>& h) { return test::from_bf16(h); }

// ---------------------------------------------------------------------------------------------- layernorm

struct LnCase {
  int64_t N;
  int C;
};
// 72 and 256: vector path (one warp / one 8-column slot per thread); 50: scalar fallback; 1030: fallback
// with 4 slots per thread (more than 1024 columns).
const LnCase kLnCases[] = {{37, 72}, {21, 256}, {13, 50}, {5, 1030}};

template <class TO>
void check_layernorm_forward(const LnCase& lc) {
  const int64_t N = lc.N;
  const int C = lc.C;
  auto x = test::randn(size_t(N * C), 11 + C, 2.0f);
  for (auto& v : x) v += 3.0f;  // an offset: the variance must not come from E[x²] - E[x]²
  auto w = test::randn(size_t(C), 12 + C), b = test::randn(size_t(C), 13 + C);
  std::vector<float> ref(x.size()), rm(N), rr(N);
  ref::layernorm_forward(ref.data(), rm.data(), rr.data(), x.data(), w.data(), b.data(), N, C, 1e-5f);

  DeviceVec<float> dx(x), dw(w), db(b), dm(static_cast<size_t>(N)), dr(static_cast<size_t>(N));
  DeviceVec<TO> dout(x.size());
  cuda::layernorm_forward(dout.get(), dm.get(), dr.get(), dx.get(), dw.get(), db.get(), N, C, 1e-5f, gpu::stream());
  std::vector<float> out;
  if constexpr (std::is_same_v<TO, float>) {
    out = dout.download();
    EXPECT_TRUE(all_close(out, ref, kRtol32, 1e-5)) << "fp32 out, C=" << C;
  } else {
    out = bits_of(dout.download());
    EXPECT_TRUE(all_close(out, ref, kRtol16, 1e-5)) << "bf16 out, C=" << C;
  }
  EXPECT_TRUE(all_close(dm.download(), rm, kRtol32, 1e-6)) << "mean, C=" << C;
  EXPECT_TRUE(all_close(dr.download(), rr, kRtol32, 0)) << "rstd, C=" << C;
}

TEST(GpuOps, LayerNormForwardMatchesReference) {
  KILN_REQUIRE_GPU();
  for (const auto& lc : kLnCases) {
    check_layernorm_forward<float>(lc);
    check_layernorm_forward<uint16_t>(lc);
  }
}

template <class TD>
void check_layernorm_backward(const LnCase& lc) {
  const int64_t N = lc.N;
  const int C = lc.C;
  auto x = test::randn(size_t(N * C), 21 + C, 1.5f);
  for (auto& v : x) v -= 1.0f;
  auto w = test::randn(size_t(C), 22 + C);
  auto dy = test::randn(size_t(N * C), 23 + C);
  if constexpr (!std::is_same_v<TD, float>) dy = test::round_bf16(dy);
  // Non-zero gradients already there: the op must add to them.
  auto dx0 = test::randn(size_t(N * C), 24 + C), dw0 = test::randn(size_t(C), 25 + C),
       db0 = test::randn(size_t(C), 26 + C);
  std::vector<float> mean(N), rstd(N), tmp(x.size());
  auto b = test::randn(size_t(C), 27 + C);
  ref::layernorm_forward(tmp.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f);
  auto rdx = dx0, rdw = dw0, rdb = db0;
  ref::layernorm_backward(rdx.data(), rdw.data(), rdb.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(),
                          N, C);

  DeviceVec<float> dx(x), dww(w), dm(mean), dr(rstd), gdx(dx0), gdw(dw0), gdb(db0);
  DeviceVec<TD> ddy;
  if constexpr (std::is_same_v<TD, float>)
    ddy = DeviceVec<float>(dy);
  else
    ddy = DeviceVec<uint16_t>(test::to_bf16(dy));
  DeviceVec<float> scratch(cuda::layernorm_backward_scratch_floats(N, C));
  auto run = [&] {
    cuda::layernorm_backward(gdx.get(), gdw.get(), gdb.get(), ddy.get(), dx.get(), dww.get(), dm.get(), dr.get(), N, C,
                             scratch.get(), gpu::stream());
  };
  run();
  const auto got_dx = gdx.download(), got_dw = gdw.download(), got_db = gdb.download();
  const char* type = std::is_same_v<TD, float> ? "fp32" : "bf16";
  // dinp = rstd·(g - mean g - xhat·mean(g·xhat)) cancels: atol relative to the O(1) gradient magnitude.
  EXPECT_TRUE(all_close(got_dx, rdx, kRtol32, 2e-5)) << "dinp " << type << " C=" << C;
  EXPECT_TRUE(all_close(got_dw, rdw, kRtol32, 1e-5 * std::sqrt(double(N)))) << "dweight " << type << " C=" << C;
  EXPECT_TRUE(all_close(got_db, rdb, kRtol32, 1e-5 * std::sqrt(double(N)))) << "dbias " << type << " C=" << C;

  // Deterministic: the same inputs give the same bits.
  gdx.upload(dx0);
  gdw.upload(dw0);
  gdb.upload(db0);
  run();
  EXPECT_EQ(0, std::memcmp(gdx.download().data(), got_dx.data(), got_dx.size() * 4)) << "dinp not reproducible";
  EXPECT_EQ(0, std::memcmp(gdw.download().data(), got_dw.data(), got_dw.size() * 4)) << "dweight not reproducible";
  EXPECT_EQ(0, std::memcmp(gdb.download().data(), got_db.data(), got_db.size() * 4)) << "dbias not reproducible";
}

TEST(GpuOps, LayerNormBackwardAccumulatesLikeReference) {
  KILN_REQUIRE_GPU();
  for (const auto& lc : kLnCases) {
    check_layernorm_backward<float>(lc);
    check_layernorm_backward<uint16_t>(lc);
  }
  // Many rows per block (the grid is capped at N/8 blocks) and a row count off the multiples.
  check_layernorm_backward<uint16_t>({203, 16});
}

// ------------------------------------------------------------------------------------------- elementwise

// n = 1003: 125 vectors of 8 and a tail of 3; offset 1 makes every pointer misaligned (scalar fallback).
constexpr int64_t kElems = 1003;

TEST(GpuOps, GeluMatchesReference) {
  KILN_REQUIRE_GPU();
  for (int offset : {0, 1}) {
    auto x = test::round_bf16(test::randn(size_t(kElems + offset), 31, 3.0f));
    auto dy = test::round_bf16(test::randn(size_t(kElems + offset), 32));
    std::vector<float> rf(kElems), rb(kElems);
    ref::gelu_forward(rf.data(), x.data() + offset, kElems);
    ref::gelu_backward(rb.data(), x.data() + offset, dy.data() + offset, kElems);
    auto tail = [&](const std::vector<float>& v) { return std::vector<float>(v.begin() + offset, v.end()); };
    {  // fp32
      DeviceVec<float> dx(x), ddy(dy), out(x.size()), din(x.size());
      cuda::gelu_forward(out.get() + offset, dx.get() + offset, kElems, gpu::stream());
      cuda::gelu_backward(din.get() + offset, dx.get() + offset, ddy.get() + offset, kElems, gpu::stream());
      EXPECT_TRUE(all_close(tail(out.download()), rf, kRtol32, 1e-6)) << "fp32 forward, offset " << offset;
      // GELU' crosses zero near x = -0.75, where the fp32 sum s + 2xs(1-s)u' cancels.
      EXPECT_TRUE(all_close(tail(din.download()), rb, kRtol32, 1e-6)) << "fp32 backward, offset " << offset;
    }
    {  // bf16; the backward in place (dinp aliases dout)
      DeviceVec<uint16_t> dx(test::to_bf16(x)), ddy(test::to_bf16(dy)), out(x.size());
      cuda::gelu_forward(out.get() + offset, dx.get() + offset, kElems, gpu::stream());
      cuda::gelu_backward(ddy.get() + offset, dx.get() + offset, ddy.get() + offset, kElems, gpu::stream());
      EXPECT_TRUE(all_close(tail(bits_of(out.download())), rf, kRtol16, 1e-6)) << "bf16 forward, offset " << offset;
      EXPECT_TRUE(all_close(tail(bits_of(ddy.download())), rb, kRtol16, 1e-6)) << "bf16 backward, offset " << offset;
    }
  }
}

TEST(GpuOps, AddAndCastsAreExact) {
  KILN_REQUIRE_GPU();
  for (int offset : {0, 1}) {
    auto a = test::randn(size_t(kElems + offset), 41);
    auto b = test::randn(size_t(kElems + offset), 42);
    // Round-to-nearest-even cases for the cast: ties both ways, overflow to inf, inf, NaN, subnormals, -0.
    const float special[] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -(1.0f + 0x1p-8f), 3.3895314e38f,
                             std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                             1e-40f, -0.0f};
    for (size_t i = 0; i < std::size(special); i++) a[offset + i] = special[i];
    const auto b16 = test::to_bf16(b);
    std::vector<float> ra(kElems), rb(kElems);
    const auto bw = test::from_bf16(b16);
    ref::add(ra.data(), a.data() + offset, bw.data() + offset, kElems);
    ref::add(rb.data(), a.data() + offset, b.data() + offset, kElems);

    DeviceVec<float> da(a), db(b), out(a.size());
    DeviceVec<uint16_t> db16(b16), c16(a.size());
    cuda::add(out.get() + offset, da.get() + offset, db16.get() + offset, kElems, gpu::stream());
    auto got = out.download();
    for (int64_t i = 0; i < kElems; i++)
      ASSERT_TRUE(std::memcmp(&got[offset + i], &ra[i], 4) == 0) << "add bf16 at " << i << " offset " << offset;
    cuda::add(da.get() + offset, da.get() + offset, db.get() + offset, kElems, gpu::stream());  // out aliases a
    got = da.download();
    for (int64_t i = 0; i < kElems; i++)
      ASSERT_TRUE(std::memcmp(&got[offset + i], &rb[i], 4) == 0) << "add fp32 at " << i << " offset " << offset;

    da.upload(a);
    cuda::cast(c16.get() + offset, da.get() + offset, kElems, gpu::stream());
    const auto h16 = c16.download();
    for (int64_t i = 0; i < kElems; i++) {
      const float v = a[offset + i];
      if (std::isnan(v))
        EXPECT_TRUE(std::isnan(bf16_to_f32(h16[offset + i]))) << "cast NaN at " << i;
      else
        ASSERT_EQ(h16[offset + i], f32_to_bf16(v)) << "cast to bf16 at " << i << " (" << v << ")";
    }
    cuda::cast(out.get() + offset, db16.get() + offset, kElems, gpu::stream());
    got = out.download();
    for (int64_t i = 0; i < kElems; i++) ASSERT_EQ(got[offset + i], bw[offset + i]) << "cast to fp32 at " << i;
  }
}

// -------------------------------------------------------------------------------------------- embedding

struct EmbCase {
  int64_t N;
  int C, V, T;
};

void check_embedding(const EmbCase& ec) {
  const int64_t N = ec.N;
  const int C = ec.C;
  Rng r(51 + uint64_t(N) + uint64_t(C));
  std::vector<int32_t> tok(N), pos(N);
  for (int64_t n = 0; n < N; n++) {
    // A third of the rows share one hot token (a long run for one thread group); the rest spread out.
    tok[n] = (r.next_u64() % 3 == 0) ? 7 : int32_t(r.next_u64() % uint64_t(ec.V));
    pos[n] = int32_t(n % ec.T);
  }
  auto wte = test::randn(size_t(ec.V) * C, 52), wpe = test::randn(size_t(ec.T) * C, 53);
  auto dy = test::randn(size_t(N) * C, 54);
  auto dwte0 = test::randn(wte.size(), 55), dwpe0 = test::randn(wpe.size(), 56);
  std::vector<float> rout(size_t(N) * C);
  ref::embedding_forward(rout.data(), tok.data(), pos.data(), wte.data(), wpe.data(), N, C);
  auto rdwte = dwte0, rdwpe = dwpe0;
  ref::embedding_backward(rdwte.data(), rdwpe.data(), dy.data(), tok.data(), pos.data(), N, C);

  DeviceVec<int32_t> dtok(tok), dpos(pos);
  DeviceVec<float> dwte(wte), dwpe(wpe), out(rout.size()), ddy(dy), gte(dwte0), gpe(dwpe0);
  cuda::embedding_forward(out.get(), dtok.get(), dpos.get(), dwte.get(), dwpe.get(), N, C, gpu::stream());
  EXPECT_EQ(out.download(), rout) << "forward C=" << C;  // one fp32 addition: exact
  // Without learned positions (rotary models): the token rows alone, copied exactly.
  ref::embedding_forward(rout.data(), tok.data(), pos.data(), wte.data(), nullptr, N, C);
  cuda::embedding_forward(out.get(), dtok.get(), dpos.get(), dwte.get(), nullptr, N, C, gpu::stream());
  EXPECT_EQ(out.download(), rout) << "forward without positions C=" << C;

  DeviceVec<char> scratch(cuda::embedding_backward_scratch_bytes(N));
  cuda::embedding_backward(gte.get(), gpe.get(), ddy.get(), dtok.get(), dpos.get(), N, C, scratch.get(), gpu::stream());
  // A run adds its rows first and then the sum to the table (the reference adds one by one): rounding differs
  // by a few ulp of the run's partial sums (magnitude up to ~sqrt(run length)).
  const double atol = 1e-6 * std::sqrt(double(N));
  const auto got_te = gte.download(), got_pe = gpe.download();
  EXPECT_TRUE(all_close(got_te, rdwte, kRtol32, atol)) << "dwte N=" << N << " C=" << C;
  EXPECT_TRUE(all_close(got_pe, rdwpe, kRtol32, atol)) << "dwpe N=" << N << " C=" << C;

  // Only one table, and bitwise reproducibility of the sum.
  gte.upload(dwte0);
  cuda::embedding_backward(gte.get(), nullptr, ddy.get(), dtok.get(), dpos.get(), N, C, scratch.get(), gpu::stream());
  EXPECT_EQ(0, std::memcmp(gte.download().data(), got_te.data(), got_te.size() * 4)) << "dwte not reproducible";
}

TEST(GpuOps, EmbeddingMatchesReference) {
  KILN_REQUIRE_GPU();
  check_embedding({300, 72, 97, 64});
  check_embedding({129, 256, 50, 40});
  check_embedding({77, 50, 30, 16});  // odd C: scalar path
}

TEST(GpuOps, EmbeddingBackwardSortsAcrossChunks) {
  KILN_REQUIRE_GPU();
  // 2100 rows pad to 4096 keys: two 2048-key chunks merged by a global pass.
  check_embedding({2100, 8, 300, 128});
}

// ---------------------------------------------------------------------------------------- cross-entropy

struct CeCase {
  int64_t N;
  int V;
  int64_t ld;
};

template <class T>
void check_crossentropy(const CeCase& cc, float grad_scale) {
  const int64_t N = cc.N, ld = cc.ld;
  const int V = cc.V;
  auto x = test::round_bf16(test::randn(size_t(N * ld), 61 + V, 3.0f));
  std::vector<int32_t> t(N);
  Rng r(62);
  for (int64_t n = 0; n < N; n++) t[n] = int32_t(r.next_u64() % uint64_t(V));
  t[1] = -1;  // ignored row
  t[N - 1] = V - 1;
  for (int64_t n = 0; n < N; n++)
    for (int64_t c = V; c < ld; c++) x[n * ld + c] = 8192.0f;  // padding that would dominate if read as logits (exact in bf16)
  std::vector<float> rx = x, rl(N);
  ref::softmax_crossentropy(rx.data(), rl.data(), t.data(), N, V, ld, grad_scale);

  DeviceVec<int32_t> dt(t);
  DeviceVec<float> dl(std::vector<float>(size_t(N), 123.0f));
  std::vector<float> got;
  if constexpr (std::is_same_v<T, float>) {
    DeviceVec<float> dx(x);
    cuda::softmax_crossentropy(dx.get(), dl.get(), dt.get(), N, V, ld, grad_scale, gpu::stream());
    got = dx.download();
  } else {
    DeviceVec<uint16_t> dx(test::to_bf16(x));
    cuda::softmax_crossentropy(dx.get(), dl.get(), dt.get(), N, V, ld, grad_scale, gpu::stream());
    got = bits_of(dx.download());
  }
  const char* type = std::is_same_v<T, float> ? "fp32" : "bf16";
  const auto losses = dl.download();
  EXPECT_TRUE(all_close(losses, rl, kRtol32, 1e-5)) << type << " losses V=" << V << " ld=" << ld;
  EXPECT_EQ(losses[1], 0.0f) << "ignored row";
  if (grad_scale == 0.0f) {
    EXPECT_EQ(got, x) << type << ": logits changed without a gradient";
    return;
  }
  std::vector<float> g(size_t(N) * V), rg(size_t(N) * V);
  for (int64_t n = 0; n < N; n++) {
    for (int c = 0; c < V; c++) {
      g[n * V + c] = got[n * ld + c];
      rg[n * V + c] = rx[n * ld + c];
    }
    for (int64_t c = V; c < ld; c++) ASSERT_EQ(got[n * ld + c], 0.0f) << type << " padding row " << n << " col " << c;
    for (int c = 0; c < V && n == 1; c++) ASSERT_EQ(got[n * ld + c], 0.0f) << type << " ignored row col " << c;
  }
  // Softmax probabilities through exp of an fp32 difference: ~1e-6 relative, tiny absolute for tiny p.
  const double atol = 1e-9 * std::fabs(grad_scale);
  EXPECT_TRUE(all_close(g, rg, std::is_same_v<T, float> ? kRtol32 : kRtol16, atol))
      << type << " gradient V=" << V << " ld=" << ld;
}

TEST(GpuOps, CrossEntropyMatchesReference) {
  KILN_REQUIRE_GPU();
  // 1000/1024: vector path with 24 padding columns; 1000/1001: scalar fallback (rows misaligned);
  // 5000/5008: several vectors per thread and a 5000 % 8 = 0 row end inside the padding; 37/40: one warp.
  const CeCase cases[] = {{6, 1000, 1024}, {5, 1000, 1001}, {4, 5000, 5008}, {5, 37, 40}};
  for (const auto& cc : cases) {
    check_crossentropy<float>(cc, 0.25f);
    check_crossentropy<uint16_t>(cc, 0.25f);
  }
  check_crossentropy<float>(cases[0], 0.0f);
  check_crossentropy<uint16_t>(cases[0], 0.0f);
}

// ----------------------------------------------------------------------------------------------- AdamW

TEST(GpuOps, AdamWMatchesReference) {
  KILN_REQUIRE_GPU();
  AdamWHyper h;
  h.lr = 1e-2f;
  h.weight_decay = 0.1f;
  h.t = 3;
  h.grad_scale = 0.5f;
  for (int offset : {0, 1})
    for (bool zero : {false, true}) {
      h.zero_grad = zero;
      const size_t n = size_t(kElems + offset);
      auto p = test::randn(n, 71), g = test::randn(n, 72), m = test::randn(n, 73, 0.1f), v = test::randn(n, 74, 0.1f);
      for (auto& e : v) e = e * e;
      auto rp = p, rm = m, rv = v;
      ref::adamw_update(rp.data() + offset, g.data() + offset, rm.data() + offset, rv.data() + offset, kElems, h);
      DeviceVec<float> dp(p), dg(g), dm(m), dv(v);
      DeviceVec<uint16_t> p16(n);
      cuda::adamw_update(dp.get() + offset, p16.get() + offset, dg.get() + offset, dm.get() + offset,
                         dv.get() + offset, kElems, h, gpu::stream());
      const auto gp = dp.download(), gm = dm.download(), gv = dv.download(), gg = dg.download();
      const auto g16 = p16.download();
      auto tail = [&](const std::vector<float>& x) { return std::vector<float>(x.begin() + offset, x.end()); };
      // The step (~lr) is computed in fp32 and subtracted from an O(1) parameter.
      EXPECT_TRUE(all_close(tail(gp), tail(rp), kRtol32, 1e-7)) << "param, offset " << offset;
      EXPECT_TRUE(all_close(tail(gm), tail(rm), kRtol32, 1e-8)) << "m, offset " << offset;
      EXPECT_TRUE(all_close(tail(gv), tail(rv), kRtol32, 1e-10)) << "v, offset " << offset;
      for (size_t i = size_t(offset); i < n; i++) {
        ASSERT_EQ(g16[i], f32_to_bf16(gp[i])) << "param16 is not the rounded param at " << i;
        ASSERT_EQ(gg[i], zero ? 0.0f : g[i]) << "grad at " << i << (zero ? " not cleared" : " changed");
      }
    }
  // No bf16 copy requested.
  auto p = test::randn(size_t(kElems), 75), g = test::randn(size_t(kElems), 76);
  std::vector<float> m(size_t(kElems), 0.0f), v(size_t(kElems), 0.0f);
  auto rp = p, rm = m, rv = v;
  h.zero_grad = false;
  ref::adamw_update(rp.data(), g.data(), rm.data(), rv.data(), kElems, h);
  DeviceVec<float> dp(p), dg(g), dm(m), dv(v);
  cuda::adamw_update(dp.get(), nullptr, dg.get(), dm.get(), dv.get(), kElems, h, gpu::stream());
  EXPECT_TRUE(all_close(dp.download(), rp, kRtol32, 1e-7));
}

TEST(GpuOps, SumSquaresAddsIntoOut) {
  KILN_REQUIRE_GPU();
  for (int64_t n : {int64_t(5), int64_t(100003)})
    for (int offset : {0, 1}) {
      auto x = test::randn(size_t(n + offset), 81 + uint64_t(n));
      const double ref = ref::sum_squares(x.data() + offset, n);
      DeviceVec<float> dx(x), out(std::vector<float>{1.5f});
      DeviceVec<float> scratch(cuda::sum_squares_scratch_floats(n));
      cuda::sum_squares(out.get(), dx.get() + offset, n, scratch.get(), gpu::stream());
      const float first = out.download()[0];
      EXPECT_NEAR(first, 1.5 + ref, 1e-5 * (1.5 + ref)) << "n " << n << " offset " << offset;
      cuda::sum_squares(out.get(), dx.get() + offset, n, scratch.get(), gpu::stream());
      const float second = out.download()[0];
      EXPECT_NEAR(second, 1.5 + 2 * ref, 1e-5 * (1.5 + 2 * ref)) << "second call adds";
      // Deterministic: a fresh run gives the same bits.
      out.upload({1.5f});
      cuda::sum_squares(out.get(), dx.get() + offset, n, scratch.get(), gpu::stream());
      EXPECT_EQ(out.download()[0], first);
    }
}

// copy_rows moves N rows of `width` values between strided buffers bit for bit (the values around them
// untouched), in bf16 and fp32.
TEST(GpuOps, CopyRowsIsExactAndStaysInItsRows) {
  KILN_REQUIRE_GPU();
  const int64_t N = 7, width = 19, ld_src = 45, ld_dst = 26;
  auto src = test::randn(size_t(N * ld_src), 71);
  auto dst0 = test::randn(size_t(N * ld_dst), 72);
  std::vector<float> want = dst0;
  for (int64_t n = 0; n < N; n++)
    for (int64_t c = 0; c < width; c++) want[size_t(n * ld_dst + c)] = src[size_t(n * ld_src + 3 + c)];
  DeviceVec<float> ds(src), dd(dst0);
  cuda::copy_rows(dd.get(), ld_dst, ds.get() + 3, ld_src, N, width, gpu::stream());
  auto got = dd.download();
  for (size_t i = 0; i < want.size(); i++) ASSERT_TRUE(std::memcmp(&got[i], &want[i], 4) == 0) << "fp32 at " << i;
  DeviceVec<uint16_t> hs(test::to_bf16(src)), hd(test::to_bf16(dst0));
  cuda::copy_rows(hd.get(), ld_dst, hs.get() + 3, ld_src, N, width, gpu::stream());
  const auto got16 = hd.download();
  const auto want16 = test::to_bf16(want);
  for (size_t i = 0; i < want16.size(); i++) ASSERT_EQ(got16[i], want16[i]) << "bf16 at " << i;
}

}  // namespace
}  // namespace kiln
