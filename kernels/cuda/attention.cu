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
#include <cmath>

#include "core/error.h"
#include "kernels/attention.h"
#include "kernels/cuda/simt.cuh"

// Full unrolling on the GPU (fragment arrays must stay in registers); the host compiler ignores `#pragma unroll`.
#if defined(__CUDACC__)
#define UNROLL _Pragma("unroll")
#else
#define UNROLL
#endif

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
UNROLL
  for (int kk = 0; kk < NB / 2; kk++) {
    a[kk][0] = simt::pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
    a[kk][1] = simt::pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
    a[kk][2] = simt::pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[kk][3] = simt::pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward

struct FwdArgs {
  uint16_t* out;
  float* lse;
  const uint16_t* qkv;
  const int32_t* cu_seqlens;
  int T, NH;
  int64_t N;
  float scale_log2;  // scale · log2(e)
  int causal;
};

constexpr int kBr = 128, kBc = 64, kFwdWarps = kBr / 16, kFwdThreads = kFwdWarps * 32;

template <int HD>
constexpr size_t fwd_smem() {
  return size_t(kBr + 4 * kBc) * (HD + 8) * sizeof(uint16_t);  // Q, then K and V in two stages
}

// Two blocks per SM for HD 64 (<= 128 registers); HD 128 needs ~220 registers, one block of 8 warps.
template <int HD>
KILN_GLOBAL void __launch_bounds__(kFwdThreads, HD == 64 ? 2 : 1) attention_fwd_kernel(FwdArgs a) {
  constexpr int LD = HD + 8, KD = HD / 16, ND = HD / 8;
  const SeqSpan sp = seq_span(a.cu_seqlens, a.T, int(blockIdx.z));
  // Heaviest (causal) tiles first: they start while the light ones fill the tail.
  const int q0 = int(gridDim.x - 1 - blockIdx.x) * kBr;
  if (q0 >= sp.len) return;
  const int h = int(blockIdx.y), warp = simt::warp_id(), lane = simt::lane_id(), g = lane >> 2, t = lane & 3;
  const int64_t C = int64_t(a.NH) * HD, ld = 3 * C;
  const uint16_t* qg = a.qkv + sp.start * ld + int64_t(h) * HD;
  const uint16_t* kg = qg + C;
  const uint16_t* vg = qg + 2 * C;

  uint16_t* sQ = simt::dynamic_smem<uint16_t>();
  uint16_t* sK = sQ + kBr * LD;     // [2][kBc][LD]
  uint16_t* sV = sK + 2 * kBc * LD;  // [2][kBc][LD]

  const int kend = a.causal && q0 + kBr < sp.len ? q0 + kBr : sp.len;
  const int ntiles = (kend + kBc - 1) / kBc;
  const int qw = q0 + warp * 16;  // this warp's first row (sequence-relative)
  const int row_a = qw + g, row_b = qw + g + 8;

  load_tile<kBr, HD, LD, kFwdThreads>(sQ, qg + int64_t(q0) * ld, ld, sp.len - q0);
  load_tile<kBc, HD, LD, kFwdThreads>(sK, kg, ld, sp.len);
  load_tile<kBc, HD, LD, kFwdThreads>(sV, vg, ld, sp.len);
  simt::cp_async_commit();

  uint32_t qf[KD][4];
  float o[ND][4];
UNROLL
  for (int i = 0; i < ND; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

  for (int j = 0; j < ntiles; j++) {
    const int k0 = j * kBc;
    if (j + 1 < ntiles) {
      const int st = (j + 1) & 1, kn = k0 + kBc;
      load_tile<kBc, HD, LD, kFwdThreads>(sK + st * kBc * LD, kg + int64_t(kn) * ld, ld, sp.len - kn);
      load_tile<kBc, HD, LD, kFwdThreads>(sV + st * kBc * LD, vg + int64_t(kn) * ld, ld, sp.len - kn);
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
UNROLL
      for (int kk = 0; kk < KD; kk++) load_a(qf[kk], sQ, LD, warp * 16, kk * 16);
    }
    // Warps whose rows are past the sequence end, or (causal) entirely above this key tile, have nothing to add.
    const bool active = qw < sp.len && !(a.causal && k0 > qw + 15);
    if (active) {
      const uint16_t* tK = sK + (j & 1) * kBc * LD;
      const uint16_t* tV = sV + (j & 1) * kBc * LD;
      float s[kBc / 8][4];
UNROLL
      for (int i = 0; i < kBc / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
UNROLL
      for (int kk = 0; kk < KD; kk++)
UNROLL
        for (int nb = 0; nb < kBc / 8; nb += 2) {
          uint32_t b[4];
          load_b_nmajor(b, tK, LD, nb * 8, kk * 16);
          mma(s[nb], qf[kk], b);
          mma(s[nb + 1], qf[kk], b + 2);
        }
      const bool mask = k0 + kBc > sp.len || (a.causal && k0 + kBc - 1 > qw);
      float mx_a = -INFINITY, mx_b = -INFINITY;
UNROLL
      for (int nb = 0; nb < kBc / 8; nb++)
UNROLL
        for (int e = 0; e < 4; e++) {
          float x = s[nb][e] * a.scale_log2;
          if (mask) {
            const int col = k0 + nb * 8 + 2 * t + (e & 1), row = e < 2 ? row_a : row_b;
            if (col >= sp.len || (a.causal && col > row)) x = -INFINITY;
          }
          s[nb][e] = x;
          if (e < 2) mx_a = fmaxf(mx_a, x);
          else mx_b = fmaxf(mx_b, x);
        }
      mx_a = fmaxf(m_a, quad_max(mx_a));
      mx_b = fmaxf(m_b, quad_max(mx_b));
      // A row with every key so far hidden keeps m = -inf; exponentiate against 0 then (all terms are 0).
      const float base_a = mx_a == -INFINITY ? 0.0f : mx_a, base_b = mx_b == -INFINITY ? 0.0f : mx_b;
      const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
      m_a = mx_a;
      m_b = mx_b;
      float sum_a = 0.0f, sum_b = 0.0f;
UNROLL
      for (int nb = 0; nb < kBc / 8; nb++) {
        s[nb][0] = exp2f(s[nb][0] - base_a);
        s[nb][1] = exp2f(s[nb][1] - base_a);
        s[nb][2] = exp2f(s[nb][2] - base_b);
        s[nb][3] = exp2f(s[nb][3] - base_b);
        sum_a += s[nb][0] + s[nb][1];
        sum_b += s[nb][2] + s[nb][3];
      }
      l_a = l_a * alpha_a + sum_a;  // per-lane partial sums; the quad is summed at the end
      l_b = l_b * alpha_b + sum_b;
UNROLL
      for (int i = 0; i < ND; i++) {
        o[i][0] *= alpha_a;
        o[i][1] *= alpha_a;
        o[i][2] *= alpha_b;
        o[i][3] *= alpha_b;
      }
      uint32_t pf[kBc / 16][4];
      to_a_frags<kBc / 8>(pf, s);
UNROLL
      for (int kk = 0; kk < kBc / 16; kk++)
UNROLL
        for (int nd = 0; nd < ND; nd += 2) {
          uint32_t b[4];
          load_b_kmajor(b, tV, LD, nd * 8, kk * 16);
          mma(o[nd], pf[kk], b);
          mma(o[nd + 1], pf[kk], b + 2);
        }
    }
    __syncthreads();  // the next iteration refills this stage
  }

  if (qw >= sp.len) return;
  l_a = quad_sum(l_a);
  l_b = quad_sum(l_b);
  const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
  uint16_t* og = a.out + sp.start * C + int64_t(h) * HD;
  if (row_a < sp.len) {
    uint32_t* orow = reinterpret_cast<uint32_t*>(og + int64_t(row_a) * C);
UNROLL
    for (int i = 0; i < ND; i++) orow[i * 4 + t] = simt::pack_bf16x2(o[i][0] * inv_a, o[i][1] * inv_a);
    if (t == 0) a.lse[int64_t(h) * a.N + sp.start + row_a] = m_a * kLn2 + logf(l_a);
  }
  if (row_b < sp.len) {
    uint32_t* orow = reinterpret_cast<uint32_t*>(og + int64_t(row_b) * C);
UNROLL
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
  KILN_CHECK(p.HD == 64 || p.HD == 128, op, ": head dim ", p.HD, " is not supported by the CUDA kernel (64 or 128)");
  if (p.cu_seqlens) {
    KILN_CHECK(p.num_seqs >= 0 && p.max_seqlen >= 0 && p.total_tokens >= 0, op,
               ": packed sequences need num_seqs, max_seqlen and total_tokens (got ", p.num_seqs, ", ", p.max_seqlen,
               ", ", p.total_tokens, ")");
    return {p.total_tokens, p.num_seqs, p.max_seqlen};
  }
  KILN_CHECK(p.B >= 0 && p.T >= 0, op, ": B (", p.B, ") and T (", p.T, ") must be non-negative");
  return {int64_t(p.B) * p.T, p.B, p.T};
}

template <int HD>
void forward(uint16_t* out, float* lse, const uint16_t* qkv, const AttentionParams& p, const Shape& sh,
             cudaStream_t stream) {
  static const bool smem_ok = simt::allow_smem(attention_fwd_kernel<HD>, fwd_smem<HD>()) == cudaSuccess;
  KILN_CHECK(smem_ok, "attention_forward: the device cannot give ", fwd_smem<HD>(), " bytes of shared memory");
  const FwdArgs args{out, lse, qkv, p.cu_seqlens, p.T, p.NH, sh.N, p.scale * kLog2e, p.causal ? 1 : 0};
  const dim3 grid(unsigned((sh.max_len + kBr - 1) / kBr), unsigned(p.NH), unsigned(sh.seqs));
  simt::launch(attention_fwd_kernel<HD>, grid, dim3(kFwdThreads), fwd_smem<HD>(), stream, args);
}

}  // namespace

void attention_forward(uint16_t* out, float* lse, const uint16_t* qkv, const AttentionParams& p, void* stream) {
  const Shape sh = shape_of(p, "attention_forward");
  if (sh.N == 0 || sh.seqs == 0 || sh.max_len == 0) return;
  KILN_CHECK(out && lse && qkv, "attention_forward: null out, lse or qkv pointer");
  KILN_CHECK(reinterpret_cast<uintptr_t>(qkv) % 16 == 0, "attention_forward: qkv must be 16-byte aligned");
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.HD == 64) forward<64>(out, lse, qkv, p, sh, s);
  else forward<128>(out, lse, qkv, p, sh, s);
}

size_t attention_backward_scratch_bytes(const AttentionParams&) { return 0; }
void attention_backward(uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, const float*,
                        const AttentionParams&, void*, void*) {
  fail("attention_backward: not implemented yet");
}

}  // namespace kiln::cuda
