// FlashAttention on the CPU (forward and backward), for head dims that are multiples of 16.
//
// Everything runs in "transposed" tiles: a tile of scores is stored as Sᵀ[key j][query i], with the
// queries of a tile along the vector lanes (16 floats with AVX-512, 8 with AVX). Then
//   - the online-softmax statistics (running max m, running sum l) are one vector per kLanes queries, and the
//     max / sum over keys are plain element-wise vector ops (no horizontal reductions);
//   - every product is "broadcast a scalar, FMA a vector row", reading K, V, dO in place from their
//     row-major buffers; only Q (and dO in the backward) is packed transposed, once per tile.
// Probabilities are computed with a vectorised exp; masked scores are -inf and give exactly 0.
// Causality: key tiles after a query tile are skipped, and inside a tile on the diagonal each product skips
// the row blocks / lane vectors that are entirely hidden (Trim below), so the diagonal costs ~60%, not 100%.
//
// Forward: one work item per (sequence, head, query tile); Oᵀ accumulates over key tiles with the usual
// rescaling by exp(m_old - m_new); only lse = m + log(l) is saved per row.
// Backward: one work item per (sequence, head), so each item owns its rows of dQ, dK, dV and no two threads
// write the same memory; the summation order inside an item is fixed, so results are the same bits on every
// run and for every thread count. Per key tile (outer) and query tile (inner), P is recomputed from lse,
// D = rowsum(dO∘O), dS = P∘(dP − D), and dV += Pᵀ·dO, dK += scale·dSᵀ·Q, dQ += scale·dS·K.
//
// Grouped-query attention: a forward item reads its query head's key/value head. A backward item is
// (sequence, key/value head) and runs the group's query heads one after the other inside, so the dK, dV rows
// the group shares still have one writer and a fixed summation order.
// Sliding window: key tiles entirely before a query tile's window are skipped (forward and backward), and
// tiles that straddle the window's edge are masked like the causal diagonal (without the Trim savings).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "core/memory.h"
#include "kernels/attention.h"

namespace kiln::cpu {
namespace {

// One vector register of floats (GCC vector extensions, so other targets still build): 16 lanes with AVX-512, 8
// without (a 64-byte vector has no machine mode there, and GCC keeps it in memory).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef float vfloat_u __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));

constexpr int kBr = 4 * kLanes;  // queries per tile (vector lanes of the transposed tiles)
constexpr int kBc = 64;  // keys per tile
constexpr int kVq = kBr / kLanes;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat_u*>(p) = v; }
inline vfloat splat(float x) { return vfloat{} + x; }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vint lane_index() {
  vint v{};
  for (int i = 0; i < kLanes; i++) v[i] = i;
  return v;
}

// e^x for every lane, within ~2 ulp: x = k·ln2 + r with |r| <= ln2/2, e^r by a degree-7 Taylor polynomial,
// 2^k built in the exponent bits. Inputs below -87 (including -inf) give exactly 0; NaN stays NaN.
inline vfloat vexp(vfloat x) {
  const vfloat lo = splat(-87.0f), hi = splat(88.0f);
  vfloat xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vfloat magic = splat(12582912.0f);  // 1.5·2^23: adding and subtracting it rounds to an integer
  const vfloat k = (xc * 1.44269504088896341f + magic) - magic;
  const vfloat r = (xc - k * 0.693145751953125f) - k * 1.428606765330187e-06f;  // ln2 split hi + lo
  vfloat poly = splat(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const vint bits = (__builtin_convertvector(k, vint) + 127) << 23;
  const vfloat result = poly * (vfloat)bits;  // a vector cast reinterprets the bits
  return x < lo ? vfloat{} : result;
}

// The one product shape everything uses: for r < R and kLanes·NV lanes,
//   C[r][lanes] (+)= Σ_{k in [kb, ke)} s[r·srs + k·sks] · A[k·lda + lanes]
// i.e. broadcast a scalar of s (any layout, by strides) and FMA a vector row of A. Accumulators stay in
// registers for the whole k loop (R·NV of them).
template <int R, int NV>
inline void block(float* C, int64_t ldc, const float* s, int64_t srs, int64_t sks, const float* A, int64_t lda,
                  int kb, int ke, bool accumulate) {
  vfloat c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) c[r][v] = accumulate ? load(C + r * ldc + v * kLanes) : vfloat{};
  for (int k = kb; k < ke; k++) {
    vfloat a[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) {
      vfloat t = load(A + k * lda + v * kLanes);
      asm("" : "+v"(t));  // keep the row in a register (GCC would otherwise reload it for every FMA)
      a[v] = t;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const float b = s[r * srs + k * sks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) c[r][v] += b * a[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) store(C + r * ldc + v * kLanes, c[r][v]);
}

template <int R>
inline void block_nv(int nv, float* C, int64_t ldc, const float* s, int64_t srs, int64_t sks, const float* A,
                     int64_t lda, int kb, int ke, bool accumulate) {
  switch (nv) {
    case 4: block<R, 4>(C, ldc, s, srs, sks, A, lda, kb, ke, accumulate); break;
    case 3: block<R, 3>(C, ldc, s, srs, sks, A, lda, kb, ke, accumulate); break;
    case 2: block<R, 2>(C, ldc, s, srs, sks, A, lda, kb, ke, accumulate); break;
    default: block<R, 1>(C, ldc, s, srs, sks, A, lda, kb, ke, accumulate); break;
  }
}

// Work skipped inside a tile on the causal diagonal, where row r of the product only needs part of k or
// of the lanes (delta = offset between the two index spaces):
//   kLanesFrom: lanes >= r + delta   (Sᵀ, dPᵀ: rows are keys, lanes queries; skipped lanes are left
//                                     unwritten, the caller masks them)
//   kKFrom:     k >= r + delta       (dV, dK: rows are keys, k runs over queries)
//   kKUpTo:     k <= r + delta       (dQ: rows are queries, k runs over keys)
//   kKUpToLane: lane i needs only k <= i + delta   (Oᵀ += Vᵀ·Pᵀ: lanes are queries, k runs over keys)
enum class Trim { kNone, kLanesFrom, kKFrom, kKUpTo, kKUpToLane };

// C[rows][lanes] (+)= S[rows][K] · A[K][lanes], S addressed by strides, lanes a multiple of kLanes.
// Lane chunks of 4 vectors outside, so one chunk of A stays in L1 while all row blocks pass over it.
constexpr int kRows = 4;
template <int R>
inline void row_block(int r, int l0, int nv, float* C, int64_t ldc, const float* S, int64_t srs, int64_t sks,
                      const float* A, int64_t lda, int K, bool accumulate, Trim trim, int delta) {
  int kb = 0, ke = K;
  if (trim == Trim::kLanesFrom) {
    const int first = std::max(l0, std::max(0, r + delta) / kLanes * kLanes);
    nv -= (first - l0) / kLanes;
    if (nv <= 0) return;
    l0 = first;
  } else if (trim == Trim::kKFrom) {
    kb = std::min(K, std::max(0, r + delta));
  } else if (trim == Trim::kKUpTo) {
    ke = std::max(0, std::min(K, r + R + delta));
  } else if (trim == Trim::kKUpToLane) {
    // Segment v runs k over [end of vector v-1, end of vector v) for the vectors v.. that still need it.
    int k = 0;
    for (int v = 0; v < nv; v++) {
      const int end = std::max(0, std::min(K, l0 + (v + 1) * kLanes + delta));
      if (v == 0 || end > k)
        block_nv<R>(nv - v, C + r * ldc + l0 + v * kLanes, ldc, S + r * srs, srs, sks, A + l0 + v * kLanes, lda,
                    k, std::max(k, end), accumulate || v > 0);
      k = std::max(k, end);
    }
    return;
  }
  block_nv<R>(nv, C + r * ldc + l0, ldc, S + r * srs, srs, sks, A + l0, lda, kb, ke, accumulate);
}

void bgemm(float* C, int64_t ldc, int rows, int lanes, const float* S, int64_t srs, int64_t sks, const float* A,
           int64_t lda, int K, bool accumulate, Trim trim = Trim::kNone, int delta = 0) {
  for (int l0 = 0; l0 < lanes; l0 += 4 * kLanes) {
    const int nv = std::min(4, (lanes - l0) / kLanes);
    int r = 0;
    for (; r + kRows <= rows; r += kRows)
      row_block<kRows>(r, l0, nv, C, ldc, S, srs, sks, A, lda, K, accumulate, trim, delta);
    for (; r < rows; r++) row_block<1>(r, l0, nv, C, ldc, S, srs, sks, A, lda, K, accumulate, trim, delta);
  }
}

using Span = AttentionSpan;

// Validated sequences; N is the total token count.
std::vector<Span> spans(const AttentionParams& p, int64_t& N) {
  KILN_CHECK(p.HD >= 16 && p.HD % 16 == 0, "attention: HD is ", p.HD, ", the CPU kernel needs a multiple of 16");
  KILN_CHECK(v_dim(p) % 16 == 0, "attention: HDv is ", v_dim(p), ", the CPU kernel needs a multiple of 16");
  return attention_spans(p, N);
}

// Σ a[d]·b[d] over n (a multiple of 16) floats, in a fixed order.
inline float dot(const float* a, const float* b, int n) {
  vfloat acc{};
  for (int d = 0; d < n; d += kLanes) acc += load(a + d) * load(b + d);
  float sum = 0;
  for (int lane = 0; lane < kLanes; lane++) sum += acc[lane];
  return sum;
}

// Transposes kLanes rows of kLanes floats in registers: afterwards r[c][i] holds what r[i][c] held. One level per
// b = kLanes/2 .. 1, each swapping the off-diagonal b×b blocks of rows i and i + b with two-source shuffles (lane
// c of the first takes x[c] or y[c − b], of the second x[c + b] or y[c]; y's lanes count from kLanes).
inline void transpose_lanes(vfloat r[kLanes]) {
#ifdef __AVX512F__
  constexpr int kLevels = 4;
  static constexpr vint lo[kLevels] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                       {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                       {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                       {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
  static constexpr vint hi[kLevels] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                                       {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                                       {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                                       {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
#else
  constexpr int kLevels = 3;
  static constexpr vint lo[kLevels] = {{0, 1, 2, 3, 8, 9, 10, 11}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 8, 2, 10, 4, 12, 6, 14}};
  static constexpr vint hi[kLevels] = {{4, 5, 6, 7, 12, 13, 14, 15}, {2, 3, 10, 11, 6, 7, 14, 15}, {1, 9, 3, 11, 5, 13, 7, 15}};
#endif
#pragma GCC unroll 4
  for (int level = 0; level < kLevels; level++) {
    const int b = kLanes >> (level + 1);
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; i++)
      if (!(i & b)) {
        const vfloat x = r[i], y = r[i + b];
        r[i] = __builtin_shuffle(x, y, lo[level]);
        r[i + b] = __builtin_shuffle(x, y, hi[level]);
      }
  }
}

// Copies rows [0, n) of a row-major [n, HD] block (row stride ld) into tile[d][i] (Br lanes), zero-padding
// lanes n..Br.
void pack_transposed(float* tile, const float* rows, int64_t ld, int n, int HD) {
  for (int i0 = 0; i0 < kBr; i0 += kLanes)
    for (int d0 = 0; d0 < HD; d0 += kLanes) {
      vfloat r[kLanes];
      for (int i = 0; i < kLanes; i++) r[i] = i0 + i < n ? load(rows + (i0 + i) * ld + d0) : vfloat{};
      transpose_lanes(r);
      for (int d = 0; d < kLanes; d++) store(tile + int64_t(d0 + d) * kBr + i0, r[d]);
    }
}

// Sᵀ[j][lanes] for key j of a tile starting at key k0, query tile starting at q0: is the key visible?
inline vint causal_visible(int v, int64_t q0, int64_t k0, int j) {
  // key k0+j visible to query q0+i iff i >= k0 + j - q0
  return (lane_index() + v * kLanes) >= int32_t(k0 + j - q0);
}

// The same for the window's far edge: key k0+j visible to query q0+i iff q0+i < k0+j+window. Only called
// on tiles where that bound lies within the query tile, so it fits an int.
inline vint window_visible(int v, int64_t q0, int64_t k0, int j, int window) {
  return (lane_index() + v * kLanes) < int32_t(k0 + j - q0 + window);
}

// The first key tile holding a key that query tile q0 sees (key tiles start at multiples of kBc).
inline int64_t first_key_tile(const AttentionParams& p, int64_t q0) {
  return p.window > 0 ? std::max<int64_t>(0, q0 - p.window + 1) / kBc * kBc : 0;
}
// Whether some (real) query of tile [q0, q0+qn) is hidden by the window from some key of tile k0.
inline bool window_masks(const AttentionParams& p, int64_t q0, int qn, int64_t k0) {
  return p.window > 0 && k0 + p.window <= q0 + qn - 1;
}

struct ForwardScratch {
  Buffer qt, st, ot;
  ForwardScratch(int HD, int HDv)
      : qt(sizeof(float) * HD * kBr), st(sizeof(float) * kBc * kBr), ot(sizeof(float) * HDv * kBr) {}
};

// One (sequence, head, query tile): rows q0..q0+qn of sequence sp.
void forward_tile(float* out, float* lse, const float* qkv, const AttentionParams& p, int64_t N, Span sp, int h,
                  int64_t q0, ForwardScratch& w) {
  const int HD = p.HD, HDv = v_dim(p), NKV = kv_heads(p), kvh = h / (p.NH / NKV);
  const int64_t C = attention_out_row(p), ld = qkv_row(p);
  const float* qb = qkv + sp.start * ld + int64_t(h) * HD;
  const float* kb = qkv + sp.start * ld + int64_t(p.NH + kvh) * HD;
  const float* vb = qkv + sp.start * ld + int64_t(p.NH + NKV) * HD + int64_t(kvh) * HDv;
  const int qn = int(std::min<int64_t>(kBr, sp.len - q0));
  const int nvq = (qn + kLanes - 1) / kLanes, lanes = nvq * kLanes;  // lane vectors holding real queries
  float* Qt = w.qt.f32();
  float* St = w.st.f32();
  float* Ot = w.ot.f32();
  pack_transposed(Qt, qb + q0 * ld, ld, qn, HD);

  vfloat m[kVq], l[kVq];
  for (int v = 0; v < nvq; v++) { m[v] = splat(-kInf); l[v] = vfloat{}; }
  const vfloat scale = splat(p.scale);

  const int64_t kend = p.causal ? q0 + qn : sp.len;  // key tiles past the last query are fully masked
  for (int64_t k0 = first_key_tile(p, q0); k0 < kend; k0 += kBc) {
    const int kn = int(std::min<int64_t>(kBc, kend - k0));
    // On the diagonal, some keys are hidden from some queries: skip what is fully hidden, mask the rest.
    const bool mask = p.causal && k0 + kn - 1 > q0;
    const bool wmask = window_masks(p, q0, qn, k0);
    const Trim lanes_from = mask ? Trim::kLanesFrom : Trim::kNone;
    bgemm(St, kBr, kn, lanes, kb + k0 * ld, ld, 1, Qt, kBr, HD, false, lanes_from, int(k0 - q0));  // Sᵀ = K·Qᵀ
    vfloat mt[kVq];
    for (int v = 0; v < nvq; v++) mt[v] = splat(-kInf);
    for (int j = 0; j < kn; j++)
      for (int v = 0; v < nvq; v++) {
        vfloat x = load(St + j * kBr + v * kLanes) * scale;
        if (mask) x = causal_visible(v, q0, k0, j) ? x : splat(-kInf);
        if (wmask) x = window_visible(v, q0, k0, j, p.window) ? x : splat(-kInf);
        store(St + j * kBr + v * kLanes, x);
        mt[v] = vmax(mt[v], x);
      }
    vfloat alpha[kVq], sum[kVq], mref[kVq];
    for (int v = 0; v < nvq; v++) {
      // Without a window the max is finite from the first tile on (key 0 is visible to every query). With one,
      // a query may see no key of its first tiles: subtract 0 then, not -inf (which would give NaN).
      const vfloat mnew = vmax(m[v], mt[v]);
      mref[v] = mnew;
      if (p.window > 0) mref[v] = mnew == splat(-kInf) ? vfloat{} : mnew;
      alpha[v] = vexp(m[v] - mref[v]);
      m[v] = mnew;
      sum[v] = vfloat{};
    }
    for (int j = 0; j < kn; j++)
      for (int v = 0; v < nvq; v++) {
        const vfloat pr = vexp(load(St + j * kBr + v * kLanes) - mref[v]);
        store(St + j * kBr + v * kLanes, pr);
        sum[v] += pr;
      }
    for (int v = 0; v < nvq; v++) l[v] = l[v] * alpha[v] + sum[v];
    if (k0 > 0)  // the first key tile writes Oᵀ, later ones rescale and accumulate
      for (int d = 0; d < HDv; d++)
        for (int v = 0; v < nvq; v++) store(Ot + d * kBr + v * kLanes, load(Ot + d * kBr + v * kLanes) * alpha[v]);
    bgemm(Ot, kBr, HDv, lanes, vb + k0 * ld, 1, ld, St, kBr, kn, k0 > 0, mask ? Trim::kKUpToLane : Trim::kNone,
          int(q0 - k0));  // Oᵀ += Vᵀ·Pᵀ
  }

  alignas(64) float inv_l[kBr], mrow[kBr], lrow[kBr];
  for (int v = 0; v < nvq; v++) {
    store(inv_l + v * kLanes, 1.0f / l[v]);
    store(mrow + v * kLanes, m[v]);
    store(lrow + v * kLanes, l[v]);
  }
  for (int i = 0; i < qn; i++) lse[int64_t(h) * N + sp.start + q0 + i] = mrow[i] + std::log(lrow[i]);
  float* o = out + (sp.start + q0) * C + int64_t(h) * HDv;
  for (int i0 = 0; i0 < qn; i0 += kLanes)
    for (int d0 = 0; d0 < HDv; d0 += kLanes) {
      vfloat r[kLanes];
      for (int d = 0; d < kLanes; d++) r[d] = load(Ot + (d0 + d) * kBr + i0) * load(inv_l + i0);
      transpose_lanes(r);
      for (int i = 0; i < std::min(kLanes, qn - i0); i++) store(o + (i0 + i) * C + d0, r[i]);
    }
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p) {
  int64_t N = 0;
  const std::vector<Span> seqs = spans(p, N);
  if (N == 0) return;
  KILN_CHECK(out && lse && qkv, "attention_forward: null out, lse or qkv pointer");
  struct Item {
    int seq, head;
    int64_t q0;
  };
  std::vector<Item> items;
  for (int s = 0; s < int(seqs.size()); s++)
    for (int h = 0; h < p.NH; h++)
      for (int64_t q0 = 0; q0 < seqs[s].len; q0 += kBr) items.push_back({s, h, q0});
  const int64_t n_items = int64_t(items.size());
#pragma omp parallel if (n_items > 1)
  {
    ForwardScratch w(p.HD, v_dim(p));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_items; t++)
      forward_tile(out, lse, qkv, p, N, seqs[items[t].seq], items[t].head, items[t].q0, w);
  }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p) {
  int64_t N = 0;
  const std::vector<Span> seqs = spans(p, N);
  if (N == 0) return;
  KILN_CHECK(dqkv && dout && qkv && out && lse, "attention_backward: null pointer argument");
  const int HD = p.HD, HDv = v_dim(p), NKV = kv_heads(p), group = p.NH / NKV;
  const int64_t C = attention_out_row(p), ld = qkv_row(p);
  int64_t max_len = 0;
  for (const Span& s : seqs) max_len = std::max(max_len, s.len);
  const int64_t max_pad = (max_len + kBr - 1) / kBr * kBr;
  const int64_t n_items = int64_t(seqs.size()) * NKV;

#pragma omp parallel if (n_items > 1)
  {
    // Per thread: Qᵀ and dOᵀ of a whole sequence as [tile][d][Br], lse and D padded to whole tiles,
    // and the Pᵀ and dSᵀ tiles.
    Buffer qt_all(sizeof(float) * HD * max_pad), dot_all(sizeof(float) * HDv * max_pad);
    Buffer lse_pad(sizeof(float) * max_pad), dvec(sizeof(float) * max_pad);
    Buffer st(sizeof(float) * kBc * kBr), dst(sizeof(float) * kBc * kBr);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_items; t++) {
      const Span sp = seqs[size_t(t / NKV)];
      const int kvh = int(t % NKV);
      if (sp.len == 0) continue;
      const float* kb = qkv + sp.start * ld + int64_t(p.NH + kvh) * HD;
      const float* vb = qkv + sp.start * ld + int64_t(p.NH + NKV) * HD + int64_t(kvh) * HDv;
      float* dkb = dqkv + sp.start * ld + int64_t(p.NH + kvh) * HD;
      float* dvb = dqkv + sp.start * ld + int64_t(p.NH + NKV) * HD + int64_t(kvh) * HDv;
      for (int g = 0; g < group; g++) {
        const int h = kvh * group + g;
        const float* qb = qkv + sp.start * ld + int64_t(h) * HD;
        const float* ob = out + sp.start * C + int64_t(h) * HDv;
        const float* dob = dout + sp.start * C + int64_t(h) * HDv;
        float* dqb = dqkv + sp.start * ld + int64_t(h) * HD;
        const int64_t len = sp.len, pad = (len + kBr - 1) / kBr * kBr;
        float* Qt = qt_all.f32();
        float* dOt = dot_all.f32();
        float* L = lse_pad.f32();
        float* D = dvec.f32();
        float* Pt = st.f32();
        float* dSt = dst.f32();

        for (int64_t q0 = 0; q0 < len; q0 += kBr) {
          const int qn = int(std::min<int64_t>(kBr, len - q0));
          pack_transposed(Qt + q0 * HD, qb + q0 * ld, ld, qn, HD);
          pack_transposed(dOt + q0 * HDv, dob + q0 * C, C, qn, HDv);
        }
        // Padded query lanes get lse = +inf, so their probabilities are exactly 0.
        for (int64_t i = 0; i < pad; i++) {
          L[i] = i < len ? lse[int64_t(h) * N + sp.start + i] : kInf;
          D[i] = i < len ? dot(dob + i * C, ob + i * C, HDv) : 0.0f;
        }

        const vfloat scale = splat(p.scale);
        for (int64_t k0 = 0; k0 < len; k0 += kBc) {
          const int kn = int(std::min<int64_t>(kBc, len - k0));
          float* dKb = dkb + k0 * ld;
          float* dVb = dvb + k0 * ld;
          // With causality, query tiles that end before key k0 see none of these keys; with a window, nor do
          // queries at or past the last key + window.
          const int64_t qstart = p.causal ? k0 / kBr * kBr : 0;
          const int64_t qend = p.window > 0 ? std::min<int64_t>(len, k0 + kn - 1 + p.window) : len;
          for (int64_t q0 = qstart; q0 < qend; q0 += kBr) {
            const int qn = int(std::min<int64_t>(kBr, len - q0));
            const int nvq = (qn + kLanes - 1) / kLanes, lanes = nvq * kLanes;
            const bool mask = p.causal && k0 + kn - 1 > q0;
            const bool wmask = window_masks(p, q0, qn, k0);
            const Trim lanes_from = mask ? Trim::kLanesFrom : Trim::kNone;
            const int delta = int(k0 - q0);
            // Sᵀ = K·Qᵀ into Pt, dPᵀ = V·dOᵀ into dSt; both become Pᵀ and dSᵀ in place below.
            bgemm(Pt, kBr, kn, lanes, kb + k0 * ld, ld, 1, Qt + q0 * HD, kBr, HD, false, lanes_from, delta);
            bgemm(dSt, kBr, kn, lanes, vb + k0 * ld, ld, 1, dOt + q0 * HDv, kBr, HDv, false, lanes_from, delta);
            for (int j = 0; j < kn; j++)
              for (int v = 0; v < nvq; v++) {
                const vfloat x = load(Pt + j * kBr + v * kLanes) * scale - load(L + q0 + v * kLanes);
                const vfloat dp = load(dSt + j * kBr + v * kLanes);
                vfloat pr = vexp(x), ds = pr * (dp - load(D + q0 + v * kLanes)) * scale;
                if (mask) {
                  // Hidden entries may hold stale values (their products were skipped): select exact zeros.
                  const vint visible = causal_visible(v, q0, k0, j);
                  pr = visible ? pr : vfloat{};
                  ds = visible ? ds : vfloat{};
                }
                if (wmask) {
                  const vint visible = window_visible(v, q0, k0, j, p.window);
                  pr = visible ? pr : vfloat{};
                  ds = visible ? ds : vfloat{};
                }
                store(Pt + j * kBr + v * kLanes, pr);
                store(dSt + j * kBr + v * kLanes, ds);
              }
            const Trim k_from = mask ? Trim::kKFrom : Trim::kNone, k_up_to = mask ? Trim::kKUpTo : Trim::kNone;
            // The first contribution to a gradient row overwrites it (dqkv is not zeroed beforehand): the group's
            // first head's first query tile for dK, dV; the first key tile the query tile sees (k0 = 0 without a
            // window) for dQ.
            const bool first_q = g == 0 && q0 == qstart, first_k = k0 == first_key_tile(p, q0);
            // dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K (scale is folded into dS).
            bgemm(dVb, ld, kn, HDv, Pt, kBr, 1, dob + q0 * C, C, qn, !first_q, k_from, delta);
            bgemm(dKb, ld, kn, HD, dSt, kBr, 1, qb + q0 * ld, ld, qn, !first_q, k_from, delta);
            bgemm(dqb + q0 * ld, ld, qn, HD, dSt, 1, kBr, kb + k0 * ld, ld, kn, !first_k, k_up_to, -delta);
          }
        }
      }  // query heads of the group
    }
  }
}

}  // namespace kiln::cpu
