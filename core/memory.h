// Host memory: 64-byte aligned buffers, and an Arena that hands out slices of one block.
// A training step plans its activations by running the same allocation sequence twice: once on a
// measuring arena (no memory) to learn the size, then on a real one of exactly that size.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "core/error.h"

namespace kiln {

constexpr size_t kAlign = 64;

inline size_t align_up(size_t n, size_t a = kAlign) { return (n + a - 1) / a * a; }

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// An owned, aligned, zero-initialised byte block.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t bytes) { resize(bytes); }
  void resize(size_t bytes) {
    size_ = bytes;
    if (bytes == 0) { ptr_.reset(); return; }
    void* p = std::aligned_alloc(kAlign, align_up(bytes));
    KILN_CHECK(p, "out of memory allocating ", bytes, " bytes");
    std::memset(p, 0, align_up(bytes));
    ptr_.reset(p);
  }
  void* data() const { return ptr_.get(); }
  float* f32() const { return static_cast<float*>(ptr_.get()); }
  size_t size() const { return size_; }

 private:
  std::unique_ptr<void, FreeDeleter> ptr_;
  size_t size_ = 0;
};

// Bump allocator over a Buffer. With no buffer it only measures (alloc returns nullptr).
class Arena {
 public:
  Arena() = default;  // measuring arena
  explicit Arena(size_t capacity) : buf_(capacity), capacity_(capacity) {}

  template <class T = float>
  T* alloc(size_t count) {
    size_t bytes = align_up(count * sizeof(T));
    size_t at = used_;
    used_ += bytes;
    if (used_ > peak_) peak_ = used_;
    if (!buf_.data()) return nullptr;
    KILN_CHECK(used_ <= capacity_, "arena overflow: ", used_, " > ", capacity_, " bytes");
    return reinterpret_cast<T*>(static_cast<char*>(buf_.data()) + at);
  }
  size_t mark() const { return used_; }
  void release_to(size_t mark) { used_ = mark; }
  void reset() { used_ = 0; }
  size_t used() const { return used_; }
  size_t peak() const { return peak_; }
  size_t capacity() const { return capacity_; }
  bool measuring() const { return buf_.data() == nullptr; }

 private:
  Buffer buf_;
  size_t capacity_ = 0, used_ = 0, peak_ = 0;
};

}  // namespace kiln
