// Attention on the CPU, what the op table (tests/ops/) does not check: packed variable-length sequences equal
// separate calls and do not leak into each other (bit for bit), a deterministic backward, bad parameters.
// cpu:: against ref:: and ref:: backward against finite differences are the table's.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/attention.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::all_close;
using kiln::test::randn;

namespace {

int64_t total_tokens(const AttentionParams& p) {
  return p.cu_seqlens ? p.cu_seqlens[p.num_seqs] : int64_t(p.B) * p.T;
}

struct Result {
  std::vector<float> out, lse, dqkv;
};

// Forward then backward of one backend on the given inputs.
template <class Fwd, class Bwd>
Result run(Fwd fwd, Bwd bwd, const std::vector<float>& qkv, const std::vector<float>& dout,
           const AttentionParams& p) {
  const int64_t N = total_tokens(p), C = int64_t(p.NH) * p.HD;
  Result r{std::vector<float>(size_t(N * C)), std::vector<float>(size_t(p.NH * N)),
           std::vector<float>(size_t(N * 3 * C), 12345.0f)};  // dqkv poisoned: must be overwritten
  fwd(r.out.data(), r.lse.data(), qkv.data(), p);
  bwd(r.dqkv.data(), dout.data(), qkv.data(), r.out.data(), r.lse.data(), p);
  return r;
}
Result run_cpu(const std::vector<float>& qkv, const std::vector<float>& dout, const AttentionParams& p) {
  return run(cpu::attention_forward, cpu::attention_backward, qkv, dout, p);
}
Result run_ref(const std::vector<float>& qkv, const std::vector<float>& dout, const AttentionParams& p) {
  return run(ref::attention_forward, ref::attention_backward, qkv, dout, p);
}

AttentionParams params(int B, int T, int NH, int HD, bool causal, float scale_mult = 1.0f) {
  AttentionParams p;
  p.B = B; p.T = T; p.NH = NH; p.HD = HD; p.causal = causal;
  p.scale = scale_mult / std::sqrt(float(HD));
  return p;
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

}  // namespace

namespace {
// Packed sequences of lengths 5, 0, 65, 1, 129, 64 with NH=2, HD=64.
const std::vector<int32_t> kCuSeqlens = {0, 5, 5, 70, 71, 200, 264};
}  // namespace

// One packed call gives the same bits as separate calls on each sequence alone, and matches ref::.
TEST(AttentionVarlen, PackedEqualsSeparateCalls) {
  for (bool causal : {true, false}) {
    SCOPED_TRACE(::testing::Message() << "causal=" << causal);
    const int NH = 2, HD = 64;
    const int64_t C = NH * HD, N = kCuSeqlens.back();
    AttentionParams p = params(1, 0, NH, HD, causal);
    p.cu_seqlens = kCuSeqlens.data();
    p.num_seqs = int(kCuSeqlens.size()) - 1;
    const auto qkv = randn(size_t(N * 3 * C), 11 + causal);
    const auto dout = randn(size_t(N * C), 12 + causal);
    const Result packed = run_cpu(qkv, dout, p);

    const Result r = run_ref(qkv, dout, p);
    EXPECT_TRUE(all_close(packed.out, r.out, 1e-4, 2e-5)) << "out vs ref";
    EXPECT_TRUE(all_close(packed.lse, r.lse, 1e-5, 1e-5)) << "lse vs ref";
    EXPECT_TRUE(all_close(packed.dqkv, r.dqkv, 1e-3, 1e-4)) << "dqkv vs ref";

    for (int s = 0; s + 1 < int(kCuSeqlens.size()); s++) {
      const int64_t a = kCuSeqlens[size_t(s)], T = kCuSeqlens[size_t(s) + 1] - a;
      if (T == 0) continue;
      const AttentionParams ps = params(1, int(T), NH, HD, causal);
      const std::vector<float> q1(qkv.begin() + a * 3 * C, qkv.begin() + (a + T) * 3 * C);
      const std::vector<float> d1(dout.begin() + a * C, dout.begin() + (a + T) * C);
      const Result one = run_cpu(q1, d1, ps);
      EXPECT_TRUE(same_bits(one.out.data(), packed.out.data() + a * C, size_t(T * C))) << "out, sequence " << s;
      EXPECT_TRUE(same_bits(one.dqkv.data(), packed.dqkv.data() + a * 3 * C, size_t(T * 3 * C)))
          << "dqkv, sequence " << s;
      for (int h = 0; h < NH; h++)
        EXPECT_TRUE(same_bits(one.lse.data() + h * T, packed.lse.data() + h * N + a, size_t(T)))
            << "lse, sequence " << s << " head " << h;
    }
  }
}

// Changing every q/k/v value of one sequence changes nothing (bit for bit) in the others.
TEST(AttentionVarlen, PerturbingOneSequenceLeavesOthersBitIdentical) {
  const int NH = 2, HD = 64;
  const int64_t C = NH * HD, N = kCuSeqlens.back();
  AttentionParams p = params(1, 0, NH, HD, true);
  p.cu_seqlens = kCuSeqlens.data();
  p.num_seqs = int(kCuSeqlens.size()) - 1;
  const auto qkv = randn(size_t(N * 3 * C), 21);
  const auto dout = randn(size_t(N * C), 22);
  const int victim = 4;  // rows [71, 200)
  const int64_t va = kCuSeqlens[victim], vb = kCuSeqlens[victim + 1];
  auto qkv2 = qkv;
  const auto noise = randn(size_t((vb - va) * 3 * C), 23);
  for (int64_t i = 0; i < (vb - va) * 3 * C; i++) qkv2[size_t(va * 3 * C + i)] += noise[size_t(i)];

  for (bool use_cpu : {true, false}) {
    SCOPED_TRACE(use_cpu ? "cpu" : "ref");
    const Result a = use_cpu ? run_cpu(qkv, dout, p) : run_ref(qkv, dout, p);
    const Result b = use_cpu ? run_cpu(qkv2, dout, p) : run_ref(qkv2, dout, p);
    for (int64_t n = 0; n < N; n++) {
      const bool inside = n >= va && n < vb;
      const bool out_same = same_bits(a.out.data() + n * C, b.out.data() + n * C, size_t(C));
      const bool grad_same = same_bits(a.dqkv.data() + n * 3 * C, b.dqkv.data() + n * 3 * C, size_t(3 * C));
      bool lse_same = true;
      for (int h = 0; h < NH; h++) lse_same = lse_same && a.lse[size_t(h * N + n)] == b.lse[size_t(h * N + n)];
      if (inside) {
        EXPECT_FALSE(out_same) << "row " << n;
        EXPECT_FALSE(grad_same) << "row " << n;
      } else {
        EXPECT_TRUE(out_same && grad_same && lse_same) << "row " << n;
      }
    }
  }
}

// Two backward runs give the same bits, and so does a single-threaded run.
TEST(AttentionCpu, BackwardIsDeterministic) {
  const AttentionParams p = params(2, 150, 3, 64, true);
  const int64_t N = 300, C = 3 * 64;
  const auto qkv = randn(size_t(N * 3 * C), 31);
  const auto dout = randn(size_t(N * C), 32);
  const Result a = run_cpu(qkv, dout, p), b = run_cpu(qkv, dout, p);
  EXPECT_TRUE(same_bits(a.dqkv.data(), b.dqkv.data(), a.dqkv.size()));
  EXPECT_TRUE(same_bits(a.out.data(), b.out.data(), a.out.size()));
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Result c = run_cpu(qkv, dout, p);
  omp_set_num_threads(threads);
  EXPECT_TRUE(same_bits(a.dqkv.data(), c.dqkv.data(), a.dqkv.size()));
  EXPECT_TRUE(same_bits(a.out.data(), c.out.data(), a.out.size()));
}

TEST(AttentionCpu, RejectsBadParams) {
  std::vector<float> buf(4096);
  AttentionParams p = params(1, 4, 1, 24, true);  // HD not a multiple of 16
  EXPECT_THROW(cpu::attention_forward(buf.data(), buf.data(), buf.data(), p), Error);
  p = params(1, 4, 1, 16, true);
  const int32_t bad[] = {0, 3, 2};
  p.cu_seqlens = bad;
  p.num_seqs = 2;
  EXPECT_THROW(cpu::attention_forward(buf.data(), buf.data(), buf.data(), p), Error);
  EXPECT_THROW(ref::attention_forward(buf.data(), buf.data(), buf.data(), p), Error);
  const int32_t offset[] = {1, 3};
  p.cu_seqlens = offset;
  p.num_seqs = 1;
  EXPECT_THROW(cpu::attention_backward(buf.data(), buf.data(), buf.data(), buf.data(), buf.data(), p), Error);
}
