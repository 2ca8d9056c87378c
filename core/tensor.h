// Tensor: a named, typed, contiguous view over memory owned elsewhere (a parameter block, an arena,
// a memory-mapped file). Shapes have at most 4 dimensions; kiln's hot code works on raw pointers
// and uses Tensor where names and shapes matter (weight files, error messages, the memory plan).
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace kiln {

struct Shape {
  int ndim = 0;
  std::array<int64_t, 4> dims{};

  Shape() = default;
  Shape(std::initializer_list<int64_t> d) {
    KILN_CHECK(d.size() <= 4, "shape with more than 4 dimensions");
    for (int64_t x : d) dims[ndim++] = x;
  }
  static Shape of(const std::vector<int64_t>& d) {
    Shape s;
    KILN_CHECK(d.size() <= 4, "shape with more than 4 dimensions");
    for (int64_t x : d) s.dims[s.ndim++] = x;
    return s;
  }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= dims[i];
    return n;
  }
  int64_t operator[](int i) const { return dims[i]; }
  bool operator==(const Shape& o) const {
    if (ndim != o.ndim) return false;
    for (int i = 0; i < ndim; i++)
      if (dims[i] != o.dims[i]) return false;
    return true;
  }
  std::vector<int64_t> vec() const { return {dims.begin(), dims.begin() + ndim}; }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; i++) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
  }
};

struct Tensor {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  void* data = nullptr;

  int64_t numel() const { return shape.numel(); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  float* f32() const { return static_cast<float*>(data); }
  template <class T>
  T* as() const { return static_cast<T*>(data); }
};

}  // namespace kiln
