// Probe kernels for the SIMT layer itself (kernels/cuda/simt.cuh). On the emulator they test the
// emulator; on a GPU the same kernels check that the emulator's fragment layouts are the hardware's.
#include "kernels/cuda/simt.cuh"
#include "tests/gpu/simt_probe.h"

namespace kiln::probe {
namespace {

// One warp: A [16×16] and B [16×8] (row-major bf16 in global memory) through ldmatrix into mma.
KILN_GLOBAL void mma_kernel(float* d, const uint16_t* a, const uint16_t* b_kn) {
  char* smem = simt::dynamic_smem();
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);            // 16×16
  uint16_t* sbt = reinterpret_cast<uint16_t*>(smem + 512);     // B stored n-major: [8][16] (k contiguous)
  uint16_t* sb = reinterpret_cast<uint16_t*>(smem + 768);      // B stored k-major: [16][8]
  int lane = simt::lane_id();
  for (int i = lane; i < 256; i += 32) sa[i] = a[i];
  for (int i = lane; i < 128; i += 32) {
    int k = i / 8, n = i % 8;
    sbt[n * 16 + k] = b_kn[i];
    sb[i] = b_kn[i];
  }
  __syncwarp();
  uint32_t af[4], bf[2], bf2[2];
  // x4: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  int m = lane / 8, r = lane % 8;
  simt::ldmatrix_x4(af, sa + ((m & 1) * 8 + r) * 16 + (m >> 1) * 8);
  // B from n-major storage: rows are n, 16 bytes = 8 k values; x2: (k 0-7), (k 8-15).
  int m2 = (lane / 8) & 1;
  simt::ldmatrix_x2(bf, sbt + r * 16 + m2 * 8);
  // B from k-major storage through .trans: rows are k.
  simt::ldmatrix_x2_trans(bf2, sb + (m2 * 8 + r) * 8);
  float c[4] = {0, 0, 0, 0}, out[4], out2[4];
  simt::mma_bf16_16816(out, af, bf, c);
  simt::mma_bf16_16816(out2, af, bf2, c);
  int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; i++) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    d[row * 8 + col] = out[i];
    d[128 + row * 8 + col] = out2[i];
  }
}

// Block-wide sum through warp shuffles and shared memory; also exercises __syncthreads.
KILN_GLOBAL void block_sum_kernel(float* out, const float* x, int n) {
  float* partial = simt::dynamic_smem<float>();
  float s = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  s = simt::warp_sum(s);
  if (simt::lane_id() == 0) partial[simt::warp_id()] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0;
    for (int w = 0; w < int(blockDim.x) / 32; w++) t += partial[w];
    atomicAdd(out, t);
  }
}

// Deliberately wrong: thread 0 waits at a warp shuffle its warp never reaches, while the rest of the block
// waits for it at __syncthreads (a hang on a GPU).
KILN_GLOBAL void bad_barrier_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Deliberately racy when `barrier` is 0: warp 0 fills a tile with cp.async, warp 1 reads it with ldmatrix.
KILN_GLOBAL void tile_handoff_kernel(float* out, const uint16_t* src, int barrier) {
  uint16_t* tile = simt::dynamic_smem<uint16_t>();
  if (simt::warp_id() == 0 && simt::lane_id() < 8) {
    simt::cp_async_16(tile + simt::lane_id() * 8, src + simt::lane_id() * 8);
    simt::cp_async_commit();
    simt::cp_async_wait<0>();
  }
  if (barrier) __syncthreads();
  if (simt::warp_id() == 1) {
    uint32_t r[2];
    simt::ldmatrix_x2(r, tile + (simt::lane_id() % 8) * 8);
    out[simt::lane_id()] = simt::bf16x2_lo(r[0]);
  }
}

KILN_GLOBAL void shuffle_kernel(int* out) {
  int lane = simt::lane_id();
  out[lane] = __shfl_xor_sync(0xffffffffu, lane * 10, 5);
  out[32 + lane] = __shfl_down_sync(0xffffffffu, lane * 10, 3);
  out[64 + lane] = __shfl_sync(0xffffffffu, lane * 10, 7, 16);
}

}  // namespace

void mma(float* d, const uint16_t* a, const uint16_t* b, void* stream) {
  simt::launch(mma_kernel, dim3(1), dim3(32), 1024, static_cast<cudaStream_t>(stream), d, a, b);
}
void block_sum(float* out, const float* x, int n, int blocks, int threads, void* stream) {
  simt::launch(block_sum_kernel, dim3(blocks), dim3(threads), size_t(threads / 32) * 4,
               static_cast<cudaStream_t>(stream), out, x, n);
}
void bad_barrier(float* out, void* stream) {
  simt::launch(bad_barrier_kernel, dim3(1), dim3(64), 0, static_cast<cudaStream_t>(stream), out);
}
void tile_handoff(float* out, const uint16_t* src, bool barrier, void* stream) {
  simt::launch(tile_handoff_kernel, dim3(1), dim3(64), 256, static_cast<cudaStream_t>(stream), out, src,
               barrier ? 1 : 0);
}
void shuffles(int* out, void* stream) {
  simt::launch(shuffle_kernel, dim3(1), dim3(32), 0, static_cast<cudaStream_t>(stream), out);
}

}  // namespace kiln::probe
