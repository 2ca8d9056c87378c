// kiln's SIMT emulator: runs CUDA kernels written against kernels/cuda/simt.cuh on the CPU.
//
// A launch runs its blocks one after another on each OpenMP thread; inside a block every CUDA thread is a
// fiber with its own stack (switched by a few instructions, simt_emu.cpp). A fiber runs until it reaches
// __syncthreads or a warp collective (__shfl_*_sync, __syncwarp, mma, ldmatrix) and then waits there until
// every live thread of its block (or warp) has arrived, so barriers and lock-step warp operations behave as on
// the GPU. The emulator also checks what the GPU would not report: a barrier some threads never reach
// (deadlock), lanes of one warp at different collectives, ldmatrix / cp.async addresses outside shared memory
// or misaligned, shared memory read before it is written (it starts filled with NaN bytes).
//
// It also provides the part of the CUDA runtime API kiln calls (cudaMalloc on host memory, synchronous
// streams, events, graph capture by recording launches), so kernels/cuda/*.cu compile unchanged with a
// host compiler into the emulated backend that tests link against.
#pragma once
#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#include "kernels/cuda/emu/cuda_runtime_emu.h"

namespace kiln::emu {

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
char* block_smem();

void syncthreads();
// Every live lane of the calling warp posts `bytes` (<= 64) from `mine`; on return `all` holds lane l's
// bytes at all + l·bytes. `what` names the collective, for the divergence check.
void warp_exchange(const void* mine, void* all, size_t bytes, const char* what);
void warp_mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
void warp_ldmatrix(uint32_t* r, int count, bool trans, const void* smem_row);
// Fails (naming `what`) unless [p, p+bytes) lies in the block's shared memory and p is `align`-aligned.
void check_smem(const void* p, size_t bytes, size_t align, const char* what);

// cp.async: queue a 16-byte copy (src_bytes of it from src, the rest zeros) for the calling thread; commit
// closes the thread's open group; wait(n) performs every committed group but the newest n. A thread's copies
// left at its exit are performed then.
void cp_async(void* smem_dst, const void* gmem_src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);

// Device allocations so far (cudaMalloc calls), for tests that a steady-state step allocates nothing.
int64_t malloc_count();
// Shared-memory bank conflicts of ldmatrix so far: for each 8×8 matrix, the extra passes its 8 row reads need
// because some of them share one of the 32 four-byte banks (0 for conflict-free tile layouts).
int64_t ldmatrix_bank_conflicts();

// Runs (or, while `stream` is capturing a graph, records) one kernel launch.
// `kernel` identifies the function for the shared-memory opt-in check: above 48 KiB of dynamic shared memory a
// real launch fails unless cudaFuncSetAttribute raised the kernel's limit first.
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
            std::function<void()> body);

template <class T>
inline T warp_pick(T v, int src, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  T all[32];
  warp_exchange(&v, all, sizeof(T), what);
  return all[src & 31];
}
inline int lane() { return int(thread_idx().x) & 31; }

}  // namespace kiln::emu

#define threadIdx (::kiln::emu::thread_idx())
#define blockIdx (::kiln::emu::block_idx())
#define blockDim (::kiln::emu::block_dim())
#define gridDim (::kiln::emu::grid_dim())
#define __launch_bounds__(...)

inline void __syncthreads() { ::kiln::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  char none = 0, all[32];
  ::kiln::emu::warp_exchange(&none, all, 1, "__syncwarp");
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int l = ::kiln::emu::lane();
  return ::kiln::emu::warp_pick(v, (l & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  int l = ::kiln::emu::lane();
  int s = l ^ mask;
  if ((s & ~(width - 1)) != (l & ~(width - 1))) s = l;
  return ::kiln::emu::warp_pick(v, s, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int l = ::kiln::emu::lane();
  int s = l + int(delta);
  if ((s & ~(width - 1)) != (l & ~(width - 1))) s = l;
  return ::kiln::emu::warp_pick(v, s, "__shfl_down_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  int l = ::kiln::emu::lane();
  int s = l - int(delta);
  if (s < 0 || (s & ~(width - 1)) != (l & ~(width - 1))) s = l;
  return ::kiln::emu::warp_pick(v, s, "__shfl_up_sync");
}

float atomicAdd(float* p, float v);
double atomicAdd(double* p, double v);
int atomicAdd(int* p, int v);
unsigned atomicAdd(unsigned* p, unsigned v);
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v);
int atomicMax(int* p, int v);
int atomicCAS(int* p, int compare, int v);

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
