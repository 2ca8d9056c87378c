// Element types and the bf16/fp16 conversions used on the CPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace kiln {

enum class DType : uint8_t { F32, BF16, F16, I32, U16 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::U16: return 2;
  }
  return 0;
}

// Names as safetensors writes them.
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::U16: return "U16";
  }
  return "?";
}

// fp32 -> bf16 with round-to-nearest-even (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half <-> float (round-to-nearest-even), via the F16C-compatible compiler type. clang before 15 has
// _Float16 on x86 only with AVX512-FP16; its __fp16 converts the same way (the fuzz build, fuzz/, uses clang 14).
#if defined(__clang__) && __clang_major__ < 15
using kiln_half_t = __fp16;
#else
using kiln_half_t = _Float16;
#endif
inline uint16_t f32_to_f16(float f) {
  kiln_half_t h = static_cast<kiln_half_t>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

inline float f16_to_f32(uint16_t u) {
  kiln_half_t h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}

}  // namespace kiln
