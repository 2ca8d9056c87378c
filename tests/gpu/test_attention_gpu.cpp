// cuda:: FlashAttention (kernels/cuda/attention.cu) against ref:: run in fp32/double on the same bf16-rounded
// inputs. Tolerance (the flash-attention habit): our error must be at most twice the error of a naive bf16
// implementation written here (fp32 scores from bf16 inputs, probabilities rounded to bf16 before P·V, outputs
// rounded to bf16; the backward rounds P, dS and the gradients the same way).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "core/gpu.h"
#include "kernels/attention.h"
#include "kernels/decode_attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {
using test::DeviceVec;

float rb(float x) { return bf16_to_f32(f32_to_bf16(x)); }

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b, size_t begin = 0, size_t end = SIZE_MAX,
                    size_t stride = 1, size_t width = 1) {
  // Elements [begin, end) of rows of `stride` elements, the first `width` of each row.
  double worst = 0;
  end = std::min(end, a.size());
  for (size_t row = begin; row < end; row += stride)
    for (size_t i = row; i < std::min(row + width, end); i++) {
      const double d = std::fabs(double(a[i]) - double(b[i]));
      if (std::isnan(d)) return INFINITY;
      worst = std::max(worst, d);
    }
  return worst;
}

struct Problem {
  int NH, HD;
  bool causal;
  std::vector<int> lens;  // one entry per sequence
  bool packed;            // through cu_seqlens (else all lens equal: B×T)
  int64_t N = 0;
  std::vector<int32_t> cu;
  AttentionParams params() const {
    AttentionParams p;
    p.NH = NH, p.HD = HD, p.causal = causal, p.scale = 1.0f / std::sqrt(float(HD));
    if (packed) {
      p.cu_seqlens = cu.data();
      p.num_seqs = int(lens.size());
      p.max_seqlen = *std::max_element(lens.begin(), lens.end());
      p.total_tokens = N;
    } else {
      p.B = int(lens.size()), p.T = lens[0];
    }
    return p;
  }
  Problem(int nh, int hd, bool c, std::vector<int> l, bool pk) : NH(nh), HD(hd), causal(c), lens(std::move(l)), packed(pk) {
    cu.push_back(0);
    for (int x : lens) cu.push_back(cu.back() + x);
    N = cu.back();
  }
};

// Naive bf16 attention of one sequence (rows [s0, s0+T)) and head h: the tolerance yardstick.
void naive_bf16_forward(std::vector<float>& out, std::vector<float>& lse, const std::vector<float>& qkv, int64_t N,
                        int NH, int HD, float scale, bool causal, int64_t s0, int T, int h) {
  const int64_t C = int64_t(NH) * HD;
  std::vector<float> s(static_cast<size_t>(T));
  for (int i = 0; i < T; i++) {
    const float* q = &qkv[size_t((s0 + i) * 3 * C + h * HD)];
    const int jend = causal ? i + 1 : T;
    float mx = -INFINITY;
    for (int j = 0; j < jend; j++) {
      const float* k = &qkv[size_t((s0 + j) * 3 * C + C + h * HD)];
      float dot = 0;
      for (int d = 0; d < HD; d++) dot += q[d] * k[d];
      s[size_t(j)] = dot * scale;
      mx = std::max(mx, s[size_t(j)]);
    }
    float sum = 0;
    for (int j = 0; j < jend; j++) sum += (s[size_t(j)] = std::exp(s[size_t(j)] - mx));
    for (int j = 0; j < jend; j++) s[size_t(j)] = rb(s[size_t(j)] / sum);
    lse[size_t(h * N + s0 + i)] = mx + std::log(sum);
    for (int d = 0; d < HD; d++) {
      float acc = 0;
      for (int j = 0; j < jend; j++) acc += s[size_t(j)] * qkv[size_t((s0 + j) * 3 * C + 2 * C + h * HD + d)];
      out[size_t((s0 + i) * C + h * HD + d)] = rb(acc);
    }
  }
}

// Naive bf16 backward of one sequence and head: P and dS rounded to bf16 before their products, the gradients
// rounded to bf16; D from the (bf16) output.
void naive_bf16_backward(std::vector<float>& dqkv, const std::vector<float>& dout, const std::vector<float>& qkv,
                         const std::vector<float>& out, int NH, int HD, float scale, bool causal, int64_t s0, int T,
                         int h) {
  const int64_t C = int64_t(NH) * HD;
  auto Q = [&](int i, int d) { return qkv[size_t((s0 + i) * 3 * C + h * HD + d)]; };
  auto K = [&](int j, int d) { return qkv[size_t((s0 + j) * 3 * C + C + h * HD + d)]; };
  auto V = [&](int j, int d) { return qkv[size_t((s0 + j) * 3 * C + 2 * C + h * HD + d)]; };
  auto dO = [&](int i, int d) { return dout[size_t((s0 + i) * C + h * HD + d)]; };
  std::vector<float> P(size_t(T) * T, 0.0f), dS(size_t(T) * T, 0.0f);
  for (int i = 0; i < T; i++) {
    const int jend = causal ? i + 1 : T;
    float mx = -INFINITY, sum = 0, D = 0;
    for (int j = 0; j < jend; j++) {
      float dot = 0;
      for (int d = 0; d < HD; d++) dot += Q(i, d) * K(j, d);
      P[size_t(i) * T + j] = dot * scale;
      mx = std::max(mx, P[size_t(i) * T + j]);
    }
    for (int j = 0; j < jend; j++) sum += (P[size_t(i) * T + j] = std::exp(P[size_t(i) * T + j] - mx));
    for (int d = 0; d < HD; d++) D += dO(i, d) * out[size_t((s0 + i) * C + h * HD + d)];
    for (int j = 0; j < jend; j++) {
      float& p = P[size_t(i) * T + j];
      p /= sum;
      float dp = 0;
      for (int d = 0; d < HD; d++) dp += dO(i, d) * V(j, d);
      dS[size_t(i) * T + j] = rb(p * (dp - D));
      p = rb(p);
    }
  }
  for (int i = 0; i < T; i++)
    for (int d = 0; d < HD; d++) {
      float gq = 0, gk = 0, gv = 0;
      for (int j = 0; j < T; j++) {
        gq += dS[size_t(i) * T + j] * K(j, d);
        gk += dS[size_t(j) * T + i] * Q(j, d);
        gv += P[size_t(j) * T + i] * dO(j, d);
      }
      float* row = &dqkv[size_t((s0 + i) * 3 * C + h * HD + d)];
      row[0] = rb(gq * scale);
      row[C] = rb(gk * scale);
      row[2 * C] = rb(gv);
    }
}

struct Errors {
  double ours, naive;
};
void expect_within_naive(const char* what, Errors e) {
  std::printf("  %-6s max abs error: ours %.3g, naive bf16 %.3g\n", what, e.ours, e.naive);
  EXPECT_GT(e.naive, 0.0) << what;
  EXPECT_LE(e.ours, 2.0 * e.naive + 1e-6) << what << ": ours " << e.ours << " vs naive bf16 " << e.naive;
}

void check_attention(const Problem& pr, bool backward, uint64_t seed) {
  const AttentionParams p = pr.params();
  const int64_t N = pr.N, C = int64_t(pr.NH) * pr.HD;
  const auto qkv = test::round_bf16(test::randn(size_t(N * 3 * C), seed));
  const auto dout = test::round_bf16(test::randn(size_t(N * C), seed + 1));

  // Ours.
  DeviceVec<uint16_t> dqkv_in(test::to_bf16(qkv)), dout_d(test::to_bf16(dout)), out_d(size_t(N * C));
  DeviceVec<float> lse_d(size_t(pr.NH * N));
  DeviceVec<int32_t> cu_d(pr.cu);
  AttentionParams pd = p;
  if (pr.packed) pd.cu_seqlens = cu_d.get();
  cuda::attention_forward(out_d.get(), lse_d.get(), dqkv_in.get(), pd, gpu::stream());
  const auto out = test::from_bf16(out_d.download());
  const auto lse = lse_d.download();

  // The reference, one sequence at a time (no attention can cross a boundary), and the naive bf16 version.
  std::vector<float> ref_out(size_t(N * C)), ref_lse(size_t(pr.NH * N)), ref_dqkv(size_t(N * 3 * C));
  std::vector<float> nv_out(size_t(N * C)), nv_lse(size_t(pr.NH * N)), nv_dqkv(size_t(N * 3 * C));
  for (size_t s = 0; s < pr.lens.size(); s++) {
    const int64_t s0 = pr.cu[s], T = pr.lens[s];
    if (T == 0) continue;
    AttentionParams one = p;
    one.cu_seqlens = nullptr, one.B = 1, one.T = int(T);
    std::vector<float> o(size_t(T * C)), l(size_t(pr.NH * T)), g(size_t(T * 3 * C));
    std::vector<float> x(qkv.begin() + s0 * 3 * C, qkv.begin() + (s0 + T) * 3 * C);
    std::vector<float> dy(dout.begin() + s0 * C, dout.begin() + (s0 + T) * C);
    ref::attention_forward(o.data(), l.data(), x.data(), one);
    std::copy(o.begin(), o.end(), ref_out.begin() + s0 * C);
    for (int h = 0; h < pr.NH; h++)
      std::copy(l.begin() + h * T, l.begin() + (h + 1) * T, ref_lse.begin() + h * N + s0);
    if (backward) {
      ref::attention_backward(g.data(), dy.data(), x.data(), o.data(), l.data(), one);
      std::copy(g.begin(), g.end(), ref_dqkv.begin() + s0 * 3 * C);
    }
    for (int h = 0; h < pr.NH; h++)
      naive_bf16_forward(nv_out, nv_lse, qkv, N, pr.NH, pr.HD, p.scale, p.causal, s0, int(T), h);
    if (backward)
      for (int h = 0; h < pr.NH; h++)
        naive_bf16_backward(nv_dqkv, dout, qkv, nv_out, pr.NH, pr.HD, p.scale, p.causal, s0, int(T), h);
  }
  expect_within_naive("out", {max_abs_diff(out, ref_out), max_abs_diff(nv_out, ref_out)});
  const double lse_err = max_abs_diff(lse, ref_lse);
  std::printf("  lse    max abs error: ours %.3g, naive fp32 %.3g\n", lse_err, max_abs_diff(nv_lse, ref_lse));
  EXPECT_LE(lse_err, 2e-5);  // fp32 math on both sides
  if (!backward) return;

  DeviceVec<uint16_t> dqkv_d(size_t(N * 3 * C));
  DeviceVec<char> scratch(cuda::attention_backward_scratch_bytes(pd));
  cuda::attention_backward(dqkv_d.get(), dout_d.get(), dqkv_in.get(), out_d.get(), lse_d.get(), pd, scratch.get(),
                           gpu::stream());
  const auto dqkv = test::from_bf16(dqkv_d.download());
  const char* names[3] = {"dq", "dk", "dv"};
  for (int c = 0; c < 3; c++)
    expect_within_naive(names[c], {max_abs_diff(dqkv, ref_dqkv, size_t(c * C), SIZE_MAX, size_t(3 * C), size_t(C)),
                                   max_abs_diff(nv_dqkv, ref_dqkv, size_t(c * C), SIZE_MAX, size_t(3 * C), size_t(C))});
}

TEST(AttentionGpu, ForwardBatchedHd64) {
  KILN_REQUIRE_GPU();
  for (bool causal : {true, false}) check_attention(Problem(2, 64, causal, {100, 100}, false), false, 1 + causal);
}
TEST(AttentionGpu, ForwardBatchedHd128) {
  KILN_REQUIRE_GPU();
  for (bool causal : {true, false}) check_attention(Problem(2, 128, causal, {130, 130}, false), false, 3 + causal);
}
TEST(AttentionGpu, ForwardPackedSequences) {
  KILN_REQUIRE_GPU();
  for (int hd : {64, 128})
    for (bool causal : {true, false}) check_attention(Problem(2, hd, causal, {1, 37, 0, 64, 90}, true), false, 5 + hd);
}

TEST(AttentionGpu, BackwardBatchedHd64) {
  KILN_REQUIRE_GPU();
  for (bool causal : {true, false}) check_attention(Problem(2, 64, causal, {100, 100}, false), true, 11 + causal);
}
TEST(AttentionGpu, BackwardBatchedHd128) {
  KILN_REQUIRE_GPU();
  for (bool causal : {true, false}) check_attention(Problem(2, 128, causal, {130, 130}, false), true, 13 + causal);
}
TEST(AttentionGpu, BackwardPackedSequences) {
  KILN_REQUIRE_GPU();
  for (int hd : {64, 128})
    for (bool causal : {true, false}) check_attention(Problem(2, hd, causal, {1, 37, 0, 64, 90}, true), true, 15 + hd);
}

// ---- Decode attention (kernels/cuda/decode_attention.cu) against ref::decode_attention ----

struct DecodeCase {
  int HD, Tq, NH = 2, capacity;
  std::vector<int32_t> past;
  int64_t C() const { return int64_t(NH) * HD; }
  int B() const { return int(past.size()); }
};

struct DecodeData {
  std::vector<float> qkv, kc, vc;  // bf16-rounded: QKV rows [B·Tq][3C], caches [B][capacity][C]
};
DecodeData decode_data(const DecodeCase& dc, uint64_t seed) {
  const int64_t C = dc.C();
  return {test::round_bf16(test::randn(size_t(dc.B() * dc.Tq * 3 * C), seed)),
          test::round_bf16(test::randn(size_t(dc.B() * dc.capacity * C), seed + 1)),
          test::round_bf16(test::randn(size_t(dc.B() * dc.capacity * C), seed + 2))};
}

// The fp32 reference and the naive bf16 yardstick (P rounded to bf16 before P·V, output rounded).
void decode_references(const DecodeCase& dc, const DecodeData& x, std::vector<float>& ref, std::vector<float>& naive) {
  const int64_t C = dc.C();
  const float scale = 1.0f / std::sqrt(float(dc.HD));
  DecodeAttentionParams rp;
  rp.B = dc.B(), rp.Tq = dc.Tq, rp.past_per_seq = dc.past.data(), rp.NH = dc.NH, rp.HD = dc.HD, rp.scale = scale;
  rp.q = x.qkv.data(), rp.q_stride = 3 * C, rp.k = x.kc.data(), rp.v = x.vc.data();
  rp.kv_batch_stride = dc.capacity * C, rp.kv_stride = C;
  ref.assign(size_t(dc.B() * dc.Tq * C), 0.0f);
  rp.out = ref.data(), rp.out_stride = C;
  ref::decode_attention(rp);
  naive.assign(ref.size(), 0.0f);
  for (int b = 0; b < dc.B(); b++)
    for (int i = 0; i < dc.Tq; i++)
      for (int h = 0; h < dc.NH; h++) {
        const int64_t row = int64_t(b) * dc.Tq + i, n = dc.past[size_t(b)] + i + 1;
        const float* q = &x.qkv[size_t(row * 3 * C + h * dc.HD)];
        std::vector<float> s(static_cast<size_t>(n));
        float mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < n; j++) {
          const float* k = &x.kc[size_t((b * dc.capacity + j) * C + h * dc.HD)];
          float dot = 0;
          for (int d = 0; d < dc.HD; d++) dot += q[d] * k[d];
          mx = std::max(mx, s[size_t(j)] = dot * scale);
        }
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (int d = 0; d < dc.HD; d++) {
          float acc = 0;
          for (int64_t j = 0; j < n; j++) acc += rb(s[size_t(j)] / sum) * x.vc[size_t((b * dc.capacity + j) * C + h * dc.HD + d)];
          naive[size_t(row * C + h * dc.HD + d)] = rb(acc);
        }
      }
}

struct DecodeDevice {
  DeviceVec<uint16_t> qkv, kc, vc, out;
  DeviceVec<int32_t> past;
  DeviceVec<char> scratch;
  cuda::DecodeAttention p;
  DecodeDevice(const DecodeCase& dc, const DecodeData& x)
      : qkv(test::to_bf16(x.qkv)), kc(test::to_bf16(x.kc)), vc(test::to_bf16(x.vc)),
        out(size_t(dc.B() * dc.Tq * dc.C())), past(dc.past) {
    const int64_t C = dc.C();
    p.B = dc.B(), p.Tq = dc.Tq, p.past_per_seq = past.get(), p.max_past = dc.capacity, p.NH = dc.NH, p.HD = dc.HD;
    p.scale = 1.0f / std::sqrt(float(dc.HD));
    p.q = qkv.get(), p.q_stride = 3 * C, p.k = kc.get(), p.v = vc.get();
    p.kv_batch_stride = dc.capacity * C, p.kv_stride = C, p.out = out.get(), p.out_stride = C;
    scratch = DeviceVec<char>(cuda::decode_attention_scratch_bytes(p));
  }
};

void expect_decode_matches(const DecodeCase& dc, const DecodeData& x, const std::vector<float>& got) {
  std::vector<float> ref, naive;
  decode_references(dc, x, ref, naive);
  std::printf("  HD %d Tq %d past {%d, %d}:", dc.HD, dc.Tq, dc.past[0], dc.past[1]);
  expect_within_naive("decode", {max_abs_diff(got, ref), max_abs_diff(naive, ref)});
}

TEST(DecodeAttentionGpu, MatchesReferenceAcrossSplits) {
  KILN_REQUIRE_GPU();
  uint64_t seed = 100;
  for (int hd : {64, 128})
    for (int tq : {1, 3})
      for (std::vector<int32_t> past : {std::vector<int32_t>{0, 300}, std::vector<int32_t>{77, 250}}) {
        const DecodeCase dc{hd, tq, 2, 320, past};  // 320 positions: 5 tiles, 5 splits
        const DecodeData x = decode_data(dc, seed += 3);
        DecodeDevice dev(dc, x);
        // More than one split's partials: the merge kernel is exercised.
        EXPECT_GT(dev.scratch.n, size_t(dc.B() * tq * dc.NH * (hd + 2)) * sizeof(float));
        cuda::decode_attention(dev.p, dev.scratch.get(), gpu::stream());
        expect_decode_matches(dc, x, test::from_bf16(dev.out.download()));
      }
}

TEST(DecodeAttentionGpu, SixteenQueriesContinuingAPrefix) {
  KILN_REQUIRE_GPU();
  const DecodeCase dc{64, 16, 2, 96, {5, 70}};
  const DecodeData x = decode_data(dc, 7);
  DecodeDevice dev(dc, x);
  cuda::decode_attention(dev.p, dev.scratch.get(), gpu::stream());
  expect_decode_matches(dc, x, test::from_bf16(dev.out.download()));
}

// Captured once, replayed after the positions on the device changed: the graph must follow them.
TEST(DecodeAttentionGpu, CapturedGraphFollowsDevicePositions) {
  KILN_REQUIRE_GPU();
  DecodeCase dc{64, 1, 2, 256, {10, 200}};
  const DecodeData x = decode_data(dc, 9);
  DecodeDevice dev(dc, x);
  gpu::Graph graph;
  graph.begin();
  cuda::decode_attention(dev.p, dev.scratch.get(), gpu::stream());
  graph.end();
  graph.launch();
  expect_decode_matches(dc, x, test::from_bf16(dev.out.download()));
  dc.past = {130, 11};
  dev.past.upload(dc.past);
  graph.launch();
  expect_decode_matches(dc, x, test::from_bf16(dev.out.download()));
}

TEST(DecodeAttentionGpu, KvCacheAppendWritesAtEachSequencesPosition) {
  KILN_REQUIRE_GPU();
  const int B = 2, Tq = 3, NH = 2, HD = 64, cap = 16;
  const int64_t C = NH * HD;
  const std::vector<int32_t> past = {3, 10};
  const auto qkv = test::to_bf16(test::randn(size_t(B * Tq * 3 * C), 31));
  auto kc = test::to_bf16(test::randn(size_t(B * cap * C), 32));
  auto vc = test::to_bf16(test::randn(size_t(B * cap * C), 33));
  DeviceVec<uint16_t> dqkv(qkv), dk(kc), dv(vc);
  DeviceVec<int32_t> dpast(past);
  cuda::kv_cache_append(dk.get(), dv.get(), dqkv.get(), dpast.get(), B, Tq, NH, NH, HD, cap * C, gpu::stream());
  for (int b = 0; b < B; b++)
    for (int i = 0; i < Tq; i++)
      for (int64_t c = 0; c < C; c++) {
        const int64_t row = b * Tq + i, at = (b * cap + past[size_t(b)] + i) * C + c;
        kc[size_t(at)] = qkv[size_t(row * 3 * C + C + c)];
        vc[size_t(at)] = qkv[size_t(row * 3 * C + 2 * C + c)];
      }
  EXPECT_EQ(dk.download(), kc);
  EXPECT_EQ(dv.download(), vc);
}

}  // namespace
}  // namespace kiln
