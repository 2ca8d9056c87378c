// FlashAttention-2 on tensor cores (mma.sync m16n8k16, bf16 operands, fp32 accumulators and softmax).
//
// Forward: one block per (query tile of kBr = 128 rows, head, sequence), 8 warps, each owning 16 query rows.
// The block walks the key tiles (kBc = 64 keys) with a two-stage cp.async pipeline; a warp keeps its Q
// fragments, the scores S = Q·Kᵀ, the online-softmax statistics (m, l) and its O rows in registers. Scores are
// scaled by scale·log2(e) so the softmax is exp2; P is rounded to bf16 A fragments in registers and multiplied by
// V (ldmatrix .trans). Causal: key tiles after the query tile are never loaded; a warp skips the tiles entirely
// above its rows; tiles on the diagonal or past a sequence end are masked element by element.
//
// Backward: D = rowsum(dO∘O) first (one warp per row, also zeroing the fp32 dQ accumulator); then one block per
// (key tile of kBcB = 128 keys, head, sequence), 8 warps each owning 16 keys, walking the query tiles (64 rows):
// Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q,
// all per warp in registers; dSᵀ goes through shared memory so the block computes dQ_tile = dS·K, added to
// the fp32 accumulator with atomicAdd. A last kernel writes scale·dQ as bf16. dK (scaled) and dV are written
// once per key tile. Shared-memory rows are padded by 16 bytes so ldmatrix's 8 rows fall in distinct banks.
//
// Grouped-query attention: query head h reads kv head h / group (group = NH / NKV; qkv rows are
// [NH q | NKV k | NKV v] heads). The backward's block belongs to a kv head and walks the query tiles of every
// query head of its group in turn, so dK and dV sum the group in registers (deterministic, one write).
// Sliding window (causal, window > 0): query i sees keys j with i − window < j <= i. The forward starts at the
// first key tile inside its query tile's window, the backward stops at the last query tile that sees its key
// tile; warps skip tiles wholly outside, and tiles crossing the window's edge are masked element by element.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/attention.h"
#include "kernels/cuda/simt.cuh"

namespace kiln::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The rows of one sequence.
struct SeqSpan {
  int64_t start;
  int len;
};
KILN_DEVICE SeqSpan seq_span(const int32_t* cu_seqlens, int T, int s) {
  if (cu_seqlens) return {cu_seqlens[s], cu_seqlens[s + 1] - cu_seqlens[s]};
  return {int64_t(s) * T, T};
}

// Copies rows [0, ROWS) of a [rows, HD] bf16 block (row stride ld elements) into shared memory with row stride
// LD; rows >= valid are zero-filled. All THREADS threads of the block take part.
template <int ROWS, int HD, int LD, int THREADS>
KILN_DEVICE void load_tile(uint16_t* s, const uint16_t* g, int64_t ld, int valid) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  for (int c = int(threadIdx.x); c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, cc = c % kChunks;
    const bool ok = r < valid;
    simt::cp_async_16_zfill(s + r * LD + cc * 8, ok ? g + r * ld + cc * 8 : g, ok ? 16 : 0);
  }
}

// A fragments (16 rows × 16 k) of a row-major shared tile: rows row0.., k columns k0...
KILN_DEVICE void load_a(uint32_t a[4], const uint16_t* s, int ld, int row0, int k0) {
  const int l = simt::lane_id(), m = l >> 3, r = l & 7;
  simt::ldmatrix_x4(a, s + (row0 + (m & 1) * 8 + r) * ld + k0 + (m >> 1) * 8);
}
// B fragments for two n-blocks (n0.., n0+8..) × 16 k, B[k][n] = S[n][k] (rows of S are n: K rows for Q·Kᵀ).
// b[0..1] is n-block n0, b[2..3] n-block n0 + 8.
KILN_DEVICE void load_b_nmajor(uint32_t b[4], const uint16_t* s, int ld, int n0, int k0) {
  const int l = simt::lane_id(), m = l >> 3, r = l & 7;
  simt::ldmatrix_x4(b, s + (n0 + (m >> 1) * 8 + r) * ld + k0 + (m & 1) * 8);
}
// B fragments for two n-blocks × 16 k, B[k][n] = S[k][n] (rows of S are k: V rows for P·V), through .trans.
KILN_DEVICE void load_b_kmajor(uint32_t b[4], const uint16_t* s, int ld, int n0, int k0) {
  const int l = simt::lane_id(), m = l >> 3, r = l & 7;
  simt::ldmatrix_x4_trans(b, s + (k0 + (m & 1) * 8 + r) * ld + n0 + (m >> 1) * 8);
}
// A fragments of A = Sᵀ (16 rows × 16 k) where shared S is stored [k][row] (dS for dQ = dS·K).
KILN_DEVICE void load_a_trans(uint32_t a[4], const uint16_t* s, int ld, int row0, int k0) {
  const int l = simt::lane_id(), m = l >> 3, r = l & 7;
  simt::ldmatrix_x4_trans(a, s + (k0 + (m >> 1) * 8 + r) * ld + row0 + (m & 1) * 8);
}

KILN_DEVICE void mma(float d[4], const uint32_t a[4], const uint32_t* b) { simt::mma_bf16_16816(d, a, b, d); }

// Row max / sum over the 4 lanes of a quad (the lanes holding one accumulator row).
KILN_DEVICE float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
KILN_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Accumulator tiles [16][8·NB] as the A operand of the next product: k-steps of 16 columns.
template <int NB>
KILN_DEVICE void to_a_frags(uint32_t a[NB / 2][4], const float s[NB][4]) {
  KILN_UNROLL
  for (int kk = 0; kk < NB / 2; kk++) {
    a[kk][0] = simt::pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
    a[kk][1] = simt::pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
    a[kk][2] = simt::pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[kk][3] = simt::pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// acc[ND][4] += A · B over KK k-steps of 16: A as fragments (to_a_frags), B a k-major shared tile (row k of
// the tile holds columns n0 .. n0 + 8·ND, ld elements apart). P·V, Pᵀ·dO and dSᵀ·Q all take this form.
template <int KK, int ND>
KILN_DEVICE void mma_frags_kmajor(float acc[ND][4], const uint32_t a[KK][4], const uint16_t* tile, int ld) {
  KILN_UNROLL
  for (int kk = 0; kk < KK; kk++)
    KILN_UNROLL
    for (int nd = 0; nd < ND; nd += 2) {
      uint32_t b[4];
      load_b_kmajor(b, tile, ld, nd * 8, kk * 16);
      mma(acc[nd], a[kk], b);
      mma(acc[nd + 1], a[kk], b + 2);
    }
}

// acc[NB][4] += A · Bᵀ over KK k-steps of 16: A the 16 rows from row0 of a shared tile (rows row-major, ld
// elements apart), B an n-major shared tile (row n holds the k values). Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ take this form.
template <int KK, int NB>
KILN_DEVICE void mma_tile_nmajor(float acc[NB][4], const uint16_t* a_tile, int row0, const uint16_t* b_tile,
                                 int ld) {
  KILN_UNROLL
  for (int kk = 0; kk < KK; kk++) {
    uint32_t af[4];
    load_a(af, a_tile, ld, row0, kk * 16);
    KILN_UNROLL
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b[4];
      load_b_nmajor(b, b_tile, ld, nb * 8, kk * 16);
      mma(acc[nb], af, b);
      mma(acc[nb + 1], af, b + 2);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward

struct FwdArgs {
  uint16_t* out;
  float* lse;
  const uint16_t* qkv;
  const int32_t* cu_seqlens;
  int T, NH, group, window;  // group = NH / NKV
  int64_t N;
  float scale_log2;  // scale · log2(e)
  int causal;
};

constexpr int kBr = 128, kBc = 64, kFwdWarps = kBr / 16, kFwdThreads = kFwdWarps * 32;

// HDV: the value heads' width (multi-head latent attention: q/k heads of nope + rope dims, narrower values).
template <int HD, int HDV>
constexpr size_t fwd_smem() {
  return size_t(kBr + 2 * kBc) * (HD + 8) * sizeof(uint16_t) +  // Q, then K in two stages
         size_t(2 * kBc) * (HDV + 8) * sizeof(uint16_t);        // V in two stages
}

// Two blocks per SM for HD 64 (<= 128 registers); HD 128 needs ~220 registers, one block of 8 warps.
template <int HD, int HDV>
KILN_GLOBAL void __launch_bounds__(kFwdThreads, HD == 64 ? 2 : 1) attention_fwd_kernel(FwdArgs a) {
  constexpr int LD = HD + 8, LDV = HDV + 8, KD = HD / 16, ND = HDV / 8;
  const SeqSpan sp = seq_span(a.cu_seqlens, a.T, int(blockIdx.z));
  // Heaviest (causal) tiles first: they start while the light ones fill the tail.
  const int q0 = int(gridDim.x - 1 - blockIdx.x) * kBr;
  if (q0 >= sp.len) return;
  const int h = int(blockIdx.y), warp = simt::warp_id(), lane = simt::lane_id(), g = lane >> 2, t = lane & 3;
  const int NKV = a.NH / a.group;
  const int64_t C = int64_t(a.NH) * HDV, ld = int64_t(a.NH + NKV) * HD + int64_t(NKV) * HDV;
  const int64_t kvh = h / a.group;
  const uint16_t* qg = a.qkv + sp.start * ld + int64_t(h) * HD;
  const uint16_t* kg = a.qkv + sp.start * ld + (a.NH + kvh) * HD;
  const uint16_t* vg = a.qkv + sp.start * ld + int64_t(a.NH + NKV) * HD + kvh * HDV;

  uint16_t* sQ = simt::dynamic_smem<uint16_t>();
  uint16_t* sK = sQ + kBr * LD;      // [2][kBc][LD]
  uint16_t* sV = sK + 2 * kBc * LD;  // [2][kBc][LDV]

  const int kend = a.causal && q0 + kBr < sp.len ? q0 + kBr : sp.len;
  // Window: the tile's first query q0 sees keys after q0 − window, the lowest bound of its rows.
  const int kbeg = a.window > 0 ? std::max(0, q0 - a.window + 1) / kBc * kBc : 0;
  const int ntiles = (kend - kbeg + kBc - 1) / kBc;
  const int qw = q0 + warp * 16;  // this warp's first row (sequence-relative)
  const int row_a = qw + g, row_b = qw + g + 8;

  load_tile<kBr, HD, LD, kFwdThreads>(sQ, qg + int64_t(q0) * ld, ld, sp.len - q0);
  load_tile<kBc, HD, LD, kFwdThreads>(sK, kg + int64_t(kbeg) * ld, ld, sp.len - kbeg);
  load_tile<kBc, HDV, LDV, kFwdThreads>(sV, vg + int64_t(kbeg) * ld, ld, sp.len - kbeg);
  simt::cp_async_commit();

  uint32_t qf[KD][4];
  float o[ND][4];
  KILN_UNROLL
  for (int i = 0; i < ND; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

  for (int j = 0; j < ntiles; j++) {
    const int k0 = kbeg + j * kBc;
    if (j + 1 < ntiles) {
      const int st = (j + 1) & 1, kn = k0 + kBc;
      load_tile<kBc, HD, LD, kFwdThreads>(sK + st * kBc * LD, kg + int64_t(kn) * ld, ld, sp.len - kn);
      load_tile<kBc, HDV, LDV, kFwdThreads>(sV + st * kBc * LDV, vg + int64_t(kn) * ld, ld, sp.len - kn);
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
      KILN_UNROLL
      for (int kk = 0; kk < KD; kk++) load_a(qf[kk], sQ, LD, warp * 16, kk * 16);
    }
    // Warps whose rows are past the sequence end, or (causal) entirely above this key tile, or (window) entirely
    // past its window, have nothing to add.
    const bool active = qw < sp.len && !(a.causal && k0 > qw + 15) &&
                        !(a.window > 0 && k0 + kBc - 1 <= qw - a.window);
    if (active) {
      const uint16_t* tK = sK + (j & 1) * kBc * LD;
      const uint16_t* tV = sV + (j & 1) * kBc * LDV;
      float s[kBc / 8][4];
      KILN_UNROLL
      for (int i = 0; i < kBc / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
      KILN_UNROLL
      for (int kk = 0; kk < KD; kk++)
        KILN_UNROLL
        for (int nb = 0; nb < kBc / 8; nb += 2) {
          uint32_t b[4];
          load_b_nmajor(b, tK, LD, nb * 8, kk * 16);
          mma(s[nb], qf[kk], b);
          mma(s[nb + 1], qf[kk], b + 2);
        }
      const bool mask = k0 + kBc > sp.len || (a.causal && k0 + kBc - 1 > qw) ||
                        (a.window > 0 && k0 <= qw + 15 - a.window);
      // Max over the raw scores (scale > 0), then p = exp2(s·scale·log2e − m) as one FMA per score.
      float mx_a = -INFINITY, mx_b = -INFINITY;
      KILN_UNROLL
      for (int nb = 0; nb < kBc / 8; nb++)
        KILN_UNROLL
        for (int e = 0; e < 4; e++) {
          if (mask) {
            const int col = k0 + nb * 8 + 2 * t + (e & 1), row = e < 2 ? row_a : row_b;
            if (col >= sp.len || (a.causal && col > row) || (a.window > 0 && col <= row - a.window))
              s[nb][e] = -INFINITY;
          }
          if (e < 2) mx_a = fmaxf(mx_a, s[nb][e]);
          else mx_b = fmaxf(mx_b, s[nb][e]);
        }
      mx_a = fmaxf(m_a, quad_max(mx_a) * a.scale_log2);
      mx_b = fmaxf(m_b, quad_max(mx_b) * a.scale_log2);
      // A row with every key so far hidden keeps m = -inf; exponentiate against 0 then (all terms are 0).
      const float base_a = mx_a == -INFINITY ? 0.0f : mx_a, base_b = mx_b == -INFINITY ? 0.0f : mx_b;
      const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
      m_a = mx_a;
      m_b = mx_b;
      float sum_a = 0.0f, sum_b = 0.0f;
      KILN_UNROLL
      for (int nb = 0; nb < kBc / 8; nb++) {
        s[nb][0] = exp2f(fmaf(s[nb][0], a.scale_log2, -base_a));
        s[nb][1] = exp2f(fmaf(s[nb][1], a.scale_log2, -base_a));
        s[nb][2] = exp2f(fmaf(s[nb][2], a.scale_log2, -base_b));
        s[nb][3] = exp2f(fmaf(s[nb][3], a.scale_log2, -base_b));
        sum_a += s[nb][0] + s[nb][1];
        sum_b += s[nb][2] + s[nb][3];
      }
      l_a = l_a * alpha_a + sum_a;  // per-lane partial sums; the quad is summed at the end
      l_b = l_b * alpha_b + sum_b;
      KILN_UNROLL
      for (int i = 0; i < ND; i++) {
        o[i][0] *= alpha_a;
        o[i][1] *= alpha_a;
        o[i][2] *= alpha_b;
        o[i][3] *= alpha_b;
      }
      uint32_t pf[kBc / 16][4];
      to_a_frags<kBc / 8>(pf, s);
      mma_frags_kmajor<kBc / 16, ND>(o, pf, tV, LDV);
    }
    __syncthreads();  // the next iteration refills this stage
  }

  if (qw >= sp.len) return;
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
  uint16_t* og = a.out + sp.start * C + int64_t(h) * HDV;
  if (row_a < sp.len) {
    uint32_t* orow = reinterpret_cast<uint32_t*>(og + int64_t(row_a) * C);
    KILN_UNROLL
    for (int i = 0; i < ND; i++) orow[i * 4 + t] = simt::pack_bf16x2(o[i][0] * inv_a, o[i][1] * inv_a);
    if (t == 0) a.lse[int64_t(h) * a.N + sp.start + row_a] = m_a * kLn2 + logf(l_a);
  }
  if (row_b < sp.len) {
    uint32_t* orow = reinterpret_cast<uint32_t*>(og + int64_t(row_b) * C);
    KILN_UNROLL
    for (int i = 0; i < ND; i++) orow[i * 4 + t] = simt::pack_bf16x2(o[i][2] * inv_b, o[i][3] * inv_b);
    if (t == 0) a.lse[int64_t(h) * a.N + sp.start + row_b] = m_b * kLn2 + logf(l_b);
  }
}

// Token count, sequence count and longest sequence of p (cu_seqlens lives on the device: the caller says).
struct Shape {
  int64_t N;
  int seqs, max_len;
};
Shape shape_of(const AttentionParams& p, const char* op) {
  KILN_CHECK(p.NH >= 1, op, ": NH is ", p.NH);
  KILN_CHECK(p.NKV >= 0 && p.NH % kv_heads(p) == 0, op, ": NKV (", p.NKV, ") must divide NH (", p.NH, ")");
  KILN_CHECK(p.window >= 0 && (p.window == 0 || p.causal), op, ": window (", p.window,
             ") must be >= 0 and needs causal attention");
  KILN_CHECK(cuda_attention_dims(p.HD, v_dim(p)), op, ": head dims q/k ", p.HD, ", v ", v_dim(p),
             " are not supported by the CUDA kernel (", kCudaAttentionDims, ")");
  KILN_CHECK(p.scale > 0.0f, op, ": scale must be positive (got ", p.scale, ")");
  KILN_CHECK(p.NH <= 65535, op, ": NH ", p.NH, " exceeds the grid's 65535");
  if (p.cu_seqlens) {
    KILN_CHECK(p.num_seqs >= 0 && p.max_seqlen >= 0 && p.total_tokens >= 0, op,
               ": packed sequences need num_seqs, max_seqlen and total_tokens (got ", p.num_seqs, ", ", p.max_seqlen,
               ", ", p.total_tokens, ")");
    KILN_CHECK(p.num_seqs <= 65535, op, ": ", p.num_seqs, " packed sequences exceed the grid's 65535");
    return {p.total_tokens, p.num_seqs, p.max_seqlen};
  }
  KILN_CHECK(p.B >= 0 && p.T >= 0, op, ": B (", p.B, ") and T (", p.T, ") must be non-negative");
  KILN_CHECK(p.B <= 65535, op, ": batch ", p.B, " exceeds the grid's 65535");
  return {int64_t(p.B) * p.T, p.B, p.T};
}

template <int HD, int HDV>
void forward(uint16_t* out, float* lse, const uint16_t* qkv, const AttentionParams& p, const Shape& sh,
             cudaStream_t stream) {
  constexpr size_t smem = fwd_smem<HD, HDV>();
  static const bool smem_ok = simt::allow_smem(attention_fwd_kernel<HD, HDV>, smem) == cudaSuccess;
  KILN_CHECK(smem_ok, "attention_forward: the device cannot give ", smem, " bytes of shared memory");
  const FwdArgs args{out, lse, qkv, p.cu_seqlens, p.T, p.NH, p.NH / kv_heads(p), p.window, sh.N, p.scale * kLog2e,
                     p.causal ? 1 : 0};
  const dim3 grid(unsigned((sh.max_len + kBr - 1) / kBr), unsigned(p.NH), unsigned(sh.seqs));
  simt::launch(attention_fwd_kernel<HD, HDV>, grid, dim3(kFwdThreads), smem, stream, args);
}

// ---------------------------------------------------------------------------------------------------------
// Backward

struct BwdArgs {
  uint16_t* dqkv;
  const uint16_t* dout;
  const uint16_t* qkv;
  const uint16_t* out;
  const float* lse;
  float* D;       // [NH, N]: rowsum(dO∘O)
  float* dq_acc;  // [N, NH, HD] fp32
  const int32_t* cu_seqlens;
  int T, NH, group, window;  // group = NH / NKV
  int64_t N;
  float scale, scale_log2;
  int causal;
};

// D[h, n] = Σ_d dO[n, h, d]·O[n, h, d] (one warp per row, dO/O heads of HDV), and dq_acc (heads of HD) zeroed.
template <int HD, int HDV>
KILN_GLOBAL void attention_bwd_dot_kernel(BwdArgs a) {
  const int64_t row = int64_t(blockIdx.x) * 8 + simt::warp_id();
  if (row >= a.N * a.NH) return;
  const int64_t n = row / a.NH, h = row % a.NH, off = n * a.NH * HDV + h * HDV, qoff = n * a.NH * HD + h * HD;
  const int lane = simt::lane_id();
  const uint32_t* dy = reinterpret_cast<const uint32_t*>(a.dout + off);
  const uint32_t* y = reinterpret_cast<const uint32_t*>(a.out + off);
  float s = 0.0f;
  KILN_UNROLL
  for (int i = lane; i < HDV / 2; i += 32) {
    const uint32_t u = dy[i], v = y[i];
    s += simt::bf16x2_lo(u) * simt::bf16x2_lo(v) + simt::bf16x2_hi(u) * simt::bf16x2_hi(v);
  }
  KILN_UNROLL
  for (int i = lane; i < HD; i += 32) a.dq_acc[qoff + i] = 0.0f;
  s = simt::warp_sum(s);
  if (lane == 0) a.D[h * a.N + n] = s;
}

constexpr int kBcB = 128, kBrB = 64, kBwdWarps = kBcB / 16, kBwdThreads = kBwdWarps * 32, kLdS = kBrB + 8;

template <int HD, int HDV>
constexpr size_t bwd_smem() {
  // K [kBcB][LD], V [kBcB][LDV]; Q [2][kBrB][LD], dO [2][kBrB][LDV]; dSᵀ [kBcB][kLdS]; lse, D [2][kBrB]
  return size_t(kBcB + 2 * kBrB) * (HD + 8 + HDV + 8) * sizeof(uint16_t) + size_t(kBcB) * kLdS * sizeof(uint16_t) +
         4 * kBrB * sizeof(float);
}

template <int HD, int HDV>
KILN_GLOBAL void __launch_bounds__(kBwdThreads, 1) attention_bwd_kernel(BwdArgs a) {
  constexpr int LD = HD + 8, LDV = HDV + 8, KD = HD / 16, KDV = HDV / 16, ND = HD / 8, NDV = HDV / 8;
  const SeqSpan sp = seq_span(a.cu_seqlens, a.T, int(blockIdx.z));
  const int k0 = int(blockIdx.x) * kBcB;
  if (k0 >= sp.len) return;
  // This block's kv head; it walks the query heads kvh·group .. kvh·group + group − 1.
  const int kvh = int(blockIdx.y), warp = simt::warp_id(), lane = simt::lane_id(), g = lane >> 2, t = lane & 3;
  const int NKV = a.NH / a.group;
  // C: dq_acc's row (heads of HD); CV: out/dout's row (heads of HDV).
  const int64_t C = int64_t(a.NH) * HD, CV = int64_t(a.NH) * HDV, ld = int64_t(a.NH + NKV) * HD + int64_t(NKV) * HDV;
  const int64_t voff = int64_t(a.NH + NKV) * HD + int64_t(kvh) * HDV;  // this kv head's values within a row
  const uint16_t* kg = a.qkv + sp.start * ld + (a.NH + int64_t(kvh)) * HD;
  const uint16_t* vg = a.qkv + sp.start * ld + voff;

  uint16_t* sK = simt::dynamic_smem<uint16_t>();
  uint16_t* sV = sK + kBcB * LD;        // [kBcB][LDV]
  uint16_t* sQ = sV + kBcB * LDV;       // [2][kBrB][LD]
  uint16_t* sdO = sQ + 2 * kBrB * LD;   // [2][kBrB][LDV]
  uint16_t* sdS = sdO + 2 * kBrB * LDV; // [kBcB][kLdS]: dSᵀ, keys × queries
  float* sL = reinterpret_cast<float*>(sdS + kBcB * kLdS);  // [2][kBrB]: lse·log2(e) (+inf past the end)
  float* sD = sL + 2 * kBrB;                                 // [2][kBrB]

  auto load_queries = [&](int stage, int h, int q0) {
    const uint16_t* qg = a.qkv + sp.start * ld + int64_t(h) * HD;
    const uint16_t* dog = a.dout + sp.start * CV + int64_t(h) * HDV;
    const float* lse = a.lse + int64_t(h) * a.N + sp.start;
    const float* Dg = a.D + int64_t(h) * a.N + sp.start;
    load_tile<kBrB, HD, LD, kBwdThreads>(sQ + stage * kBrB * LD, qg + int64_t(q0) * ld, ld, sp.len - q0);
    load_tile<kBrB, HDV, LDV, kBwdThreads>(sdO + stage * kBrB * LDV, dog + int64_t(q0) * CV, CV, sp.len - q0);
    const int i = int(threadIdx.x);
    if (i < kBrB) {
      const bool ok = q0 + i < sp.len;
      sL[stage * kBrB + i] = ok ? lse[q0 + i] * kLog2e : INFINITY;  // P = exp2(-inf) = 0 on padding rows
      sD[stage * kBrB + i] = ok ? Dg[q0 + i] : 0.0f;
    }
  };

  load_tile<kBcB, HD, LD, kBwdThreads>(sK, kg + int64_t(k0) * ld, ld, sp.len - k0);
  load_tile<kBcB, HDV, LDV, kBwdThreads>(sV, vg + int64_t(k0) * ld, ld, sp.len - k0);
  // Causal: queries before the key tile see none of it.
  const int qstart = a.causal ? k0 / kBrB * kBrB : 0;
  // Window: queries from k0 + kBcB − 1 + window on see none of it.
  const int qend = a.window > 0 ? std::min(sp.len, k0 + kBcB - 1 + a.window) : sp.len;
  const int nq = (qend - qstart + kBrB - 1) / kBrB;
  const int h0 = kvh * a.group;
  load_queries(0, h0, qstart);
  simt::cp_async_commit();

  const int kw = k0 + warp * 16;  // this warp's first key
  const int key_a = kw + g, key_b = kw + g + 8;
  float dv[NDV][4], dk[ND][4];
  KILN_UNROLL
  for (int i = 0; i < ND; i++)
    KILN_UNROLL
    for (int e = 0; e < 4; e++) dk[i][e] = 0.0f;
  KILN_UNROLL
  for (int i = 0; i < NDV; i++)
    KILN_UNROLL
    for (int e = 0; e < 4; e++) dv[i][e] = 0.0f;

  // One pipeline over (query head of the group, query tile), so the prefetch runs across heads too.
  for (int it = 0; it < a.group * nq; it++) {
    const int h = h0 + it / nq, q0 = qstart + it % nq * kBrB, st = it & 1;
    if (it + 1 < a.group * nq) {
      load_queries(st ^ 1, h0 + (it + 1) / nq, qstart + (it + 1) % nq * kBrB);
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* tQ = sQ + st * kBrB * LD;
    const uint16_t* tdO = sdO + st * kBrB * LDV;
    const float* tL = sL + st * kBrB;
    const float* tD = sD + st * kBrB;
    uint32_t* dsrow_a = reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * kLdS);
    uint32_t* dsrow_b = reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * kLdS);
    // Nothing to add when this warp's keys are past the end or (causal) after every query of the tile.
    const bool active = kw < sp.len && !(a.causal && q0 + kBrB - 1 < kw) &&
                        !(a.window > 0 && q0 >= kw + 15 + a.window);
    if (active) {
      float s[kBrB / 8][4], dp[kBrB / 8][4];
      KILN_UNROLL
      for (int i = 0; i < kBrB / 8; i++)
        KILN_UNROLL
        for (int e = 0; e < 4; e++) s[i][e] = dp[i][e] = 0.0f;
      // Sᵀ = K·Qᵀ (rows: this warp's 16 keys, columns: the tile's queries)
      mma_tile_nmajor<KD, kBrB / 8>(s, sK, warp * 16, tQ, LD);
      // Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), hidden entries exactly 0.
      const bool mask = kw + 16 > sp.len || (a.causal && q0 < kw + 15) ||
                        (a.window > 0 && q0 + kBrB - 1 >= kw + a.window);
      KILN_UNROLL
      for (int nb = 0; nb < kBrB / 8; nb++)
        KILN_UNROLL
        for (int e = 0; e < 4; e++) {
          const int qi = nb * 8 + 2 * t + (e & 1), key = e < 2 ? key_a : key_b;
          float p = exp2f(s[nb][e] * a.scale_log2 - tL[qi]);
          if (mask && (key >= sp.len || (a.causal && q0 + qi < key) || (a.window > 0 && q0 + qi >= key + a.window)))
            p = 0.0f;
          s[nb][e] = p;
        }
      // dV += Pᵀ·dO
      {
        uint32_t pf[kBrB / 16][4];
        to_a_frags<kBrB / 8>(pf, s);
        mma_frags_kmajor<kBrB / 16, NDV>(dv, pf, tdO, LDV);
      }
      // dPᵀ = V·dOᵀ
      mma_tile_nmajor<KDV, kBrB / 8>(dp, sV, warp * 16, tdO, LDV);
      // dSᵀ = Pᵀ∘(dPᵀ − D)
      KILN_UNROLL
      for (int nb = 0; nb < kBrB / 8; nb++)
        KILN_UNROLL
        for (int e = 0; e < 4; e++) dp[nb][e] = s[nb][e] * (dp[nb][e] - tD[nb * 8 + 2 * t + (e & 1)]);
      uint32_t dsf[kBrB / 16][4];
      to_a_frags<kBrB / 8>(dsf, dp);
      // dK += dSᵀ·Q
      mma_frags_kmajor<kBrB / 16, ND>(dk, dsf, tQ, LD);
      KILN_UNROLL
      for (int kk = 0; kk < kBrB / 16; kk++) {
        dsrow_a[kk * 8 + t] = dsf[kk][0];
        dsrow_b[kk * 8 + t] = dsf[kk][1];
        dsrow_a[kk * 8 + 4 + t] = dsf[kk][2];
        dsrow_b[kk * 8 + 4 + t] = dsf[kk][3];
      }
    } else {
      KILN_UNROLL
      for (int i = t; i < kBrB / 2; i += 4) dsrow_a[i] = dsrow_b[i] = 0u;
    }
    __syncthreads();  // dSᵀ complete; the Q/dO stage is no longer read (the next iteration may refill it)

    // dQ[tile] += dS·K: warp w takes 16 query rows and half (8 warps) of the head dims.
    constexpr int kRowGroups = kBrB / 16, kDimSplit = kBwdWarps / kRowGroups, NQ = ND / kDimSplit;
    const int qr = (warp % kRowGroups) * 16, d0 = (warp / kRowGroups) * (HD / kDimSplit);
    // Key steps of 16 that can hold a nonzero dS for these rows: none past the end, none (causal) after them.
    int ksteps = (sp.len - k0 + 15) / 16;
    if (a.causal) ksteps = std::min(ksteps, (q0 + qr + 16 - k0 + 15) / 16);
    ksteps = std::min(ksteps, kBcB / 16);
    // Window: keys up to row − window are hidden from every one of these rows (their dS is 0).
    const int kfirst = a.window > 0 ? std::max(0, q0 + qr - a.window + 1 - k0) / 16 : 0;
    if (q0 + qr < sp.len && ksteps > kfirst) {
      float dq[NQ][4];
      KILN_UNROLL
      for (int i = 0; i < NQ; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
      for (int kk = kfirst; kk < ksteps; kk++) {
        uint32_t af[4];
        load_a_trans(af, sdS, kLdS, qr, kk * 16);
        KILN_UNROLL
        for (int nd = 0; nd < NQ; nd += 2) {
          uint32_t b[4];
          load_b_kmajor(b, sK, LD, d0 + nd * 8, kk * 16);
          mma(dq[nd], af, b);
          mma(dq[nd + 1], af, b + 2);
        }
      }
      const int row_a = q0 + qr + g, row_b = row_a + 8;
      float* acc_a = a.dq_acc + (sp.start + row_a) * C + int64_t(h) * HD + d0 + 2 * t;
      float* acc_b = acc_a + 8 * C;
      KILN_UNROLL
      for (int nd = 0; nd < NQ; nd++) {
        if (row_a < sp.len) {
          atomicAdd(acc_a + nd * 8, dq[nd][0]);
          atomicAdd(acc_a + nd * 8 + 1, dq[nd][1]);
        }
        if (row_b < sp.len) {
          atomicAdd(acc_b + nd * 8, dq[nd][2]);
          atomicAdd(acc_b + nd * 8 + 1, dq[nd][3]);
        }
      }
    }
    // No barrier here: the next iteration writes dSᵀ only after its first __syncthreads.
  }

  // dK (scaled) and dV rows of this warp.
  uint16_t* dkg = a.dqkv + sp.start * ld + (a.NH + int64_t(kvh)) * HD;
  uint16_t* dvg = a.dqkv + sp.start * ld + voff;
  if (key_a < sp.len) {
    uint32_t* rk = reinterpret_cast<uint32_t*>(dkg + int64_t(key_a) * ld);
    uint32_t* rv = reinterpret_cast<uint32_t*>(dvg + int64_t(key_a) * ld);
    KILN_UNROLL
    for (int i = 0; i < ND; i++) rk[i * 4 + t] = simt::pack_bf16x2(dk[i][0] * a.scale, dk[i][1] * a.scale);
    KILN_UNROLL
    for (int i = 0; i < NDV; i++) rv[i * 4 + t] = simt::pack_bf16x2(dv[i][0], dv[i][1]);
  }
  if (key_b < sp.len) {
    uint32_t* rk = reinterpret_cast<uint32_t*>(dkg + int64_t(key_b) * ld);
    uint32_t* rv = reinterpret_cast<uint32_t*>(dvg + int64_t(key_b) * ld);
    KILN_UNROLL
    for (int i = 0; i < ND; i++) rk[i * 4 + t] = simt::pack_bf16x2(dk[i][2] * a.scale, dk[i][3] * a.scale);
    KILN_UNROLL
    for (int i = 0; i < NDV; i++) rv[i * 4 + t] = simt::pack_bf16x2(dv[i][2], dv[i][3]);
  }
}

// dqkv's query part = bf16(scale · dq_acc), two elements per thread.
KILN_GLOBAL void attention_bwd_dq_kernel(BwdArgs a, int HD, int64_t row) {
  const int64_t C = int64_t(a.NH) * HD, pairs = a.N * C / 2;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / (C / 2), c = 2 * (i % (C / 2));
    const float* acc = a.dq_acc + n * C + c;
    *reinterpret_cast<uint32_t*>(a.dqkv + n * row + c) = simt::pack_bf16x2(acc[0] * a.scale, acc[1] * a.scale);
  }
}

inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

template <int HD, int HDV>
void backward(const BwdArgs& args, const AttentionParams& p, const Shape& sh, cudaStream_t stream) {
  constexpr size_t smem = bwd_smem<HD, HDV>();
  static const bool smem_ok = simt::allow_smem(attention_bwd_kernel<HD, HDV>, smem) == cudaSuccess;
  KILN_CHECK(smem_ok, "attention_backward: the device cannot give ", smem, " bytes of shared memory");
  const int64_t rows = sh.N * p.NH;
  simt::launch(attention_bwd_dot_kernel<HD, HDV>, dim3(unsigned((rows + 7) / 8)), dim3(256), 0, stream, args);
  const dim3 grid(unsigned((sh.max_len + kBcB - 1) / kBcB), unsigned(kv_heads(p)), unsigned(sh.seqs));
  simt::launch(attention_bwd_kernel<HD, HDV>, grid, dim3(kBwdThreads), smem, stream, args);
  const int64_t pairs = sh.N * p.NH * HD / 2;
  const unsigned blocks = unsigned(std::min<int64_t>((pairs + 255) / 256, 4096));
  simt::launch(attention_bwd_dq_kernel, dim3(blocks), dim3(256), 0, stream, args, HD, qkv_row(p));
}

}  // namespace

void attention_forward(uint16_t* out, float* lse, const uint16_t* qkv, const AttentionParams& p, void* stream) {
  const Shape sh = shape_of(p, "attention_forward");
  if (sh.N == 0 || sh.seqs == 0 || sh.max_len == 0) return;
  KILN_CHECK(out && lse && qkv, "attention_forward: null out, lse or qkv pointer");
  KILN_CHECK(reinterpret_cast<uintptr_t>(qkv) % 16 == 0, "attention_forward: qkv must be 16-byte aligned");
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.HD * 1000 + v_dim(p)) {  // the pairs cuda_attention_dims admits
    case 64064: return forward<64, 64>(out, lse, qkv, p, sh, s);
    case 128128: return forward<128, 128>(out, lse, qkv, p, sh, s);
    case 64032: return forward<64, 32>(out, lse, qkv, p, sh, s);
    default: return forward<192, 128>(out, lse, qkv, p, sh, s);
  }
}

size_t attention_backward_scratch_bytes(const AttentionParams& p) {
  const Shape sh = shape_of(p, "attention_backward");
  return round_up(size_t(sh.N) * p.NH * p.HD * sizeof(float), 256) + size_t(sh.N) * p.NH * sizeof(float);
}

void attention_backward(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                        const float* lse, const AttentionParams& p, void* scratch, void* stream) {
  const Shape sh = shape_of(p, "attention_backward");
  if (sh.N == 0 || sh.seqs == 0 || sh.max_len == 0) return;
  KILN_CHECK(dqkv && dout && qkv && out && lse && scratch, "attention_backward: null pointer argument");
  KILN_CHECK(reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(dout) % 16 == 0,
             "attention_backward: qkv and dout must be 16-byte aligned");
  float* dq_acc = static_cast<float*>(scratch);
  float* D = reinterpret_cast<float*>(static_cast<char*>(scratch) +
                                      round_up(size_t(sh.N) * p.NH * p.HD * sizeof(float), 256));
  const BwdArgs args{dqkv, dout, qkv, out, lse, D, dq_acc, p.cu_seqlens, p.T, p.NH, p.NH / kv_heads(p), p.window,
                     sh.N, p.scale, p.scale * kLog2e, p.causal ? 1 : 0};
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.HD * 1000 + v_dim(p)) {
    case 64064: return backward<64, 64>(args, p, sh, s);
    case 128128: return backward<128, 128>(args, p, sh, s);
    case 64032: return backward<64, 32>(args, p, sh, s);
    default: return backward<192, 128>(args, p, sh, s);
  }
}

}  // namespace kiln::cuda
