// Activation memory planned in one block on a backend: the model runs the same allocation sequence twice, first
// on a measuring workspace (no memory; it learns the size), then on a real one of exactly that size. A step
// then allocates nothing.
#pragma once
#include <cstdint>
#include <utility>

#include "core/error.h"
#include "nn/backend.h"

namespace kiln::nn {

// One allocation on a backend, freed with the object (the backend must outlive it).
class DeviceBlock {
 public:
  DeviceBlock() = default;
  DeviceBlock(Backend& be, size_t bytes, const char* what) : be_(&be), bytes_(bytes) { p_ = be.alloc(bytes, what); }
  ~DeviceBlock() {
    if (be_) be_->free(p_);
  }
  DeviceBlock(const DeviceBlock&) = delete;
  DeviceBlock& operator=(const DeviceBlock&) = delete;
  DeviceBlock(DeviceBlock&& o) noexcept { *this = std::move(o); }
  DeviceBlock& operator=(DeviceBlock&& o) noexcept {
    std::swap(be_, o.be_), std::swap(p_, o.p_), std::swap(bytes_, o.bytes_);
    return *this;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  void* data() const { return p_; }
  size_t size() const { return bytes_; }

 private:
  Backend* be_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

class Workspace {
 public:
  explicit Workspace(DType act = DType::F32) : act_(act) {}  // measuring
  Workspace(Backend& be, size_t bytes, const char* what) : be_(&be), act_(be.act_dtype()), capacity_(bytes) {
    base_ = static_cast<char*>(be.alloc(bytes, what));
  }
  ~Workspace() {
    if (be_) be_->free(base_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  Workspace(Workspace&& o) noexcept { *this = std::move(o); }
  Workspace& operator=(Workspace&& o) noexcept {
    std::swap(be_, o.be_), std::swap(base_, o.base_), std::swap(act_, o.act_);
    std::swap(capacity_, o.capacity_), std::swap(used_, o.used_), std::swap(peak_, o.peak_);
    return *this;
  }

  Act act(int64_t n) { return {bytes(size_t(n) * dtype_size(act_)), act_}; }
  float* f32(int64_t n) { return static_cast<float*>(bytes(size_t(n) * 4)); }
  int32_t* i32(int64_t n) { return static_cast<int32_t*>(bytes(size_t(n) * 4)); }

  size_t peak() const { return peak_; }
  size_t capacity() const { return capacity_; }
  DType act_dtype() const { return act_; }

 private:
  // 256-byte aligned slices (vector loads, cp.async on a GPU).
  void* bytes(size_t n) {
    const size_t at = used_;
    used_ += (n + 255) / 256 * 256;
    if (used_ > peak_) peak_ = used_;
    if (!base_) return nullptr;
    KILN_CHECK(used_ <= capacity_, "activation workspace overflow: ", used_, " > ", capacity_, " bytes");
    return base_ + at;
  }
  Backend* be_ = nullptr;
  char* base_ = nullptr;
  DType act_ = DType::F32;
  size_t capacity_ = 0, used_ = 0, peak_ = 0;
};

}  // namespace kiln::nn
