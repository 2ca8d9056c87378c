// Token + position embedding on the GPU.
//
// Forward: a grid-stride loop over (row, 8-column group) writing wte[token] + wpe[pos] (16-byte accesses
// when C % 8 == 0 and the pointers are aligned, else one column at a time).
//
// Backward, deterministic without float atomics: the rows are grouped by table row through a sort.
//   1. keys = (id << 32) | n for every row n (ids are the tokens for wte, the positions for wpe; both tables
//      are done by the same launches, blockIdx.z picks one), padded to a power of two P with ~0.
//   2. A bitonic sort of the keys: a kernel sorts 2048-key chunks in shared memory, then each merge stage
//      runs its long strides (>= 2048) as global compare-exchange passes and its short ones in shared memory.
//      The key holds n, so equal ids end up in increasing n: the order is fixed by the input alone.
//   3. One block per sorted position: the block at the start of a run of equal ids sums the run's dout rows
//      in a fixed order (each thread owning 8 columns, four rows in flight) and adds the sum to the table
//      row (+=); the other blocks return at once. Each table row is written by exactly one thread group.
// Scratch: 2·P keys of 8 bytes.
#include "kernels/embedding.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cuda/vec.cuh"

namespace kiln::cuda {
namespace {

constexpr int kChunk = 2048;  // keys sorted in shared memory by one block (16 KiB)
constexpr uint64_t kPad = ~uint64_t(0);

int64_t padded(int64_t N) {
  int64_t p = 2;
  while (p < N) p *= 2;
  return p;
}

template <int kN>
KILN_GLOBAL void __launch_bounds__(256) embedding_forward_kernel(float* out, const int32_t* tokens, const int32_t* pos,
                                                                 const float* wte, const float* wpe, int64_t N, int C) {
  const int units = C / kN;
  const int64_t total = N * units;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = k / units;
    const int c = int(k % units) * kN;
    float a[kN], b[kN];
    simt::load_vec<kN>(a, wte + int64_t(tokens[n]) * C + c);
    if (wpe) {  // learned positions (GPT-2); rotary models have none
      simt::load_vec<kN>(b, wpe + int64_t(pos[n]) * C + c);
      for (int i = 0; i < kN; i++) a[i] += b[i];
    }
    simt::store_vec<kN>(out + n * C + c, a);
  }
}

// The tables of one backward call: blockIdx.z = 0 .. count-1.
struct Tables {
  float* dw[2];
  const int32_t* ids[2];
};

KILN_GLOBAL void __launch_bounds__(256) init_keys_kernel(uint64_t* keys, Tables tb, int64_t N, int64_t P) {
  uint64_t* k = keys + int64_t(blockIdx.z) * P;
  const int32_t* ids = blockIdx.z == 0 ? tb.ids[0] : tb.ids[1];  // no dynamic index: no local memory
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < P; i += int64_t(gridDim.x) * blockDim.x)
    k[i] = i < N ? (uint64_t(uint32_t(ids[i])) << 32) | uint64_t(i) : kPad;
}

// Compare-exchange of pair t for bitonic step (k, j) (powers of two) over s[0..): elements i and i + j, where
// i is t with a zero bit inserted at j; ascending where ((base + i) & k) == 0.
KILN_DEVICE void compare_exchange(uint64_t* s, int64_t t, int64_t k, int64_t j, int64_t base) {
  const int64_t i = ((t & ~(j - 1)) << 1) | (t & (j - 1));
  const uint64_t a = s[i], b = s[i + j];
  const bool up = ((base + i) & k) == 0;
  if ((a > b) == up) {
    s[i] = b;
    s[i + j] = a;
  }
}

// Sorts each chunk (k == 0), or finishes merge stage k (> chunk) with the strides below the chunk.
KILN_GLOBAL void __launch_bounds__(kChunk / 2) bitonic_local_kernel(uint64_t* keys, int64_t P, int chunk, int64_t k) {
  uint64_t* s = simt::dynamic_smem<uint64_t>();
  uint64_t* g = keys + int64_t(blockIdx.z) * P + int64_t(blockIdx.x) * chunk;
  const int64_t base = int64_t(blockIdx.x) * chunk;
  const int t = int(threadIdx.x);  // chunk / 2 threads
  s[t] = g[t];
  s[t + chunk / 2] = g[t + chunk / 2];
  __syncthreads();
  if (k == 0) {
    for (int kk = 2; kk <= chunk; kk *= 2)
      for (int j = kk / 2; j > 0; j /= 2) {
        compare_exchange(s, t, kk, j, base);
        __syncthreads();
      }
  } else {
    for (int j = chunk / 2; j > 0; j /= 2) {
      compare_exchange(s, t, k, j, base);
      __syncthreads();
    }
  }
  g[t] = s[t];
  g[t + chunk / 2] = s[t + chunk / 2];
}

KILN_GLOBAL void __launch_bounds__(256) bitonic_global_kernel(uint64_t* keys, int64_t P, int64_t k, int64_t j) {
  uint64_t* g = keys + int64_t(blockIdx.z) * P;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < P / 2; t += int64_t(gridDim.x) * blockDim.x)
    compare_exchange(g, t, k, j, 0);
}

template <int kN>
KILN_GLOBAL void __launch_bounds__(256) run_sum_kernel(Tables tb, const uint64_t* keys, const float* dout, int64_t N,
                                                       int64_t P, int C) {
  const uint64_t* k = keys + int64_t(blockIdx.z) * P;
  const int64_t i = blockIdx.x;
  const uint32_t id = uint32_t(k[i] >> 32);
  if (i > 0 && uint32_t(k[i - 1] >> 32) == id) return;  // not the start of a run
  const int u = int(blockIdx.y * blockDim.x + threadIdx.x);
  if (u >= C / kN) return;
  // Four rows in flight per step (hot tokens make runs of thousands of rows) and the run's end found on the
  // way; a fixed order all the same: four interleaved partial sums, then (a0 + a1) + (a2 + a3).
  const float* d0 = dout + int64_t(u) * kN;
  float acc[4][kN] = {};
  for (int64_t r = i;; r += 4) {
    bool in[4];  // keys are sorted: a prefix of the four belongs to the run
    uint32_t n[4];
    for (int q = 0; q < 4; q++) {
      const uint64_t key = r + q < N ? k[r + q] : kPad;
      in[q] = uint32_t(key >> 32) == id && key != kPad;
      n[q] = uint32_t(key);
    }
    for (int q = 0; q < 4; q++)
      if (in[q]) {
        float d[kN];
        simt::load_vec<kN>(d, d0 + int64_t(n[q]) * C);
        for (int c = 0; c < kN; c++) acc[q][c] += d[c];
      }
    if (!in[3]) break;
  }
  for (int c = 0; c < kN; c++) acc[0][c] = (acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c]);
  float* dst = (blockIdx.z == 0 ? tb.dw[0] : tb.dw[1]) + int64_t(id) * C + int64_t(u) * kN;
  float cur[kN];
  simt::load_vec<kN>(cur, dst);
  for (int c = 0; c < kN; c++) cur[c] += acc[0][c];
  simt::store_vec<kN>(dst, cur);
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C, void* stream) {
  KILN_CHECK(C > 0, "embedding_forward: C = ", C);
  if (N <= 0) return;
  const bool vec = C % 8 == 0 && simt::aligned16(out) && simt::aligned16(wte) && simt::aligned16(wpe);
  const int64_t total = N * (vec ? C / 8 : C);
  const dim3 grid{unsigned(std::min<int64_t>((total + 255) / 256, 4096))}, block{256};
  const auto s = static_cast<cudaStream_t>(stream);
  if (vec)
    simt::launch(embedding_forward_kernel<8>, grid, block, 0, s, out, tokens, pos, wte, wpe, N, C);
  else
    simt::launch(embedding_forward_kernel<1>, grid, block, 0, s, out, tokens, pos, wte, wpe, N, C);
}

size_t embedding_backward_scratch_bytes(int64_t N) { return size_t(2 * padded(N)) * sizeof(uint64_t); }

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C, void* scratch, void* stream) {
  KILN_CHECK(C > 0, "embedding_backward: C = ", C);
  KILN_CHECK(N < (int64_t(1) << 31), "embedding_backward: ", N, " rows");
  Tables tb{};
  unsigned count = 0;
  if (dwte) tb.dw[count] = dwte, tb.ids[count++] = tokens;
  if (dwpe) tb.dw[count] = dwpe, tb.ids[count++] = pos;
  if (N <= 0 || count == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  auto* keys = static_cast<uint64_t*>(scratch);
  const int64_t P = padded(N);
  const int chunk = int(std::min<int64_t>(P, kChunk));
  auto blocks = [](int64_t n) { return unsigned(std::min<int64_t>((n + 255) / 256, 4096)); };

  simt::launch(init_keys_kernel, dim3(blocks(P), 1, count), dim3(256), 0, s, keys, tb, N, P);
  simt::launch(bitonic_local_kernel, dim3(unsigned(P / chunk), 1, count), dim3(unsigned(chunk / 2)),
               size_t(chunk) * sizeof(uint64_t), s, keys, P, chunk, int64_t(0));
  for (int64_t k = 2 * int64_t(chunk); k <= P; k *= 2) {
    for (int64_t j = k / 2; j >= chunk; j /= 2)
      simt::launch(bitonic_global_kernel, dim3(blocks(P / 2), 1, count), dim3(256), 0, s, keys, P, k, j);
    simt::launch(bitonic_local_kernel, dim3(unsigned(P / chunk), 1, count), dim3(unsigned(chunk / 2)),
                 size_t(chunk) * sizeof(uint64_t), s, keys, P, chunk, k);
  }

  const bool vec = C % 8 == 0 && simt::aligned16(dout) && simt::aligned16(dwte) && simt::aligned16(dwpe);
  const int units = vec ? C / 8 : C;
  const int threads = std::min(256, (units + 31) / 32 * 32);
  const dim3 grid{unsigned(N), unsigned((units + threads - 1) / threads), count};
  if (vec)
    simt::launch(run_sum_kernel<8>, grid, dim3(unsigned(threads)), 0, s, tb, static_cast<const uint64_t*>(keys), dout,
                 N, P, C);
  else
    simt::launch(run_sum_kernel<1>, grid, dim3(unsigned(threads)), 0, s, tb, static_cast<const uint64_t*>(keys), dout,
                 N, P, C);
}

}  // namespace kiln::cuda
