#include "core/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "core/dtype.h"
#include "core/error.h"
#include "core/file_io.h"
#include "core/quote.h"

namespace kiln {

namespace {

constexpr uint32_t kVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
constexpr size_t kMaxTensorName = 63;  // ggml's GGML_MAX_NAME (64) includes the terminating NUL
constexpr int kMaxDims = 4;

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

template <class T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));  // the file is little-endian, as is every host here
}

void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

template <class T>
GgufValue scalar(GgufValueType t, T v) {
  GgufValue g;
  g.type = t;
  g.data.assign(reinterpret_cast<const char*>(&v), sizeof(T));
  return g;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::F32: return "F32";
    case GgufType::F16: return "F16";
    case GgufType::Q8_0: return "Q8_0";
    case GgufType::I8: return "I8";
    case GgufType::I16: return "I16";
    case GgufType::I32: return "I32";
    case GgufType::I64: return "I64";
    case GgufType::F64: return "F64";
    case GgufType::BF16: return "BF16";
  }
  return "?";
}

uint64_t gguf_type_bytes(GgufType t, uint64_t n) {
  switch (t) {
    case GgufType::F32: case GgufType::I32: return 4 * n;
    case GgufType::F16: case GgufType::BF16: case GgufType::I16: return 2 * n;
    case GgufType::I8: return n;
    case GgufType::I64: case GgufType::F64: return 8 * n;
    case GgufType::Q8_0: return n / kGgufQ8Block * kGgufQ8BlockBytes;
  }
  return 0;
}

static uint64_t block_size(GgufType t) { return t == GgufType::Q8_0 ? kGgufQ8Block : 1; }

size_t gguf_value_type_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8: case GgufValueType::I8: case GgufValueType::Bool: return 1;
    case GgufValueType::U16: case GgufValueType::I16: return 2;
    case GgufValueType::U32: case GgufValueType::I32: case GgufValueType::F32: return 4;
    case GgufValueType::U64: case GgufValueType::I64: case GgufValueType::F64: return 8;
    case GgufValueType::String: case GgufValueType::Array: return 0;
  }
  return 0;
}

static bool valid_value_type(uint32_t t) { return t <= uint32_t(GgufValueType::F64); }

// --- GgufValue ---------------------------------------------------------------------------------------------

GgufValue GgufValue::u8(uint8_t v) { return scalar(GgufValueType::U8, v); }
GgufValue GgufValue::i8(int8_t v) { return scalar(GgufValueType::I8, v); }
GgufValue GgufValue::u16(uint16_t v) { return scalar(GgufValueType::U16, v); }
GgufValue GgufValue::i16(int16_t v) { return scalar(GgufValueType::I16, v); }
GgufValue GgufValue::u32(uint32_t v) { return scalar(GgufValueType::U32, v); }
GgufValue GgufValue::i32(int32_t v) { return scalar(GgufValueType::I32, v); }
GgufValue GgufValue::u64(uint64_t v) { return scalar(GgufValueType::U64, v); }
GgufValue GgufValue::i64(int64_t v) { return scalar(GgufValueType::I64, v); }
GgufValue GgufValue::f32(float v) { return scalar(GgufValueType::F32, v); }
GgufValue GgufValue::f64(double v) { return scalar(GgufValueType::F64, v); }
GgufValue GgufValue::boolean(bool v) { return scalar(GgufValueType::Bool, uint8_t(v ? 1 : 0)); }

GgufValue GgufValue::str(std::string v) {
  GgufValue g;
  g.type = GgufValueType::String;
  g.data = std::move(v);
  return g;
}

GgufValue GgufValue::array(GgufValueType elem, const void* data, uint64_t count) {
  const size_t es = gguf_value_type_size(elem);
  KILN_CHECK(es > 0, "gguf: array of ", uint32_t(elem), " needs str_array (strings) or is not supported (arrays)");
  GgufValue g;
  g.type = GgufValueType::Array;
  g.elem = elem;
  g.count = count;
  g.data.assign(static_cast<const char*>(data), es * count);
  return g;
}

GgufValue GgufValue::str_array(std::vector<std::string> v) {
  GgufValue g;
  g.type = GgufValueType::Array;
  g.elem = GgufValueType::String;
  g.count = v.size();
  g.strings = std::move(v);
  return g;
}

template <class T>
static T load(const std::string& d) {
  T v;
  std::memcpy(&v, d.data(), sizeof(T));
  return v;
}

int64_t GgufValue::as_int(const std::string& what) const {
  switch (type) {
    case GgufValueType::U8: return load<uint8_t>(data);
    case GgufValueType::I8: return load<int8_t>(data);
    case GgufValueType::U16: return load<uint16_t>(data);
    case GgufValueType::I16: return load<int16_t>(data);
    case GgufValueType::U32: return load<uint32_t>(data);
    case GgufValueType::I32: return load<int32_t>(data);
    case GgufValueType::I64: return load<int64_t>(data);
    case GgufValueType::U64: {
      const uint64_t u = load<uint64_t>(data);
      KILN_CHECK(u <= uint64_t(INT64_MAX), what, ": value ", u, " out of range");
      return int64_t(u);
    }
    default: fail(what, ": expected an integer, found type ", uint32_t(type));
  }
}

uint64_t GgufValue::as_uint(const std::string& what) const {
  if (type == GgufValueType::U64) return load<uint64_t>(data);
  const int64_t v = as_int(what);
  KILN_CHECK(v >= 0, what, ": negative value ", v);
  return uint64_t(v);
}

double GgufValue::as_float(const std::string& what) const {
  if (type == GgufValueType::F32) return load<float>(data);
  if (type == GgufValueType::F64) return load<double>(data);
  fail(what, ": expected a float, found type ", uint32_t(type));
}

bool GgufValue::as_bool(const std::string& what) const {
  KILN_CHECK(type == GgufValueType::Bool, what, ": expected a bool, found type ", uint32_t(type));
  return data[0] != 0;
}

const std::string& GgufValue::as_string(const std::string& what) const {
  KILN_CHECK(type == GgufValueType::String, what, ": expected a string, found type ", uint32_t(type));
  return data;
}

// --- encoding ----------------------------------------------------------------------------------------------

void gguf_encode(GgufType type, const float* src, uint64_t n, uint8_t* dst) {
  switch (type) {
    case GgufType::F32: std::memcpy(dst, src, n * 4); return;
    case GgufType::F16:
      for (uint64_t i = 0; i < n; i++) {
        const uint16_t h = f32_to_f16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case GgufType::Q8_0:
      KILN_CHECK(n % kGgufQ8Block == 0, "gguf: Q8_0 needs a multiple of 32 values, got ", n);
      for (uint64_t b = 0; b < n / kGgufQ8Block; b++) {
        const float* x = src + b * kGgufQ8Block;
        uint8_t* out = dst + b * kGgufQ8BlockBytes;
        float amax = 0.0f;
        for (int j = 0; j < kGgufQ8Block; j++) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;  // ggml multiplies by the inverse, not divides
        const uint16_t dh = f32_to_f16(d);
        std::memcpy(out, &dh, 2);
        for (int j = 0; j < kGgufQ8Block; j++) out[2 + j] = uint8_t(int8_t(std::roundf(x[j] * id)));
      }
      return;
    default: fail("gguf: cannot encode tensors of type ", gguf_type_name(type));
  }
}

void gguf_decode(GgufType type, const uint8_t* src, uint64_t n, float* dst) {
  switch (type) {
    case GgufType::F32: std::memcpy(dst, src, n * 4); return;
    case GgufType::F16:
    case GgufType::BF16:
      for (uint64_t i = 0; i < n; i++) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = type == GgufType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
      return;
    case GgufType::Q8_0:
      for (uint64_t b = 0; b < n / kGgufQ8Block; b++) {
        const uint8_t* in = src + b * kGgufQ8BlockBytes;
        uint16_t dh;
        std::memcpy(&dh, in, 2);
        const float d = f16_to_f32(dh);
        for (int j = 0; j < kGgufQ8Block; j++) dst[b * kGgufQ8Block + j] = d * float(int8_t(in[2 + j]));
      }
      return;
    default: fail("gguf: cannot decode tensors of type ", gguf_type_name(type));
  }
}

// --- writer ------------------------------------------------------------------------------------------------

void GgufWriter::set(const std::string& key, GgufValue v) {
  KILN_CHECK(!key.empty() && key.size() < 65536, "gguf: metadata key of length ", key.size());
  for (auto& m : meta_)
    if (m.key == key) {
      m.value = std::move(v);
      return;
    }
  meta_.push_back({key, std::move(v)});
}

void GgufWriter::add_tensor(std::string name, std::vector<int64_t> shape, GgufType type,
                            std::function<void(float*)> fill) {
  KILN_CHECK(!name.empty() && name.size() <= kMaxTensorName, "gguf: tensor name '", name, "' is longer than ",
             kMaxTensorName, " bytes");
  KILN_CHECK(!shape.empty() && shape.size() <= size_t(kMaxDims), "gguf: tensor ", name, " has ", shape.size(),
             " dimensions");
  for (int64_t d : shape) KILN_CHECK(d > 0, "gguf: tensor ", name, " has a dimension ", d);
  KILN_CHECK(type == GgufType::F32 || type == GgufType::F16 || type == GgufType::Q8_0, "gguf: tensor ", name,
             ": cannot write type ", gguf_type_name(type));
  KILN_CHECK(shape.back() % int64_t(block_size(type)) == 0, "gguf: tensor ", name, ": rows of ", shape.back(),
             " values are not a multiple of the ", gguf_type_name(type), " block");
  for (const auto& t : tensors_) KILN_CHECK(t.name != name, "gguf: tensor ", name, " added twice");
  tensors_.push_back({std::move(name), std::move(shape), type, std::move(fill)});
}

static void put_value(std::string& out, const GgufValue& v) {
  if (v.type == GgufValueType::String) {
    put_string(out, v.data);
  } else if (v.type == GgufValueType::Array) {
    put<uint32_t>(out, uint32_t(v.elem));
    put<uint64_t>(out, v.count);
    if (v.elem == GgufValueType::String)
      for (const auto& s : v.strings) put_string(out, s);
    else
      out += v.data;
  } else {
    out += v.data;
  }
}

void GgufWriter::write(const std::string& path) const {
  uint64_t alignment = kDefaultAlignment;
  bool has_alignment = false;
  for (const auto& m : meta_)
    if (m.key == "general.alignment") {
      alignment = m.value.as_uint("general.alignment");
      has_alignment = true;
    }
  KILN_CHECK(alignment > 0 && alignment % 8 == 0 && (alignment & (alignment - 1)) == 0,
             "gguf: general.alignment ", alignment, " is not a power of two multiple of 8");

  std::string head;
  head += "GGUF";
  put<uint32_t>(head, kVersion);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, meta_.size() + (has_alignment ? 0 : 1));
  if (!has_alignment) {  // written explicitly so every reader agrees on it
    put_string(head, "general.alignment");
    put<uint32_t>(head, uint32_t(GgufValueType::U32));
    put<uint32_t>(head, uint32_t(alignment));
  }
  for (const auto& m : meta_) {
    put_string(head, m.key);
    put<uint32_t>(head, uint32_t(m.value.type));
    put_value(head, m.value);
  }
  std::vector<uint64_t> nbytes(tensors_.size());
  uint64_t offset = 0;
  for (size_t i = 0; i < tensors_.size(); i++) {
    const Tensor& t = tensors_[i];
    put_string(head, t.name);
    put<uint32_t>(head, uint32_t(t.shape.size()));
    uint64_t n = 1;
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) {
      put<uint64_t>(head, uint64_t(*it));
      n *= uint64_t(*it);
    }
    put<uint32_t>(head, uint32_t(t.type));
    put<uint64_t>(head, offset);
    nbytes[i] = gguf_type_bytes(t.type, n);
    offset = align_up(offset + nbytes[i], alignment);
  }
  head.resize(align_up(head.size(), alignment), '\0');

  write_file_atomic(path, [&](int fd) {
    write_all(fd, head.data(), head.size(), path);
    std::vector<float> values;
    std::vector<uint8_t> bytes;
    static const char zeros[256] = {};
    for (size_t i = 0; i < tensors_.size(); i++) {
      const Tensor& t = tensors_[i];
      uint64_t n = 1;
      for (int64_t d : t.shape) n *= uint64_t(d);
      values.assign(n, 0.0f);  // one tensor at a time: the model is never copied whole
      t.fill(values.data());
      bytes.resize(nbytes[i]);
      gguf_encode(t.type, values.data(), n, bytes.data());
      write_all(fd, bytes.data(), bytes.size(), path);
      const uint64_t pad = align_up(nbytes[i], alignment) - nbytes[i];
      if (i + 1 < tensors_.size() && pad) write_all(fd, zeros, pad, path);
    }
  });
}

// --- reader ------------------------------------------------------------------------------------------------

namespace {

// A bounds-checked cursor: every read names the field it is reading in the error.
struct Cursor {
  const uint8_t* p;
  size_t n;
  size_t at = 0;
  const std::string& file;

  [[noreturn]] void truncated(const std::string& field, uint64_t need) const {
    fail(file, ": truncated at ", field, " (needs ", need, " bytes at offset ", at, ", file has ", n, ")");
  }
  void need(uint64_t k, const std::string& field) const {
    if (k > n - at) truncated(field, k);
  }
  template <class T>
  T get(const std::string& field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, p + at, sizeof(T));
    at += sizeof(T);
    return v;
  }
  std::string string(const std::string& field) {
    const uint64_t len = get<uint64_t>(field + " length");
    need(len, field);
    std::string s(reinterpret_cast<const char*>(p + at), size_t(len));
    at += size_t(len);
    return s;
  }
};

GgufValue read_value(Cursor& c, GgufValueType t, const std::string& field) {
  GgufValue v;
  v.type = t;
  if (t == GgufValueType::String) {
    v.data = c.string(field);
  } else if (t == GgufValueType::Array) {
    const uint32_t et = c.get<uint32_t>(field + " element type");
    KILN_CHECK(valid_value_type(et), c.file, ": ", field, ": unknown array element type ", et);
    v.elem = GgufValueType(et);
    KILN_CHECK(v.elem != GgufValueType::Array, c.file, ": ", field, ": nested arrays are not supported");
    v.count = c.get<uint64_t>(field + " count");
    if (v.elem == GgufValueType::String) {
      // Each string takes at least its 8-byte length: bound the count before reserving for it.
      if (v.count > (c.n - c.at) / 8) c.truncated(field + " (" + std::to_string(v.count) + " strings)", v.count * 8);
      v.strings.reserve(size_t(v.count));
      for (uint64_t i = 0; i < v.count; i++) v.strings.push_back(c.string(field + "[" + std::to_string(i) + "]"));
    } else {
      const size_t es = gguf_value_type_size(v.elem);
      if (v.count > (c.n - c.at) / es) c.truncated(field + " (" + std::to_string(v.count) + " elements)", v.count * es);
      v.data.assign(reinterpret_cast<const char*>(c.p + c.at), size_t(v.count * es));
      c.at += size_t(v.count * es);
      if (v.elem == GgufValueType::Bool)
        for (char b : v.data) KILN_CHECK(b == 0 || b == 1, c.file, ": ", field, ": bool value ", int(b));
    }
  } else {
    const size_t es = gguf_value_type_size(t);
    c.need(es, field);
    v.data.assign(reinterpret_cast<const char*>(c.p + c.at), es);
    c.at += es;
    if (t == GgufValueType::Bool) KILN_CHECK(v.data[0] == 0 || v.data[0] == 1, c.file, ": ", field, ": bool value ", int(v.data[0]));
  }
  return v;
}

bool known_tensor_type(uint32_t t) {
  switch (GgufType(t)) {
    case GgufType::F32: case GgufType::F16: case GgufType::Q8_0: case GgufType::I8: case GgufType::I16:
    case GgufType::I32: case GgufType::I64: case GgufType::F64: case GgufType::BF16: return true;
  }
  return false;
}

}  // namespace

uint64_t GgufTensorInfo::numel() const {
  uint64_t n = 1;
  for (uint64_t d : ne) n *= d;
  return n;
}

GgufFile::GgufFile(const std::string& path) : path_(path) {
  auto map = std::make_shared<MappedFile>(path);
  owner_ = map;
  parse(map->data(), map->size());
}

GgufFile GgufFile::from_bytes(std::string bytes, std::string name) {
  GgufFile f;
  f.path_ = std::move(name);
  auto copy = std::make_shared<std::string>(std::move(bytes));
  f.owner_ = copy;
  f.parse(reinterpret_cast<const uint8_t*>(copy->data()), copy->size());
  return f;
}

void GgufFile::parse(const uint8_t* p, size_t n) {
  Cursor c{p, n, 0, path_};
  c.need(4, "magic");
  KILN_CHECK(std::memcmp(p, "GGUF", 4) == 0, path_, ": not a GGUF file (bad magic)");
  c.at = 4;
  version = c.get<uint32_t>("version");
  KILN_CHECK(version == 2 || version == 3, path_, ": unsupported GGUF version ", version);  // v2 has v3's layout
  const uint64_t n_tensors = c.get<uint64_t>("tensor count");
  const uint64_t n_kv = c.get<uint64_t>("metadata count");
  // A key takes at least 12 bytes (length + type) and a tensor info at least 28: bound the counts by the file.
  KILN_CHECK(n_kv <= (n - c.at) / 12, path_, ": metadata count ", n_kv, " exceeds the file");
  KILN_CHECK(n_tensors <= (n - c.at) / 28, path_, ": tensor count ", n_tensors, " exceeds the file");

  std::set<std::string> keys;
  for (uint64_t i = 0; i < n_kv; i++) {
    const std::string field = "metadata " + std::to_string(i);
    std::string key = c.string(field + " key");
    KILN_CHECK(!key.empty(), path_, ": ", field, ": empty key");
    // Keys and names come from the file: quoted in messages, so a control character cannot break the line.
    const std::string qkey = quote_name(key);
    KILN_CHECK(keys.insert(key).second, path_, ": duplicate metadata key ", qkey);
    const uint32_t t = c.get<uint32_t>("metadata " + qkey + " type");
    KILN_CHECK(valid_value_type(t), path_, ": metadata ", qkey, ": unknown value type ", t);
    GgufValue v = read_value(c, GgufValueType(t), "metadata " + qkey);
    metadata.push_back({std::move(key), std::move(v)});
  }
  if (const GgufValue* a = find("general.alignment")) {
    KILN_CHECK(a->type == GgufValueType::U32, path_, ": general.alignment is not a uint32");
    const uint64_t al = a->as_uint("general.alignment");
    KILN_CHECK(al > 0 && (al & (al - 1)) == 0, path_, ": general.alignment ", al, " is not a power of two");
    alignment = uint32_t(al);
  }

  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; i++) {
    GgufTensorInfo t;
    t.name = c.string("tensor info " + std::to_string(i) + " name");
    const std::string field = "tensor " + quote_name(t.name);
    KILN_CHECK(!t.name.empty() && t.name.size() <= kMaxTensorName, path_, ": tensor info ", i, ": name of length ",
               t.name.size());
    KILN_CHECK(names.insert(t.name).second, path_, ": duplicate tensor ", quote_name(t.name));
    const uint32_t nd = c.get<uint32_t>(field + " dimension count");
    KILN_CHECK(nd >= 1 && nd <= uint32_t(kMaxDims), path_, ": ", field, ": ", nd, " dimensions");
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; d++) {
      const uint64_t x = c.get<uint64_t>(field + " dimension " + std::to_string(d));
      KILN_CHECK(x > 0 && x <= uint64_t(INT64_MAX) / numel, path_, ": ", field, ": dimension ", d, " is ", x);
      numel *= x;
      t.ne.push_back(x);
    }
    const uint32_t ty = c.get<uint32_t>(field + " type");
    KILN_CHECK(known_tensor_type(ty), path_, ": ", field, ": unsupported tensor type ", ty);
    t.type = GgufType(ty);
    KILN_CHECK(t.ne[0] % block_size(t.type) == 0, path_, ": ", field, ": row of ", t.ne[0], " values in ",
               gguf_type_name(t.type), " blocks of ", block_size(t.type));
    KILN_CHECK(numel <= uint64_t(INT64_MAX) / 8, path_, ": ", field, ": too many elements");
    t.nbytes = gguf_type_bytes(t.type, numel);
    t.offset = c.get<uint64_t>(field + " offset");
    KILN_CHECK(t.offset % alignment == 0, path_, ": ", field, ": offset ", t.offset, " is not a multiple of ",
               alignment);
    tensors.push_back(std::move(t));
  }
  data_offset = align_up(c.at, alignment);
  KILN_CHECK(tensors.empty() || data_offset <= n, path_, ": truncated before the tensor data (at ", data_offset,
             ", file has ", n, " bytes)");
  const uint64_t data_size = n >= data_offset ? n - data_offset : 0;
  // Tensors must lie inside the data section and not overlap.
  std::vector<const GgufTensorInfo*> by_offset;
  for (auto& t : tensors) {
    KILN_CHECK(t.offset <= data_size && t.nbytes <= data_size - t.offset, path_, ": tensor ", quote_name(t.name), ": data [",
               t.offset, ", +", t.nbytes, ") runs past the end of the file (data section has ", data_size,
               " bytes)");
    t.data = p + data_offset + t.offset;
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); i++)
    KILN_CHECK(by_offset[i - 1]->offset + by_offset[i - 1]->nbytes <= by_offset[i]->offset, path_, ": tensor ",
               quote_name(by_offset[i]->name), " overlaps tensor ", quote_name(by_offset[i - 1]->name));
}

const GgufValue* GgufFile::find(const std::string& key) const {
  for (const auto& m : metadata)
    if (m.key == key) return &m.value;
  return nullptr;
}

const GgufValue& GgufFile::get(const std::string& key) const {
  const GgufValue* v = find(key);
  KILN_CHECK(v, path_, ": no metadata key ", quote_name(key));
  return *v;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

const GgufTensorInfo& GgufFile::get_tensor(const std::string& name) const {
  const GgufTensorInfo* t = find_tensor(name);
  KILN_CHECK(t, path_, ": no tensor ", quote_name(name));
  return *t;
}

std::vector<float> GgufFile::tensor_floats(const std::string& name) const {
  const GgufTensorInfo& t = get_tensor(name);
  std::vector<float> out(t.numel());
  gguf_decode(t.type, t.data, out.size(), out.data());
  return out;
}

}  // namespace kiln
