// Decode attention on the CPU: one work item per (sequence, query, head[, key split]).
//
// An item walks its keys in blocks of kBlock with an online softmax: score the block (dot products of the
// query with each key row, read in place from the cache), take the block max, rescale the running sum and
// the running weighted values by exp(m_old - m_new), exponentiate the block (vectorised exp) and add
// Σ p_j·v_j. Scores of a block stay in L1; nothing of size T survives an item.
//
// When (sequences × queries × heads) items are too few for the threads — one token decoding with few heads on
// many cores — the key range is split as well (flash-decoding): each split leaves (m, l, Σ p·v) in a scratch
// buffer and a second pass merges the splits of each (query, head) with the usual max rescaling.
//
// Grouped-query attention only changes which cache head an item reads (h / (NH / NKV)); a sliding window
// only moves the first key of the range an item walks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/vec_math.h"
#include "kernels/cpu/vec_reduce.h"
#include "kernels/decode_attention.h"

namespace kiln::cpu {
namespace {

constexpr int kBlock = 128;      // keys scored per block
constexpr int kMinSplit = 256;   // never split the keys into ranges shorter than this

inline float hsum16(f32x16 v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(__m512(v));
#else
  return vred::hsum(v);
#endif
}

inline float dot(const float* a, const float* b, int n) {
  if (n % 16 == 0) {
    f32x16 s0 = {}, s1 = {};
    int d = 0;
    for (; d + 32 <= n; d += 32) {
      s0 += load16(a + d) * load16(b + d);
      s1 += load16(a + d + 16) * load16(b + d + 16);
    }
    if (d < n) s0 += load16(a + d) * load16(b + d);
    return hsum16(s0 + s1);
  }
  float s = 0;
  for (int d = 0; d < n; d++) s += a[d] * b[d];
  return s;
}

// acc[0..n) += w · x[0..n)
inline void axpy(float* acc, float w, const float* x, int n) {
  if (n % 16 == 0) {
    const f32x16 wv = f32x16{} + w;
    for (int d = 0; d < n; d += 16) store16(acc + d, load16(acc + d) + wv * load16(x + d));
    return;
  }
  for (int d = 0; d < n; d++) acc[d] += w * x[d];
}

inline void scale_in_place(float* acc, float w, int n) {
  for (int d = 0; d < n; d++) acc[d] *= w;
}

// s[t] = exp(s[t] - m) for t < n; returns the sum.
inline float exp_block(float* s, int n, float m) {
  float sum = 0;
  int t = 0;
#ifdef __AVX512F__
  __m512 vsum = _mm512_setzero_ps(), vm = _mm512_set1_ps(m);
  for (; t + 16 <= n; t += 16) {
    __m512 e = vmath::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), vm));
    _mm512_storeu_ps(s + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; t < n; t++) sum += (s[t] = vmath::exp_scalar(s[t] - m));
  return sum;
}

// The block's cache rows: one table lookup per page, not a division per key.
inline void block_rows(int64_t* rows, int64_t jb, int n, const KVPages& pages, int b) {
  if (!pages) {
    for (int t = 0; t < n; t++) rows[t] = jb + t;
    return;
  }
  int64_t blk = jb / pages.block_size, off = jb % pages.block_size;
  const int32_t* table = pages.table + int64_t(b) * pages.stride;
  for (int t = 0; t < n; t++) {
    rows[t] = int64_t(table[blk]) * pages.block_size + off;
    if (++off == pages.block_size) off = 0, blk++;
  }
}

// attend() for head sizes that are whole vectors (QV·16 for the keys, VV·16 for the values): the query and the
// running weighted values stay in registers, and the scores of 16 keys are reduced together.
template <int QV, int VV>
void attend_vec(const float* q, const float* k, const float* v, int64_t stride, int64_t vstride, float scale,
                int64_t j0, int64_t j1, float* acc_out, float& m, float& l, const KVPages& pages, int b) {
  alignas(64) float s[kBlock];
  int64_t rows[kBlock];
  f32x16 qv[QV], acc[VV];
  for (int i = 0; i < QV; i++) qv[i] = load16(q + 16 * i);
  for (int i = 0; i < VV; i++) acc[i] = f32x16{};
  m = -INFINITY;
  l = 0;
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, j1 - jb));
    block_rows(rows, jb, n, pages, b);
    int t = 0;
    f32x16 bmv = f32x16{} - INFINITY;
    for (; t + 16 <= n; t += 16) {
      f32x16 p[16];
      for (int i = 0; i < 16; i++) {
        const float* kr = k + rows[t + i] * stride;
        f32x16 a = qv[0] * load16(kr);
        for (int d = 1; d < QV; d++) a += qv[d] * load16(kr + 16 * d);
        p[i] = a;
      }
      const f32x16 sc = vred::hsum16x16(p) * scale;
      store16(s + t, sc);
      bmv = vmax16(bmv, sc);
    }
    float bm = -INFINITY;
    for (int i = 0; i < 16; i++) bm = std::max(bm, bmv[i]);
    for (; t < n; t++) {  // the last keys one at a time
      const float* kr = k + rows[t] * stride;
      f32x16 a = qv[0] * load16(kr);
      for (int d = 1; d < QV; d++) a += qv[d] * load16(kr + 16 * d);
      s[t] = hsum16(a) * scale;
      bm = std::max(bm, s[t]);
    }
    if (bm > m) {
      const float corr = vmath::exp_scalar(m - bm);
      l *= corr;
      for (int i = 0; i < VV; i++) acc[i] *= corr;
      m = bm;
    }
    l += exp_block(s, n, m);
    for (t = 0; t < n; t++) {
      const float* vr = v + rows[t] * vstride;
      const float w = s[t];
      for (int i = 0; i < VV; i++) acc[i] += w * load16(vr + 16 * i);
    }
  }
  for (int i = 0; i < VV; i++) store16(acc_out + 16 * i, acc[i]);
}

// Softmax-weighted values of keys [j0, j1) for one query and head. On return acc holds Σ exp(s_j - m)·v_j
// (not normalised), m the max score and l = Σ exp(s_j - m). An empty range gives m = -inf, l = 0, acc = 0.
// pages: key j is row pages.row(b, j) of k and v (a paged cache), else row j.
void attend(const float* q, const float* k, const float* v, int64_t stride, int64_t vstride, int HD, int HDv,
            float scale, int64_t j0, int64_t j1, float* acc, float& m, float& l, const KVPages& pages, int b) {
  if (HD == HDv && (HD == 32 || HD == 64 || HD == 128)) {
    if (HD == 32) return attend_vec<2, 2>(q, k, v, stride, vstride, scale, j0, j1, acc, m, l, pages, b);
    if (HD == 64) return attend_vec<4, 4>(q, k, v, stride, vstride, scale, j0, j1, acc, m, l, pages, b);
    return attend_vec<8, 8>(q, k, v, stride, vstride, scale, j0, j1, acc, m, l, pages, b);
  }
  float s[kBlock];
  int64_t rows[kBlock];
  m = -INFINITY;
  l = 0;
  std::memset(acc, 0, sizeof(float) * size_t(HDv));
  for (int64_t jb = j0; jb < j1; jb += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, j1 - jb));
    block_rows(rows, jb, n, pages, b);
    float bm = -INFINITY;
    for (int t = 0; t < n; t++) {
      s[t] = dot(q, k + rows[t] * stride, HD) * scale;
      bm = std::max(bm, s[t]);
    }
    if (bm > m) {
      // exp(-inf) = 0 on the first block, where acc and l are still zero anyway.
      const float corr = vmath::exp_scalar(m - bm);
      l *= corr;
      scale_in_place(acc, corr, HDv);
      m = bm;
    }
    l += exp_block(s, n, m);
    for (int t = 0; t < n; t++) axpy(acc, s[t], v + rows[t] * vstride, HDv);
  }
}

// Tree attention's new keys: after attend() over the cached keys, fold in the new keys past+j whose bit j is
// set in mask, one at a time (the same online softmax; a tree has at most 64 of them).
void attend_tree(const float* q, const float* k, const float* v, int64_t stride, int64_t vstride, int HD, int HDv,
                 float scale, int64_t past, uint64_t mask, float* acc, float& m, float& l, const KVPages& pages,
                 int b) {
  for (int j = 0; j < 64; j++) {
    if (!((mask >> j) & 1)) continue;
    const int64_t key = past + j;
    const int64_t kr = pages ? pages.row(b, key) * stride : key * stride;
    const int64_t vr = pages ? pages.row(b, key) * vstride : key * vstride;
    const float sc = dot(q, k + kr, HD) * scale;
    if (sc > m) {
      const float corr = vmath::exp_scalar(m - sc);
      l *= corr;
      scale_in_place(acc, corr, HDv);
      m = sc;
    }
    const float w = vmath::exp_scalar(sc - m);
    l += w;
    axpy(acc, w, v + vr, HDv);
  }
}

}  // namespace

void decode_attention(const DecodeAttentionParams& p) {
  KILN_CHECK(p.B >= 0 && p.Tq >= 0 && p.NH >= 1 && p.HD >= 1, "decode_attention: bad sizes B=", p.B, " Tq=", p.Tq,
             " NH=", p.NH, " HD=", p.HD);
  const int64_t rows = int64_t(p.B) * p.Tq;
  if (rows == 0) return;
  int64_t max_keys = 0;
  for (int b = 0; b < p.B; b++) {
    KILN_CHECK(p.past_of(b) >= 0, "decode_attention: sequence ", b, " has negative past ", p.past_of(b));
    max_keys = std::max<int64_t>(max_keys, int64_t(p.past_of(b)) + p.Tq);
  }
  const int HD = p.HD, NH = p.NH, HDv = p.hdv();
  const int NKV = p.NKV > 0 ? p.NKV : NH;
  KILN_CHECK(p.NKV >= 0 && NH % NKV == 0, "decode_attention: NKV (", p.NKV, ") must divide NH (", NH, ")");
  KILN_CHECK(p.window >= 0, "decode_attention: window (", p.window, ") must be >= 0");
  KILN_CHECK(!p.tree || (p.Tq <= 64 && p.window == 0), "decode_attention: a tree takes at most 64 queries and "
             "no window (Tq=", p.Tq, ", window=", p.window, ")");
  const int group = NH / NKV;
  const int64_t pairs = rows * NH;
  const int nt = omp_get_max_threads();
  // Split the keys only when the (query, head) pairs cannot keep ~4 items per thread and the cache is long.
  int64_t splits = 1;
  if (pairs < 4 * int64_t(nt))
    splits = std::min((4 * int64_t(nt) + pairs - 1) / pairs, (max_keys + kMinSplit - 1) / kMinSplit);
  splits = std::max<int64_t>(splits, 1);
  if (p.tree) splits = 1;  // a tree's queries are many; its new keys are folded in per item
  // Too little work to wake the team: run on the calling thread.
  const bool threaded = pairs * max_keys * HD >= (1 << 16);

  // Query `row` sees keys [first_key, key_end): up to its own position, from the window's start.
  auto key_end = [&](int64_t row) { return int64_t(p.past_of(int(row / p.Tq))) + row % p.Tq + 1; };
  auto first_key = [&](int64_t row) {
    return p.window > 0 ? std::max<int64_t>(0, key_end(row) - p.window) : int64_t(0);
  };
  auto kv_off = [&](int64_t h) { return h / group * HD; };
  auto v_off = [&](int64_t h) { return h / group * HDv; };
  auto base = [&](int64_t row, const float* cache) {
    return p.pages ? cache : cache + (row / p.Tq) * p.kv_batch_stride;
  };
  auto vbase = [&](int64_t row) { return p.pages ? p.v : p.v + (row / p.Tq) * p.vbs(); };
  auto seq = [&](int64_t row) { return int(row / p.Tq); };

  if (splits == 1) {
#pragma omp parallel if (threaded)
    {
      thread_local std::vector<float> acc;  // each thread's own, reused across calls
      acc.resize(size_t(HDv));
#pragma omp for schedule(dynamic)
      for (int64_t it = 0; it < pairs; it++) {
        const int64_t row = it / NH, h = it % NH;
        float m, l;
        const float* q = p.q + row * p.q_stride + h * HD;
        const float *kb = base(row, p.k) + kv_off(h), *vb = vbase(row) + v_off(h);
        if (p.tree) {  // the cached keys, then the node's ancestors among the new ones
          const int64_t past = p.past_of(seq(row));
          attend(q, kb, vb, p.kv_stride, p.vs(), HD, HDv, p.scale, 0, past, acc.data(), m, l, p.pages, seq(row));
          attend_tree(q, kb, vb, p.kv_stride, p.vs(), HD, HDv, p.scale, past, p.tree[row % p.Tq], acc.data(), m, l,
                      p.pages, seq(row));
        } else {
          attend(q, kb, vb, p.kv_stride, p.vs(), HD, HDv, p.scale, first_key(row), key_end(row), acc.data(), m, l,
                 p.pages, seq(row));
        }
        float* o = p.out + row * p.out_stride + h * HDv;
        const float inv = 1.0f / l;
        for (int d = 0; d < HDv; d++) o[d] = acc[size_t(d)] * inv;
      }
    }
    return;
  }

  // Split pass: item (pair, split) leaves [m, l, acc[HD]] in its slot.
  const int64_t slot = HDv + 2;
  thread_local std::vector<float> partial;
  partial.resize(size_t(pairs * splits * slot));
  float* part = partial.data();
#pragma omp parallel for schedule(dynamic) if (threaded)
  for (int64_t it = 0; it < pairs * splits; it++) {
    const int64_t pair = it / splits, sp = it % splits, row = pair / NH, h = pair % NH;
    const int64_t f = first_key(row), e = key_end(row), len = (e - f + splits - 1) / splits;
    const int64_t j0 = std::min(e, f + sp * len), j1 = std::min(e, j0 + len);
    float* out = part + it * slot;
    attend(p.q + row * p.q_stride + h * HD, base(row, p.k) + kv_off(h), vbase(row) + v_off(h), p.kv_stride,
           p.vs(), HD, HDv, p.scale, j0, j1, out + 2, out[0], out[1], p.pages, seq(row));
  }
  // Merge the splits of each (query, head).
#pragma omp parallel for schedule(static) if (threaded && pairs >= nt)
  for (int64_t pair = 0; pair < pairs; pair++) {
    const float* pp = part + pair * splits * slot;
    float m = -INFINITY;
    for (int64_t sp = 0; sp < splits; sp++) m = std::max(m, pp[sp * slot]);
    const int64_t row = pair / NH, h = pair % NH;
    float* o = p.out + row * p.out_stride + h * HDv;
    std::memset(o, 0, sizeof(float) * size_t(HDv));
    float l = 0;
    for (int64_t sp = 0; sp < splits; sp++) {
      const float* s = pp + sp * slot;
      if (s[1] == 0.0f) continue;  // empty split
      const float w = vmath::exp_scalar(s[0] - m);
      l += w * s[1];
      axpy(o, w, s + 2, HDv);
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < HDv; d++) o[d] *= inv;
  }
}

}  // namespace kiln::cpu
