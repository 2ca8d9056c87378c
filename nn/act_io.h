// Host fp32 arrays into and out of activation buffers of any backend. The image models rearrange their inputs
// and outputs on the host (patchify, pooling); on the CPU an activation is fp32 and the copy is direct, on a GPU
// backend it is bf16 and the values are rounded (to nearest even, as the device's cast) on the host first, so one
// model source serves both backends. Small arrays only (per-batch inputs and outputs): these synchronise.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "nn/backend.h"

namespace kiln::nn {

inline void upload_act(Backend& be, Act dst, const float* host, int64_t n) {
  if (dst.dtype == DType::F32) return be.upload(dst.p, host, size_t(n) * 4);
  KILN_CHECK(dst.dtype == DType::BF16, "upload_act: ", dtype_name(dst.dtype), " activations are not supported");
  std::vector<uint16_t> h(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i++) h[size_t(i)] = f32_to_bf16(host[i]);
  be.upload(dst.p, h.data(), h.size() * 2);
}

inline void download_act(Backend& be, float* host, Act src, int64_t n) {
  if (src.dtype == DType::F32) return be.download(host, src.p, size_t(n) * 4);
  KILN_CHECK(src.dtype == DType::BF16, "download_act: ", dtype_name(src.dtype), " activations are not supported");
  std::vector<uint16_t> h(static_cast<size_t>(n));
  be.download(h.data(), src.p, h.size() * 2);
  for (int64_t i = 0; i < n; i++) host[i] = bf16_to_f32(h[size_t(i)]);
}

// An activation as an fp32 array on the same device (the embedding backward reads fp32): the buffer itself when
// it is fp32, else converted into `dst` (n floats on the device) through the host.
inline const float* act_as_f32(Backend& be, float* dst, Act src, int64_t n) {
  if (src.dtype == DType::F32) return static_cast<const float*>(src.p);
  std::vector<float> h(static_cast<size_t>(n));
  download_act(be, h.data(), src, n);
  be.upload(dst, h.data(), h.size() * 4);
  return dst;
}

}  // namespace kiln::nn
