// Helpers shared by the memory-bound kernels (layernorm, activation, embedding, cross-entropy, AdamW):
// 8-element vectors (one 16-byte access in bf16, two in fp32) with scalar fallbacks, and a deterministic
// block-wide sum. Kernel code only, on top of simt.cuh.
//
// The kernels template on kN, the elements one thread touches per step: 8 when every pointer involved is
// 16-byte aligned and each row starts 16-byte aligned (C a multiple of 8), else 1 (the scalar fallback).
#pragma once
#include "kernels/cuda/simt.cuh"

namespace kiln::simt {

// 16 bytes moved as one access (ld.global.v4 on the GPU).
struct alignas(16) Bytes16 {
  uint32_t w[4];
};
KILN_DEVICE Bytes16 load16(const void* p) {
#if KILN_EMULATED
  Bytes16 r;
  std::memcpy(&r, p, 16);
  return r;
#else
  const int4 v = *reinterpret_cast<const int4*>(p);
  return Bytes16{{uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)}};
#endif
}
KILN_DEVICE void store16(void* p, const Bytes16& b) {
#if KILN_EMULATED
  std::memcpy(p, &b, 16);
#else
  *reinterpret_cast<int4*>(p) = make_int4(int(b.w[0]), int(b.w[1]), int(b.w[2]), int(b.w[3]));
#endif
}

// kN consecutive elements at p (aligned to 16 bytes when kN == 8) as floats.
template <int kN>
KILN_DEVICE void load_vec(float (&f)[kN], const float* p) {
  if constexpr (kN == 8) {
    const Bytes16 a = load16(p), b = load16(p + 4);
    for (int i = 0; i < 4; i++) {
      f[i] = __int_as_float(int(a.w[i]));
      f[4 + i] = __int_as_float(int(b.w[i]));
    }
  } else {
    for (int i = 0; i < kN; i++) f[i] = p[i];
  }
}
template <int kN>
KILN_DEVICE void load_vec(float (&f)[kN], const uint16_t* p) {
  if constexpr (kN == 8) {
    const Bytes16 a = load16(p);
    for (int i = 0; i < 4; i++) {
      f[2 * i] = bf16x2_lo(a.w[i]);
      f[2 * i + 1] = bf16x2_hi(a.w[i]);
    }
  } else {
    for (int i = 0; i < kN; i++) f[i] = bf16_to_f32(p[i]);
  }
}
template <int kN>
KILN_DEVICE void store_vec(float* p, const float (&f)[kN]) {
  if constexpr (kN == 8) {
    Bytes16 a, b;
    for (int i = 0; i < 4; i++) {
      a.w[i] = uint32_t(__float_as_int(f[i]));
      b.w[i] = uint32_t(__float_as_int(f[4 + i]));
    }
    store16(p, a);
    store16(p + 4, b);
  } else {
    for (int i = 0; i < kN; i++) p[i] = f[i];
  }
}
template <int kN>
KILN_DEVICE void store_vec(uint16_t* p, const float (&f)[kN]) {
  if constexpr (kN == 8) {
    Bytes16 a;
    for (int i = 0; i < 4; i++) a.w[i] = pack_bf16x2(f[2 * i], f[2 * i + 1]);
    store16(p, a);
  } else {
    for (int i = 0; i < kN; i++) p[i] = f32_to_bf16(f[i]);
  }
}

// One element at p as a float, and a float stored into one element (fp32, or bf16 rounded to nearest even).
template <class T>
KILN_DEVICE float ld1(const T* p) {
  float f[1];
  load_vec<1>(f, p);
  return f[0];
}
template <class T>
KILN_DEVICE void st1(T* p, float v) {
  float f[1] = {v};
  store_vec<1>(p, f);
}

// Sum of v[0..kV) over the block; every thread receives the totals. The order of the additions is fixed
// (warp butterfly, then the warps in index order), so the result is the same on every run. smem holds
// 2·32·kV floats; `parity` alternates between two halves of it so consecutive calls need one barrier each
// (a thread reads half p only before the next call's barrier, which every writer of half p passes first).
template <int kV>
KILN_DEVICE void block_sum(float (&v)[kV], float* smem, int& parity) {
  for (int j = 0; j < kV; j++) v[j] = warp_sum(v[j]);
  const int warps = int(blockDim.x) >> 5;
  if (warps == 1) return;
  float* buf = smem + parity * 32 * kV;
  parity ^= 1;
  if (lane_id() == 0)
    for (int j = 0; j < kV; j++) buf[warp_id() * kV + j] = v[j];
  __syncthreads();
  for (int j = 0; j < kV; j++) {
    float s = 0.0f;
    for (int w = 0; w < warps; w++) s += buf[w * kV + j];
    v[j] = s;
  }
}
inline constexpr size_t block_sum_smem_bytes(int kV) { return size_t(2 * 32 * kV) * sizeof(float); }

// True when p is 16-byte aligned (null counts as aligned: an absent operand does not force the fallback).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace kiln::simt
