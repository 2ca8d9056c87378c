// safetensors: the weight format of the Hugging Face ecosystem.
//   8 bytes   little-endian uint64 N, the header length
//   N bytes   JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//                    "__metadata__": {"key": "value"}}   (optional metadata, strings only)
//   rest      the data section; offsets are relative to its start. Bytes past the last tensor are ignored.
// The reader memory-maps the file and validates every field before handing out a pointer; the writer
// streams tensors straight from their memory into an atomically written file.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/file_io.h"
#include "core/quote.h"
#include "core/tensor.h"

namespace kiln {

// One header entry, whatever its dtype (kiln's DType covers F32/BF16/F16/I32/U16; the reader also
// validates the other safetensors dtypes so that files carrying e.g. I64 buffers can still be opened).
struct SafeTensorsEntry {
  std::string name;
  std::string dtype;               // as written: "F32", "BF16", "I64", ...
  std::vector<int64_t> shape;      // any rank
  size_t begin = 0, end = 0;       // byte range in the data section
  const uint8_t* bytes = nullptr;  // begin of the data in the map (may be unaligned)
  int tensor_index = -1;           // index into tensors(), or -1 when kiln cannot represent it
  int64_t numel() const;
};

class SafeTensorsReader {
 public:
  // Maps and validates the file; throws kiln::Error naming the file (and tensor) on any defect.
  explicit SafeTensorsReader(const std::string& path);
  // Parses a copy of an in-memory file the same way; `name` stands for the file in error messages (tests,
  // the fuzzer).
  static SafeTensorsReader from_bytes(std::string bytes, std::string name);

  const std::string& path() const { return path_; }
  // Every entry of the header, in data order.
  const std::vector<SafeTensorsEntry>& entries() const { return entries_; }
  const SafeTensorsEntry* find_entry(const std::string& name) const;
  // The entries kiln can represent (DType known, at most 4 dims), in data order. Tensor::data points
  // into the map, or into an aligned copy when the writer left the data unaligned for its dtype.
  const std::vector<Tensor>& tensors() const { return tensors_; }
  // nullptr if absent; throws naming the file and tensor if present with a dtype or rank kiln lacks.
  const Tensor* find(const std::string& name) const;
  // Like find, but a missing tensor is an error too.
  const Tensor& get(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafeTensorsReader() = default;
  void parse(const uint8_t* bytes, size_t size);
  std::string path_;
  MappedFile file_;                      // the mapping, for a file
  std::unique_ptr<std::string> copy_;    // the bytes, for from_bytes (a heap string: moving the reader keeps pointers)
  std::vector<SafeTensorsEntry> entries_;
  std::vector<Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::unique_ptr<uint64_t[]>> aligned_copies_;
};

// Writes tensors as they are in memory. Names must be unique and not "__metadata__". Tensors are stored
// the way the reference implementation orders them (wider dtypes first, then by name), the header is
// padded with spaces to a multiple of 8 bytes, so every tensor is aligned in a mapped file.
void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes f32 tensors converted to `on_disk` (F32, BF16 or F16, round-to-nearest-even) chunk by chunk,
// so a converted copy of the whole set never exists in memory.
void write_safetensors_converted(const std::string& path, const std::vector<Tensor>& f32_tensors, DType on_disk,
                                 const std::map<std::string, std::string>& metadata = {});

// Converts n elements stored as `src_dtype` (F32, BF16 or F16; src may be unaligned) to f32.
void convert_to_f32(const void* src, DType src_dtype, float* dst, size_t n);

}  // namespace kiln
