// What the op table (tests/ops/) cannot say about the GPU's training ops: the casts and residual adds are
// exact, special values included; the backward reductions (layernorm's dweight/dbias partial sums, the
// embedding's sorted runs, the gradient norm's two passes) give the same bits run after run; sum_squares
// adds into its output. Accuracy against the references over shapes and types is the table's.
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
using test::DeviceVec;

// ---------------------------------------------------------------------------------------------- layernorm

// Deterministic: the same inputs give the same bits (per-block partial sums reduced in a fixed order), for
// several rows per block (203 rows) and one (5 rows of 1030 columns), bf16 and fp32 dout.
template <class TD>
void check_layernorm_backward_bits(int64_t N, int C) {
  const auto x = test::randn(size_t(N * C), 21 + C, 1.5f), w = test::randn(size_t(C), 22 + C),
             b = test::randn(size_t(C), 27 + C), dy = test::round_bf16(test::randn(size_t(N * C), 23 + C));
  std::vector<float> mean(N), rstd(N), tmp(x.size());
  ref::layernorm_forward(tmp.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f);
  DeviceVec<float> dx(x), dww(w), dm(mean), dr(rstd);
  DeviceVec<TD> ddy;
  if constexpr (std::is_same_v<TD, float>)
    ddy = DeviceVec<float>(dy);
  else
    ddy = DeviceVec<uint16_t>(test::to_bf16(dy));
  DeviceVec<float> scratch(cuda::layernorm_backward_scratch_floats(N, C));
  std::vector<float> first[3];
  for (int run = 0; run < 2; run++) {
    DeviceVec<float> gdx(std::vector<float>(x.size(), 0.5f)), gdw(std::vector<float>(size_t(C), 0.5f)),
        gdb(std::vector<float>(size_t(C), 0.5f));
    cuda::layernorm_backward(gdx.get(), gdw.get(), gdb.get(), ddy.get(), dx.get(), dww.get(), dm.get(), dr.get(), N, C,
                             scratch.get(), gpu::stream());
    const std::vector<float> got[3] = {gdx.download(), gdw.download(), gdb.download()};
    for (int i = 0; i < 3; i++) {
      if (run == 0) first[i] = got[i];
      else EXPECT_EQ(0, std::memcmp(got[i].data(), first[i].data(), got[i].size() * 4)) << "output " << i << " C=" << C;
    }
  }
}

TEST(GpuOps, LayerNormBackwardIsDeterministic) {
  KILN_REQUIRE_GPU();
  check_layernorm_backward_bits<uint16_t>(203, 16);
  check_layernorm_backward_bits<float>(5, 1030);
}

// ------------------------------------------------------------------------------------------- elementwise

// n = 1003: 125 vectors of 8 and a tail of 3; offset 1 makes every pointer misaligned (scalar fallback).
constexpr int64_t kElems = 1003;

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

// The backward twice, with both tables and with wte alone: the same bits each time (each row's gradient is
// summed by one thread group in token order).
void check_embedding_bits(const EmbCase& ec) {
  const int64_t N = ec.N;
  const int C = ec.C;
  Rng r(51 + uint64_t(N) + uint64_t(C));
  std::vector<int32_t> tok(N), pos(N);
  for (int64_t n = 0; n < N; n++) {
    // A third of the rows share one hot token (a long run for one thread group); the rest spread out.
    tok[n] = (r.next_u64() % 3 == 0) ? 7 : int32_t(r.next_u64() % uint64_t(ec.V));
    pos[n] = int32_t(n % ec.T);
  }
  const auto dy = test::randn(size_t(N) * C, 54);
  const auto dwte0 = test::randn(size_t(ec.V) * C, 55), dwpe0 = test::randn(size_t(ec.T) * C, 56);
  DeviceVec<int32_t> dtok(tok), dpos(pos);
  DeviceVec<float> ddy(dy), gte(dwte0), gpe(dwpe0);
  DeviceVec<char> scratch(cuda::embedding_backward_scratch_bytes(N));
  cuda::embedding_backward(gte.get(), gpe.get(), ddy.get(), dtok.get(), dpos.get(), N, C, scratch.get(), gpu::stream());
  const auto got_te = gte.download();
  gte.upload(dwte0);
  cuda::embedding_backward(gte.get(), nullptr, ddy.get(), dtok.get(), dpos.get(), N, C, scratch.get(), gpu::stream());
  EXPECT_EQ(0, std::memcmp(gte.download().data(), got_te.data(), got_te.size() * 4)) << "dwte not reproducible";
}

TEST(GpuOps, EmbeddingBackwardIsDeterministic) {
  KILN_REQUIRE_GPU();
  check_embedding_bits({300, 72, 97, 64});
  check_embedding_bits({77, 50, 30, 16});  // odd C: scalar path
}

TEST(GpuOps, EmbeddingBackwardAcrossChunksIsDeterministic) {
  KILN_REQUIRE_GPU();
  // 2100 rows pad to 4096 keys: two 2048-key chunks merged by a global pass.
  check_embedding_bits({2100, 8, 300, 128});
}

// ---------------------------------------------------------------------------------------- gradient norm

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

}  // namespace
}  // namespace kiln
