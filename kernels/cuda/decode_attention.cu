// Decode attention on tensor cores with flash-decoding splits.
//
// The Tq (<= 16) new queries of a (sequence, head) are one 16-row mma tile (rows past Tq are zero). A block
// of 4 warps handles one (split, head, sequence): its range of the cached keys in tiles of 64, loaded with a
// two-stage cp.async pipeline; warp w scores keys w·16 .. w·16+15 of each tile (S = Q·Kᵀ, two n-blocks),
// keeps its own online-softmax state (m, l, O in registers, exp2 with log2e folded into the scale) and adds
// P·V. At the end the 4 warps' states are merged in shared memory and the block leaves (m, l, Σ p·v) of its
// split in scratch; a second kernel merges the splits of every (query, head) and writes bf16.
// Positions come from past_per_seq on the device; grids depend only on B, Tq, NH and max_past, so a captured
// CUDA graph replays correctly as the cache grows. Query i of sequence b sees keys 0 .. past_b + i, and with a
// sliding window only those after past_b + i − window: a split skips the tiles before the window of its first
// query (it leaves an empty partial when none remains) and the scores outside it are masked.
// Grouped-query attention: query head h reads cache head h / (NH / NKV).
// Tree attention (Medusa's candidate trees) takes the SIMT kernel below: query i skips the new keys its mask
// leaves out (they are other branches of the tree); the tensor-core kernel stays causal-only.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cuda/simt.cuh"
#include "kernels/decode_attention.h"

namespace kiln::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kTile = 64, kWarps = kTile / 16, kThreads = kWarps * 32;
constexpr int kTargetBlocks = 264;  // enough blocks to fill ~2 waves of a 132-SM GPU when B·NH is small

struct Args {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* part;  // [B·Tq][NH][splits][2 + HD]: m (log2 domain), l, Σ p·v
  const int32_t* past;
  int64_t q_stride, kv_batch_stride, kv_stride, out_stride;
  int Tq, NH, group, window, splits, tiles_per_split;  // group = NH / NKV
  float scale_log2;
  const int32_t* table;  // paged cache: [B][table_stride] block ids (null: contiguous slabs)
  int block_size;
  int64_t table_stride;
};

// Where key j of sequence b starts (values from the cache's start); a tile of kTile keys never crosses a
// block (block_size is a multiple of kTile), so a tile's rows are kv_stride apart either way.
KILN_DEVICE int64_t key_at(const Args& a, int b, int64_t j) {
  if (!a.table) return int64_t(b) * a.kv_batch_stride + j * a.kv_stride;
  return (int64_t(a.table[int64_t(b) * a.table_stride + j / a.block_size]) * a.block_size + j % a.block_size) *
         a.kv_stride;
}

template <int HD>
constexpr size_t smem_bytes() {
  return size_t(16 + 4 * kTile) * (HD + 8) * sizeof(uint16_t);  // Q, then K and V in two stages
}

// rows [0, ROWS) of a strided bf16 block into shared memory (row stride LD); rows >= valid are zero-filled.
template <int ROWS, int HD, int LD>
KILN_DEVICE void load_rows(uint16_t* s, const uint16_t* g, int64_t stride, int valid) {
  constexpr int kChunks = HD / 8;
  for (int c = int(threadIdx.x); c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = r < valid;
    simt::cp_async_16_zfill(s + r * LD + cc * 8, ok ? g + r * stride + cc * 8 : g, ok ? 16 : 0);
  }
}

KILN_DEVICE void mma(float d[4], const uint32_t a[4], const uint32_t* b) { simt::mma_bf16_16816(d, a, b, d); }

template <int HD>
KILN_GLOBAL void __launch_bounds__(kThreads) decode_split_kernel(Args a) {
  constexpr int LD = HD + 8, KD = HD / 16, ND = HD / 8;
  const int split = int(blockIdx.x), h = int(blockIdx.y), b = int(blockIdx.z);
  const int warp = simt::warp_id(), lane = simt::lane_id(), g = lane >> 2, t = lane & 3, l8 = lane >> 3, r8 = lane & 7;
  const int past = a.past[b], nkeys = past + a.Tq;  // keys any query of this sequence sees
  // The window hides keys <= past − window from every query (query 0's bound is the lowest).
  const int first = a.window > 0 ? std::max(0, past - a.window + 1) / kTile : 0;
  const int tile0 = std::max(split * a.tiles_per_split, first);
  const int tile1 = std::min((split + 1) * a.tiles_per_split, (nkeys + kTile - 1) / kTile);

  uint16_t* sQ = simt::dynamic_smem<uint16_t>();
  uint16_t* sK = sQ + 16 * LD;       // [2][kTile][LD]
  uint16_t* sV = sK + 2 * kTile * LD;  // [2][kTile][LD]
  const int64_t kvh = h / a.group;
  const uint16_t* kg = a.k + kvh * HD;  // key j of this sequence: kg + key_at(a, b, j)
  const uint16_t* vg = a.v + kvh * HD;

  float o[ND][4];
  KILN_UNROLL
  for (int i = 0; i < ND; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

  if (tile0 < tile1) {
    load_rows<16, HD, LD>(sQ, a.q + int64_t(b) * a.Tq * a.q_stride + int64_t(h) * HD, a.q_stride, a.Tq);
    const int kb = tile0 * kTile;
    load_rows<kTile, HD, LD>(sK, kg + key_at(a, b, kb), a.kv_stride, nkeys - kb);
    load_rows<kTile, HD, LD>(sV, vg + key_at(a, b, kb), a.kv_stride, nkeys - kb);
    simt::cp_async_commit();
    uint32_t qf[KD][4];
    for (int tile = tile0; tile < tile1; tile++) {
      const int j = tile - tile0, k0 = tile * kTile;
      if (tile + 1 < tile1) {
        const int st = (j + 1) & 1, kn = k0 + kTile;
        load_rows<kTile, HD, LD>(sK + st * kTile * LD, kg + key_at(a, b, kn), a.kv_stride, nkeys - kn);
        load_rows<kTile, HD, LD>(sV + st * kTile * LD, vg + key_at(a, b, kn), a.kv_stride, nkeys - kn);
        simt::cp_async_commit();
        simt::cp_async_wait<1>();
      } else {
        simt::cp_async_wait<0>();
      }
      __syncthreads();
      if (j == 0) {
        KILN_UNROLL
        for (int kk = 0; kk < KD; kk++)
          simt::ldmatrix_x4(qf[kk], sQ + ((l8 & 1) * 8 + r8) * LD + kk * 16 + (l8 >> 1) * 8);
      }
      const int kw = k0 + warp * 16;  // this warp's first key
      if (kw < nkeys) {
        const uint16_t* tK = sK + (j & 1) * kTile * LD + warp * 16 * LD;
        const uint16_t* tV = sV + (j & 1) * kTile * LD + warp * 16 * LD;
        float s[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
        KILN_UNROLL
        for (int kk = 0; kk < KD; kk++) {
          uint32_t bf[4];
          simt::ldmatrix_x4(bf, tK + ((l8 >> 1) * 8 + r8) * LD + kk * 16 + (l8 & 1) * 8);
          mma(s[0], qf[kk], bf);
          mma(s[1], qf[kk], bf + 2);
        }
        float mx_a = -INFINITY, mx_b = -INFINITY;
        KILN_UNROLL
        for (int nb = 0; nb < 2; nb++)
          KILN_UNROLL
          for (int e = 0; e < 4; e++) {
            const int key = kw + nb * 8 + 2 * t + (e & 1), row = g + (e < 2 ? 0 : 8);
            const bool seen = key <= past + row && (a.window <= 0 || key > past + row - a.window);
            const float x = seen ? s[nb][e] * a.scale_log2 : -INFINITY;
            s[nb][e] = x;
            if (e < 2) mx_a = fmaxf(mx_a, x);
            else mx_b = fmaxf(mx_b, x);
          }
        mx_a = fmaxf(m_a, fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1)));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(m_b, fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1)));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        // Rows that have seen no visible key yet keep m = -inf: exponentiate against 0 (all terms are 0).
        const float base_a = mx_a == -INFINITY ? 0.0f : mx_a, base_b = mx_b == -INFINITY ? 0.0f : mx_b;
        const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
        m_a = mx_a;
        m_b = mx_b;
        KILN_UNROLL
        for (int nb = 0; nb < 2; nb++) {
          s[nb][0] = exp2f(s[nb][0] - base_a);
          s[nb][1] = exp2f(s[nb][1] - base_a);
          s[nb][2] = exp2f(s[nb][2] - base_b);
          s[nb][3] = exp2f(s[nb][3] - base_b);
        }
        l_a = l_a * alpha_a + s[0][0] + s[0][1] + s[1][0] + s[1][1];
        l_b = l_b * alpha_b + s[0][2] + s[0][3] + s[1][2] + s[1][3];
        const uint32_t pf[4] = {simt::pack_bf16x2(s[0][0], s[0][1]), simt::pack_bf16x2(s[0][2], s[0][3]),
                                simt::pack_bf16x2(s[1][0], s[1][1]), simt::pack_bf16x2(s[1][2], s[1][3])};
        KILN_UNROLL
        for (int nd = 0; nd < ND; nd += 2) {
          o[nd][0] *= alpha_a, o[nd][1] *= alpha_a, o[nd][2] *= alpha_b, o[nd][3] *= alpha_b;
          o[nd + 1][0] *= alpha_a, o[nd + 1][1] *= alpha_a, o[nd + 1][2] *= alpha_b, o[nd + 1][3] *= alpha_b;
          uint32_t bf[4];
          simt::ldmatrix_x4_trans(bf, tV + ((l8 & 1) * 8 + r8) * LD + nd * 8 + (l8 >> 1) * 8);
          mma(o[nd], pf, bf);
          mma(o[nd + 1], pf, bf + 2);
        }
      }
      __syncthreads();  // the next iteration refills this stage; after the last, the tiles' memory is reused
    }
  }

  // Merge the warps' states through shared memory (fp32, over the K/V stages), then one split's partial.
  float* wm = reinterpret_cast<float*>(sK);  // [kWarps][16]
  float* wl = wm + kWarps * 16;              // [kWarps][16]
  float* wo = wl + kWarps * 16;              // [kWarps][16][HD]
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  if (t == 0) {
    wm[warp * 16 + g] = m_a, wm[warp * 16 + g + 8] = m_b;
    wl[warp * 16 + g] = l_a, wl[warp * 16 + g + 8] = l_b;
  }
  float* mo = wo + warp * 16 * HD;
  KILN_UNROLL
  for (int nd = 0; nd < ND; nd++) {
    mo[g * HD + nd * 8 + 2 * t] = o[nd][0];
    mo[g * HD + nd * 8 + 2 * t + 1] = o[nd][1];
    mo[(g + 8) * HD + nd * 8 + 2 * t] = o[nd][2];
    mo[(g + 8) * HD + nd * 8 + 2 * t + 1] = o[nd][3];
  }
  __syncthreads();
  for (int idx = int(threadIdx.x); idx < a.Tq * HD; idx += kThreads) {
    const int i = idx / HD, d = idx % HD;
    float m = -INFINITY;
    for (int w = 0; w < kWarps; w++) m = fmaxf(m, wm[w * 16 + i]);
    float l = 0.0f, acc = 0.0f;
    if (m != -INFINITY)
      for (int w = 0; w < kWarps; w++) {
        const float f = exp2f(wm[w * 16 + i] - m);  // 0 for a warp that saw nothing
        l += f * wl[w * 16 + i];
        acc += f * wo[(w * 16 + i) * HD + d];
      }
    float* slot = a.part + ((int64_t(b * a.Tq + i) * a.NH + h) * a.splits + split) * (2 + HD);
    slot[2 + d] = acc;
    if (d == 0) slot[0] = m, slot[1] = l;
  }
}

// One block per (sequence·query, head), one thread per head dim: combines the splits.
template <int HD>
KILN_GLOBAL void decode_merge_kernel(Args a) {
  const int row = int(blockIdx.x), h = int(blockIdx.y), d = int(threadIdx.x);
  const float* slots = a.part + (int64_t(row) * a.NH + h) * a.splits * (2 + HD);
  float m = -INFINITY;
  for (int s = 0; s < a.splits; s++) m = fmaxf(m, slots[s * (2 + HD)]);
  float l = 0.0f, acc = 0.0f;
  for (int s = 0; s < a.splits; s++) {
    const float* sl = slots + s * (2 + HD);
    if (sl[1] == 0.0f) continue;  // a split past this query's keys
    const float f = exp2f(sl[0] - m);
    l += f * sl[1];
    acc += f * sl[2 + d];
  }
  a.out[int64_t(row) * a.out_stride + int64_t(h) * HD + d] = simt::f32_to_bf16(acc / l);
}

// ---- any head dims (latent attention's absorbed form: keys of kv_lora_rank + rope dims, values the latent) ----
// One block of kWideWarps warps per (head, query, sequence). The query sits in shared memory as fp32; warp w
// takes keys w, w + kWideWarps, ... of the visible range, a key's score one warp-wide dot product (lanes over
// dims), and keeps its online softmax (m, l) and the weighted values (lane d holds dims d, d + 32, ...). The
// warps' states merge in shared memory at the end. No splits: the block walks the whole visible range.
constexpr int kWideWarps = 4, kWideThreads = kWideWarps * 32, kWideMaxV = 512;

struct WideArgs {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  const int32_t* past;
  int64_t q_stride, kv_batch_stride, kv_stride, v_batch_stride, v_stride, out_stride;
  int Tq, NH, group, window, HD, HDv;
  float scale_log2;
  const uint64_t* tree;  // [Tq] node masks over the new keys, or null (causal)
  const int32_t* table;  // paged cache: [B][table_stride] block ids (null: contiguous slabs)
  int block_size;
  int64_t table_stride;
};

// The row (in units of the row strides) of key j of sequence b: its slab's, or its block's in the pool.
KILN_DEVICE int64_t wide_row(const WideArgs& a, int b, int64_t j) {
  if (!a.table) return j;
  return int64_t(a.table[int64_t(b) * a.table_stride + j / a.block_size]) * a.block_size + j % a.block_size;
}

KILN_GLOBAL void __launch_bounds__(kWideThreads) decode_wide_kernel(WideArgs a) {
  const int h = int(blockIdx.x), i = int(blockIdx.y), b = int(blockIdx.z);
  const int warp = simt::warp_id(), lane = simt::lane_id();
  float* sq = simt::dynamic_smem<float>();  // [HD] the query, then [kWideWarps][2 + HDv] the warps' states
  float* st = sq + a.HD;
  const uint16_t* qrow = a.q + (int64_t(b) * a.Tq + i) * a.q_stride + int64_t(h) * a.HD;
  for (int d = int(threadIdx.x); d < a.HD; d += kWideThreads) sq[d] = simt::bf16_to_f32(qrow[d]);
  __syncthreads();
  const int64_t kvh = h / a.group;
  // A paged cache's pools have no per-sequence slab: the rows come from the block table.
  const uint16_t* kb = a.k + (a.table ? 0 : int64_t(b) * a.kv_batch_stride) + kvh * a.HD;
  const uint16_t* vb = a.v + (a.table ? 0 : int64_t(b) * a.v_batch_stride) + kvh * a.HDv;
  const int past = a.past[b], self = past + i;  // this query's slot: it sees keys lo .. self
  const int lo = a.window > 0 ? std::max(0, self - a.window + 1) : 0;
  // A tree node sees the cache and the new keys of its ancestors and itself (bits of its mask; none past i).
  const uint64_t mask = a.tree ? a.tree[i] : ~uint64_t(0);
  float m = -INFINITY, l = 0.0f, acc[kWideMaxV / 32];
  KILN_UNROLL
  for (int r = 0; r < kWideMaxV / 32; r++) acc[r] = 0.0f;
  for (int j = lo + warp; j <= self; j += kWideWarps) {
    if (j >= past && !((mask >> (j - past)) & 1)) continue;  // the same j in every lane: the warp stays together
    const int64_t row = wide_row(a, b, j);
    const uint16_t* kr = kb + row * a.kv_stride;
    float dot = 0.0f;
    for (int d = lane; d < a.HD; d += 32) dot += sq[d] * simt::bf16_to_f32(kr[d]);
    const float x = simt::warp_sum(dot) * a.scale_log2;  // every lane holds the score
    const float mn = fmaxf(m, x), alpha = exp2f(m - mn), p = exp2f(x - mn);
    m = mn;
    l = l * alpha + p;
    const uint16_t* vr = vb + row * a.v_stride;
    KILN_UNROLL
    for (int r = 0; r < kWideMaxV / 32; r++) {
      const int d = lane + 32 * r;
      if (d < a.HDv) acc[r] = acc[r] * alpha + p * simt::bf16_to_f32(vr[d]);
    }
  }
  float* ws = st + warp * (2 + a.HDv);
  if (lane == 0) ws[0] = m, ws[1] = l;
  KILN_UNROLL
  for (int r = 0; r < kWideMaxV / 32; r++) {
    const int d = lane + 32 * r;
    if (d < a.HDv) ws[2 + d] = acc[r];
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int w = 0; w < kWideWarps; w++) mx = fmaxf(mx, st[w * (2 + a.HDv)]);
  uint16_t* orow = a.out + (int64_t(b) * a.Tq + i) * a.out_stride + int64_t(h) * a.HDv;
  for (int d = int(threadIdx.x); d < a.HDv; d += kWideThreads) {
    float sum = 0.0f, val = 0.0f;
    for (int w = 0; w < kWideWarps; w++) {
      const float* s = st + w * (2 + a.HDv);
      if (s[1] == 0.0f) continue;  // a warp that saw no key
      const float f = exp2f(s[0] - mx);
      sum += f * s[1];
      val += f * s[2 + d];
    }
    orow[d] = simt::f32_to_bf16(val / sum);
  }
}

bool tensor_core_shape(const DecodeAttention& p) {
  const int hdv = p.HDv > 0 ? p.HDv : p.HD;
  return (p.HD == 64 || p.HD == 128) && hdv == p.HD && (p.v_stride == 0 || p.v_stride == p.kv_stride) &&
         (p.v_batch_stride == 0 || p.v_batch_stride == p.kv_batch_stride);
}

void decode_wide(const DecodeAttention& p, cudaStream_t s) {
  const int hdv = p.HDv > 0 ? p.HDv : p.HD;
  KILN_CHECK(!p.pages || p.pages.block_size > 0, "decode_attention: a paged cache needs a block size");
  KILN_CHECK(p.HD >= 1 && hdv >= 1 && hdv <= kWideMaxV, "decode_attention: value head dim ", hdv, " (at most ",
             kWideMaxV, ")");
  KILN_CHECK(!p.tree || (p.window == 0 && p.Tq <= 64), "decode_attention: a tree takes at most 64 queries and ",
             "no sliding window (Tq = ", p.Tq, ", window = ", p.window, ")");
  const WideArgs args{p.q, p.k, p.v, p.out, p.past_per_seq, p.q_stride, p.kv_batch_stride, p.kv_stride,
                      p.v_batch_stride > 0 ? p.v_batch_stride : p.kv_batch_stride,
                      p.v_stride > 0 ? p.v_stride : p.kv_stride, p.out_stride, p.Tq, p.NH,
                      p.NH / (p.NKV > 0 ? p.NKV : p.NH), p.window, p.HD, hdv, p.scale * kLog2e, p.tree,
                      p.pages.table, p.pages.block_size, p.pages.stride};
  const size_t smem = (size_t(p.HD) + size_t(kWideWarps) * (2 + hdv)) * sizeof(float);
  simt::launch(decode_wide_kernel, dim3(unsigned(p.NH), unsigned(p.Tq), unsigned(p.B)), dim3(kWideThreads), smem, s,
               args);
}

// The split plan: a function of the sizes only (never of the positions), so the scratch size and the grids
// stay fixed while a captured graph replays.
struct Plan {
  int splits, tiles_per_split;
};
Plan plan_of(const DecodeAttention& p) {
  const int max_tq = p.tree ? 64 : 16;
  KILN_CHECK(p.B >= 0 && p.Tq >= 1 && p.Tq <= max_tq && p.NH >= 1, "decode_attention: bad sizes B=", p.B, " Tq=",
             p.Tq, " NH=", p.NH, " (the CUDA kernel takes 1..16 queries per sequence, a tree 1..64 nodes)");
  KILN_CHECK(p.NKV >= 0 && p.NH % (p.NKV > 0 ? p.NKV : p.NH) == 0 && p.window >= 0, "decode_attention: NKV (",
             p.NKV, ") must divide NH (", p.NH, ") and window (", p.window, ") be >= 0");
  KILN_CHECK(p.max_past >= p.Tq, "decode_attention: max_past (", p.max_past, ") must bound past + Tq (Tq = ", p.Tq,
             ")");
  if (p.tree || !tensor_core_shape(p)) return {0, 0};  // the SIMT kernel: no splits, no scratch
  const int tiles = (p.max_past + kTile - 1) / kTile;
  const int64_t pairs = std::max<int64_t>(1, int64_t(p.B) * p.NH);
  const int want = int(std::max<int64_t>(1, (kTargetBlocks + pairs - 1) / pairs));
  const int splits = std::min(tiles, want);
  const int per = (tiles + splits - 1) / splits;
  return {(tiles + per - 1) / per, per};
}

}  // namespace

size_t decode_attention_scratch_bytes(const DecodeAttention& p) {
  const Plan pl = plan_of(p);
  if (pl.splits == 0) return 0;
  return size_t(p.B) * p.Tq * p.NH * pl.splits * (2 + p.HD) * sizeof(float);
}

void decode_attention(const DecodeAttention& p, void* scratch, void* stream) {
  const Plan pl = plan_of(p);
  if (p.B == 0) return;
  KILN_CHECK(p.q && p.k && p.v && p.out && p.past_per_seq, "decode_attention: null pointer argument");
  if (pl.splits == 0) return decode_wide(p, static_cast<cudaStream_t>(stream));  // needs no scratch
  KILN_CHECK(scratch, "decode_attention: null scratch");
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  KILN_CHECK(aligned(p.q) && aligned(p.k) && aligned(p.v) && p.q_stride % 8 == 0 && p.kv_stride % 8 == 0 &&
                 p.kv_batch_stride % 8 == 0,
             "decode_attention: q, k, v and their strides must be 16-byte aligned (strides multiples of 8)");
  const Args args{p.q, p.k, p.v, p.out, static_cast<float*>(scratch), p.past_per_seq, p.q_stride,
                  p.kv_batch_stride, p.kv_stride, p.out_stride, p.Tq, p.NH, p.NH / (p.NKV > 0 ? p.NKV : p.NH), p.window,
                  pl.splits, pl.tiles_per_split,
                  p.scale * kLog2e, p.pages.table, p.pages.block_size, p.pages.stride};
  KILN_CHECK(!p.pages || (p.pages.block_size > 0 && p.pages.block_size % kTile == 0),
             "decode_attention: a paged cache's block size (", p.pages.block_size, ") must be a multiple of ", kTile);
  const auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(unsigned(pl.splits), unsigned(p.NH), unsigned(p.B));
  const dim3 merge_grid(unsigned(p.B * p.Tq), unsigned(p.NH));
  if (p.HD == 64) {
    simt::launch(decode_split_kernel<64>, grid, dim3(kThreads), smem_bytes<64>(), s, args);
    simt::launch(decode_merge_kernel<64>, merge_grid, dim3(64), 0, s, args);
  } else {
    static const bool ok = simt::allow_smem(decode_split_kernel<128>, smem_bytes<128>()) == cudaSuccess;
    KILN_CHECK(ok, "decode_attention: the device cannot give ", smem_bytes<128>(), " bytes of shared memory");
    simt::launch(decode_split_kernel<128>, grid, dim3(kThreads), smem_bytes<128>(), s, args);
    simt::launch(decode_merge_kernel<128>, merge_grid, dim3(128), 0, s, args);
  }
}

// One thread per pair of bf16 values of K or V (qkv rows [NH q | NKV k | NKV v] heads, cache rows NKV·HD).
KILN_GLOBAL void kv_append_kernel(uint16_t* k_cache, uint16_t* v_cache, const uint16_t* qkv, const int32_t* past,
                                  int Tq, int NH, int NKV, int HD, int64_t kv_batch_stride, int64_t total,
                                  const int32_t* table, int block_size, int64_t table_stride) {
  const int64_t C = int64_t(NKV) * HD, half = C / 2, row_len = int64_t(NH + 2 * NKV) * HD;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / half, c = 2 * (i % half);  // row = b·Tq + j
    const int64_t b = row / Tq, j = row % Tq;
    const int64_t pos = past[b] + j;
    const int64_t dst = table ? (int64_t(table[b * table_stride + pos / block_size]) * block_size + pos % block_size) * C + c
                              : b * kv_batch_stride + pos * C + c;
    const uint16_t* src = qkv + row * row_len + int64_t(NH) * HD + c;
    *reinterpret_cast<uint32_t*>(k_cache + dst) = *reinterpret_cast<const uint32_t*>(src);
    *reinterpret_cast<uint32_t*>(v_cache + dst) = *reinterpret_cast<const uint32_t*>(src + C);
  }
}

void kv_cache_append(uint16_t* k_cache, uint16_t* v_cache, const uint16_t* qkv, const int32_t* past_per_seq, int B,
                     int Tq, int NH, int NKV, int HD, int64_t kv_batch_stride, void* stream, const KVPages& pages) {
  if (NKV == 0) NKV = NH;
  KILN_CHECK(!pages || pages.block_size > 0, "kv_cache_append: a paged cache needs a block size");
  KILN_CHECK(B >= 0 && Tq >= 0 && NH >= 1 && NKV >= 1 && NH % NKV == 0 && HD >= 2 && HD % 2 == 0 &&
                 kv_batch_stride % 2 == 0,
             "kv_cache_append: bad sizes B=", B, " Tq=", Tq, " NH=", NH, " NKV=", NKV, " HD=", HD);
  const int64_t total = int64_t(B) * Tq * NKV * HD / 2;
  if (total == 0) return;
  KILN_CHECK(k_cache && v_cache && qkv && past_per_seq, "kv_cache_append: null pointer argument");
  const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 1024));
  simt::launch(kv_append_kernel, dim3(blocks), dim3(256), 0, static_cast<cudaStream_t>(stream), k_cache, v_cache,
               qkv, past_per_seq, Tq, NH, NKV, HD, kv_batch_stride, total, pages.table, pages.block_size, pages.stride);
}

}  // namespace kiln::cuda
