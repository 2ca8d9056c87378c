// GGUF v3 files (ggml's model format, read by llama.cpp), written and read from the specification
// (ggml docs/gguf.md): header "GGUF" v3, typed metadata, tensor infos (dims fastest-first), then the tensor
// data, each tensor on a general.alignment boundary (32 bytes unless set).
//
// The writer streams: tensor infos are declared up front with a callback that fills one tensor's floats
// (row-major, in the shape given) when its turn comes, so the model is never copied whole. The file is written
// atomically (temporary file, fsync, rename). The reader validates every length, count and offset: a truncated
// or corrupt file gives a one-line kiln::Error naming the file and the field.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace kiln {

enum class GgufValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, Bool = 7, String = 8, Array = 9,
  U64 = 10, I64 = 11, F64 = 12,
};

// Tensor element types (ggml_type). The writer produces F32, F16 and Q8_0; the reader knows the sizes of these
// and of a few other plain types.
enum class GgufType : uint32_t { F32 = 0, F16 = 1, Q8_0 = 8, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30 };

constexpr int kGgufQ8Block = 32;        // values per Q8_0 block
constexpr int kGgufQ8BlockBytes = 34;   // f16 scale + 32 int8

const char* gguf_type_name(GgufType t);
// Bytes of n values of type t (n a multiple of the block size for block types); 0 for an unknown type.
uint64_t gguf_type_bytes(GgufType t, uint64_t n);

// One metadata value. Scalars and numeric arrays keep their little-endian bytes in `data`; a string keeps its
// text in `data`; an array of strings keeps them in `strings`.
struct GgufValue {
  GgufValueType type = GgufValueType::U32;
  GgufValueType elem = GgufValueType::U32;  // element type of an array
  uint64_t count = 0;                       // elements of an array
  std::string data;
  std::vector<std::string> strings;

  static GgufValue u8(uint8_t v);
  static GgufValue i8(int8_t v);
  static GgufValue u16(uint16_t v);
  static GgufValue i16(int16_t v);
  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue u64(uint64_t v);
  static GgufValue i64(int64_t v);
  static GgufValue f32(float v);
  static GgufValue f64(double v);
  static GgufValue boolean(bool v);
  static GgufValue str(std::string v);
  // A numeric or bool array: elem names the element type, data holds count elements of its size.
  static GgufValue array(GgufValueType elem, const void* data, uint64_t count);
  template <class T>
  static GgufValue array(GgufValueType elem, const std::vector<T>& v) {
    return array(elem, v.data(), v.size());
  }
  static GgufValue str_array(std::vector<std::string> v);

  // Checked reads (throw kiln::Error naming `what` on a type mismatch).
  uint64_t as_uint(const std::string& what) const;  // any unsigned integer type (or a non-negative signed one)
  int64_t as_int(const std::string& what) const;    // any integer type that fits
  double as_float(const std::string& what) const;   // F32 or F64
  bool as_bool(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
};

size_t gguf_value_type_size(GgufValueType t);  // bytes of a fixed-size type; 0 for String and Array

struct GgufMetadata {
  std::string key;
  GgufValue value;
};

class GgufWriter {
 public:
  // Sets a metadata key (replacing an earlier value of that key, keeping its place).
  void set(const std::string& key, GgufValue v);
  // Declares a tensor. shape is row-major (slowest first, as kiln stores it); the file lists it reversed.
  // fill(dst) writes the tensor's numel floats in that order when the tensor's data is written.
  void add_tensor(std::string name, std::vector<int64_t> shape, GgufType type,
                  std::function<void(float* dst)> fill);
  // Writes the file atomically; throws kiln::Error naming the path or the tensor on failure.
  void write(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    GgufType type;
    std::function<void(float*)> fill;
  };
  std::vector<GgufMetadata> meta_;
  std::vector<Tensor> tensors_;
};

// Encodes n floats as `type` into dst (gguf_type_bytes(type, n) bytes). Q8_0 follows ggml's
// quantize_row_q8_0_ref: per block of 32, d = max|x| / 127 stored as f16, q = roundf(x / d) (x · (1/d)).
void gguf_encode(GgufType type, const float* src, uint64_t n, uint8_t* dst);
// Decodes F32, F16, BF16 or Q8_0 data to floats.
void gguf_decode(GgufType type, const uint8_t* src, uint64_t n, float* dst);

struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> ne;  // fastest-first, as in the file
  GgufType type = GgufType::F32;
  uint64_t offset = 0;       // from the start of the data section
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;
  uint64_t numel() const;
};

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);  // maps the file and parses it
  // Parses a copy of an in-memory file; `name` stands for the file in error messages (tests, the fuzzer).
  static GgufFile from_bytes(std::string bytes, std::string name);

  uint32_t version = 0;
  uint32_t alignment = 32;
  uint64_t data_offset = 0;  // of the data section, from the start of the file
  std::vector<GgufMetadata> metadata;
  std::vector<GgufTensorInfo> tensors;

  const GgufValue* find(const std::string& key) const;
  const GgufValue& get(const std::string& key) const;  // throws naming the key when absent
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  const GgufTensorInfo& get_tensor(const std::string& name) const;
  std::vector<float> tensor_floats(const std::string& name) const;  // decoded

  const std::string& path() const { return path_; }

 private:
  GgufFile() = default;
  void parse(const uint8_t* p, size_t n);
  std::string path_;
  std::shared_ptr<void> owner_;  // the mapping or the byte copy the data pointers point into
};

}  // namespace kiln
