// The portability layer every CUDA kernel in kiln is written against.
//
// Compiled by nvcc it is plain CUDA: the tensor-core helpers are inline PTX (mma.sync, ldmatrix, cp.async).
// Compiled by a host C++ compiler it maps the same names onto kiln's SIMT emulator (emu/simt_emu.h):
// every thread of a block runs as a fiber, __syncthreads and the warp collectives (shuffles, mma, ldmatrix)
// are rendezvous points, so the kernels' index arithmetic, fragment layouts and synchronisation run and are
// tested on machines without a GPU (CI). The emulator is for correctness only, never for speed.
//
// Kernel code may use: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp, __shfl_*_sync with
// a full mask, atomicAdd/atomicMax on global memory, the math functions listed in emu/simt_emu.h, dynamic
// shared memory through simt::dynamic_smem(), and the helpers below. No static __shared__ arrays (the
// emulator cannot give them block scope), no other intrinsics.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define KILN_DEVICE __device__ __forceinline__
#define KILN_HOST_DEVICE __host__ __device__ __forceinline__
#define KILN_GLOBAL __global__
#define KILN_EMULATED 0
#else
#include "kernels/cuda/emu/simt_emu.h"
#define KILN_DEVICE inline
#define KILN_HOST_DEVICE inline
#define KILN_GLOBAL
#define KILN_EMULATED 1
#endif

// Full unrolling on the GPU (fragment arrays must stay in registers); the host compiler ignores it.
#if defined(__CUDACC__)
#define KILN_UNROLL _Pragma("unroll")
#else
#define KILN_UNROLL
#endif

namespace kiln::simt {

constexpr int kWarp = 32;
KILN_DEVICE int lane_id() { return int(threadIdx.x) & 31; }
KILN_DEVICE int warp_id() { return int(threadIdx.x) >> 5; }

// The block's dynamic shared memory (the launch's smem_bytes), 16-byte aligned.
template <class T = char>
KILN_DEVICE T* dynamic_smem() {
#if KILN_EMULATED
  return reinterpret_cast<T*>(::kiln::emu::block_smem());
#else
  extern __shared__ __align__(16) char kiln_dynamic_smem[];
  return reinterpret_cast<T*>(kiln_dynamic_smem);
#endif
}

// ---- bf16 <-> fp32 (storage type uint16_t, round to nearest even) ----
KILN_HOST_DEVICE float bf16_to_f32(uint16_t h) {
#if !defined(__CUDA_ARCH__)
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(uint32_t(h) << 16);
#endif
}
KILN_HOST_DEVICE uint16_t f32_to_bf16(float f) {
#if !defined(__CUDA_ARCH__)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
#else
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#endif
}
// Two floats as one register of two bf16 (lo in the low half: the lower column / k index).
KILN_HOST_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t(f32_to_bf16(lo)) | (uint32_t(f32_to_bf16(hi)) << 16);
}
KILN_HOST_DEVICE float bf16x2_lo(uint32_t r) { return bf16_to_f32(uint16_t(r & 0xffffu)); }
KILN_HOST_DEVICE float bf16x2_hi(uint32_t r) { return bf16_to_f32(uint16_t(r >> 16)); }

// ---- Tensor cores (sm_80+): D = A·B + C, m16n8k16, bf16 inputs, fp32 accumulators ----
// Fragment layout (lane = 4·g + t, g = lane/4, t = lane%4), as the PTX ISA defines it:
//   a[0]: A[g][2t..2t+1]    a[1]: A[g+8][2t..2t+1]    a[2]: A[g][2t+8..]    a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]    b[1]: B[2t+8..2t+9][g]    (B is K×N: the pair runs along k)
//   c[0..1]: C[g][2t..2t+1] c[2..3]: C[g+8][2t..2t+1]
KILN_DEVICE void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#if KILN_EMULATED
  ::kiln::emu::warp_mma_bf16_16816(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  __trap();  // tensor-core kernels are launched on sm_80+ only
#endif
}

// ldmatrix: lane i supplies the shared-memory address of row i%8 of 8×8 bf16 matrix i/8 (rows are 16
// contiguous bytes). Register j of lane l receives matrix j's row l/4, elements 2(l%4), 2(l%4)+1.
// The .trans forms deliver the transposed matrix: register j of lane l holds M_j[2(l%4)][l/4] (low half)
// and M_j[2(l%4)+1][l/4] (high half). x2 uses lanes 0..15's addresses, x1 lanes 0..7's.
KILN_DEVICE void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
#if KILN_EMULATED
  ::kiln::emu::warp_ldmatrix(r, 4, false, smem_row);
#else
  uint32_t addr = uint32_t(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
KILN_DEVICE void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
#if KILN_EMULATED
  ::kiln::emu::warp_ldmatrix(r, 4, true, smem_row);
#else
  uint32_t addr = uint32_t(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
KILN_DEVICE void ldmatrix_x2(uint32_t r[2], const void* smem_row) {
#if KILN_EMULATED
  ::kiln::emu::warp_ldmatrix(r, 2, false, smem_row);
#else
  uint32_t addr = uint32_t(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#endif
}
KILN_DEVICE void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row) {
#if KILN_EMULATED
  ::kiln::emu::warp_ldmatrix(r, 2, true, smem_row);
#else
  uint32_t addr = uint32_t(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
#endif
}

// ---- Asynchronous global -> shared copies (sm_80+), 16 bytes each ----
// The emulator performs a thread's copies only when cp_async_wait retires their group (the latest moment the
// hardware may complete them), so reading a tile before waiting for it sees stale or NaN-filled shared memory.
KILN_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) {
#if KILN_EMULATED
  ::kiln::emu::cp_async(smem_dst, gmem_src, 16);
#else
  uint32_t addr = uint32_t(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem_src));
#endif
}
// Zero-fill variant: copies src_bytes (0 or 16) and fills the rest of the 16 with zeros (tile edges).
KILN_DEVICE void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
#if KILN_EMULATED
  ::kiln::emu::cp_async(smem_dst, gmem_src, src_bytes);
#else
  uint32_t addr = uint32_t(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem_src), "r"(src_bytes));
#endif
}
KILN_DEVICE void cp_async_commit() {
#if KILN_EMULATED
  ::kiln::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Wait until at most n committed groups are still in flight.
template <int n>
KILN_DEVICE void cp_async_wait() {
#if KILN_EMULATED
  ::kiln::emu::cp_async_wait(n);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n));
#endif
}

// ---- Warp reductions (full warp) ----
KILN_DEVICE float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
KILN_DEVICE float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- Launching (host side) ----
// launch(kernel, grid, block, smem_bytes, stream, args...): one launch, identical in both builds. Kernels
// needing more than 48 KiB of dynamic shared memory call allow_smem(kernel, bytes) once before.
template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   A... args) {
#if KILN_EMULATED
  ::kiln::emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, stream,
                      [=] { kernel(P(args)...); });
#else
  kernel<<<grid, block, smem_bytes, stream>>>(P(args)...);
#endif
}
template <class... P>
inline cudaError_t allow_smem(void (*kernel)(P...), size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace kiln::simt
