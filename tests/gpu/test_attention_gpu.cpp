// cuda:: decode attention inside a captured CUDA graph (kernels/cuda/decode_attention.cu): replayed after the
// positions on the device changed, it must follow them. Against ref:: on the same bf16-rounded inputs, within
// twice the error of a naive bf16 implementation written here (probabilities rounded to bf16 before P·V, the
// output rounded). The kernels' accuracy over shapes is tested by the op table (tests/ops/).
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

struct Errors {
  double ours, naive;
};
void expect_within_naive(const char* what, Errors e) {
  std::printf("  %-6s max abs error: ours %.3g, naive bf16 %.3g\n", what, e.ours, e.naive);
  EXPECT_GT(e.naive, 0.0) << what;
  EXPECT_LE(e.ours, 2.0 * e.naive + 1e-6) << what << ": ours " << e.ours << " vs naive bf16 " << e.naive;
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

}  // namespace
}  // namespace kiln
