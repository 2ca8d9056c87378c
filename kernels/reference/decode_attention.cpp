// Reference decode attention: for every (sequence, query, head) the scores against all visible keys in
// double precision, a softmax and the weighted sum of values. Simple on purpose; it checks the cpu kernel.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/decode_attention.h"

namespace kiln::ref {

void decode_attention(const DecodeAttentionParams& p) {
  KILN_CHECK(p.B >= 0 && p.Tq >= 0 && p.NH >= 1 && p.HD >= 1, "decode_attention: bad sizes B=", p.B, " Tq=", p.Tq,
             " NH=", p.NH, " HD=", p.HD);
  const int NKV = p.NKV > 0 ? p.NKV : p.NH;
  KILN_CHECK(p.NKV >= 0 && p.NH % NKV == 0, "decode_attention: NKV (", p.NKV, ") must divide NH (", p.NH, ")");
  KILN_CHECK(p.window >= 0, "decode_attention: window (", p.window, ") must be >= 0");
  KILN_CHECK(!p.tree || (p.Tq <= 64 && p.window == 0), "decode_attention: a tree takes at most 64 queries and "
             "no window (Tq=", p.Tq, ", window=", p.window, ")");
  const int group = p.NH / NKV;
  std::vector<double> s;
  for (int b = 0; b < p.B; b++) {
    const int past = p.past_of(b);
    KILN_CHECK(past >= 0, "decode_attention: sequence ", b, " has negative past ", past);
    // Key and value j of sequence b: in the sequence's own slab, or through the block table.
    auto kat = [&](int64_t j) { return p.pages ? p.pages.row(b, j) * p.kv_stride : b * p.kv_batch_stride + j * p.kv_stride; };
    auto vat = [&](int64_t j) { return p.pages ? p.pages.row(b, j) * p.vs() : b * p.vbs() + j * p.vs(); };
    for (int i = 0; i < p.Tq; i++) {
      const int64_t row = int64_t(b) * p.Tq + i, last = int64_t(past) + i;
      // Keys first .. last are visible: all of them, or those within the window.
      const int64_t first = p.window > 0 ? std::max<int64_t>(0, last - p.window + 1) : 0;
      for (int h = 0; h < p.NH; h++) {
        const int64_t kvoff = int64_t(h / group) * p.HD, voff = int64_t(h / group) * p.hdv();
        const float* q = p.q + row * p.q_stride + int64_t(h) * p.HD;
        double mx = -INFINITY;
        // Tree attention: a new key the query's mask leaves out scores -inf (weight 0).
        auto visible = [&](int64_t j) { return !p.tree || j < past || ((p.tree[i] >> (j - past)) & 1); };
        const int64_t stop = p.tree ? int64_t(past) + p.Tq - 1 : last;
        s.assign(size_t(stop - first + 1), 0.0);
        for (int64_t j = first; j <= stop; j++) {
          if (!visible(j)) {
            s[size_t(j - first)] = -INFINITY;
            continue;
          }
          const float* k = p.k + kat(j) + kvoff;
          double dot = 0;
          for (int d = 0; d < p.HD; d++) dot += double(q[d]) * double(k[d]);
          s[size_t(j - first)] = dot * double(p.scale);
          mx = std::max(mx, s[size_t(j - first)]);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        float* o = p.out + row * p.out_stride + int64_t(h) * p.hdv();
        for (int d = 0; d < p.hdv(); d++) {
          double acc = 0;
          for (int64_t j = first; j <= stop; j++)
            if (visible(j)) acc += s[size_t(j - first)] * double(p.v[vat(j) + voff + d]);
          o[d] = float(acc / sum);
        }
      }
    }
  }
}

}  // namespace kiln::ref
