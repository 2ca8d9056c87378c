// The 16-float vector of the CPU kernels (gemv.cpp, decode_attention.cpp, vec_reduce.h): one AVX-512 register
// where the build targets AVX-512, else a pair of 8-float AVX registers. A 64-byte GCC vector has no machine mode
// without AVX-512, so GCC keeps every such value in memory and splits each operation through the stack (f32
// decoding ran at 0.42 of the streaming read on a Zen 2); the pair stays in registers. Both forms offer the same
// operations: arithmetic with vectors and scalars, lane access, loads, stores, max.
#pragma once

namespace kiln::cpu {

#ifdef __AVX512F__
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_u __attribute__((vector_size(64), aligned(4)));
inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16_u*>(p); }
inline void store16(float* p, f32x16 v) { *reinterpret_cast<f32x16_u*>(p) = v; }
inline f32x16 vmax16(f32x16 a, f32x16 b) { return a > b ? a : b; }
#else
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x8_u __attribute__((vector_size(32), aligned(4)));
struct f32x16 {
  f32x8 lo, hi;  // lanes 0-7, 8-15; f32x16{} is all zeros
  float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
};
inline f32x16 operator+(f32x16 a, f32x16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline f32x16 operator-(f32x16 a, f32x16 b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline f32x16 operator*(f32x16 a, f32x16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline f32x16 operator+(f32x16 a, float s) { return {a.lo + s, a.hi + s}; }
inline f32x16 operator-(f32x16 a, float s) { return {a.lo - s, a.hi - s}; }
inline f32x16 operator*(f32x16 a, float s) { return {a.lo * s, a.hi * s}; }
inline f32x16 operator*(float s, f32x16 a) { return {s * a.lo, s * a.hi}; }
inline f32x16& operator+=(f32x16& a, f32x16 b) { return a = a + b; }
inline f32x16& operator*=(f32x16& a, float s) { return a = a * s; }
inline f32x16 load16(const float* p) {
  return {*reinterpret_cast<const f32x8_u*>(p), *reinterpret_cast<const f32x8_u*>(p + 8)};
}
inline void store16(float* p, f32x16 v) {
  *reinterpret_cast<f32x8_u*>(p) = v.lo;
  *reinterpret_cast<f32x8_u*>(p + 8) = v.hi;
}
inline f32x16 vmax16(f32x16 a, f32x16 b) { return {a.lo > b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi}; }
#endif

}  // namespace kiln::cpu
