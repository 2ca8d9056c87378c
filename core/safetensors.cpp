#include "core/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "core/error.h"

namespace kiln {

namespace {

using json = nlohmann::json;

// Every dtype the format defines with a whole number of bytes per element. `rank` follows the order of
// the reference implementation's Dtype enum, which its writer sorts by (descending).
struct DTypeInfo {
  const char* name;
  size_t size;
  int rank;
  std::optional<DType> kiln;
};
const DTypeInfo kDTypes[] = {
    {"BOOL", 1, 0, std::nullopt},    {"U8", 1, 4, std::nullopt},      {"I8", 1, 5, std::nullopt},
    {"F8_E5M2", 1, 6, std::nullopt}, {"F8_E4M3", 1, 7, std::nullopt}, {"F8_E8M0", 1, 8, std::nullopt},
    {"I16", 2, 9, std::nullopt},     {"U16", 2, 10, DType::U16},      {"F16", 2, 11, DType::F16},
    {"BF16", 2, 12, DType::BF16},    {"I32", 4, 13, DType::I32},      {"U32", 4, 14, std::nullopt},
    {"F32", 4, 15, DType::F32},      {"F64", 8, 16, std::nullopt},    {"I64", 8, 17, std::nullopt},
    {"U64", 8, 18, std::nullopt},    {"C64", 8, 19, std::nullopt},
};

const DTypeInfo* lookup_dtype(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

int dtype_rank(DType t) {
  for (const auto& d : kDTypes)
    if (d.kiln == t) return d.rank;
  return 0;
}

// A valid header is at most three levels deep ({name: {"shape": [..]}}); a small limit keeps hostile
// nesting from exhausting the stack, and duplicate keys (which nlohmann would silently merge) are refused.
constexpr int kMaxHeaderDepth = 8;

json parse_header(const char* text, size_t n, const std::string& path) {
  std::vector<std::set<std::string>> keys;
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
        KILN_CHECK(depth < kMaxHeaderDepth, path, ": safetensors header is nested too deeply");
        keys.emplace_back();
        break;
      case json::parse_event_t::array_start:
        KILN_CHECK(depth < kMaxHeaderDepth, path, ": safetensors header is nested too deeply");
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& k = parsed.get_ref<const std::string&>();
        KILN_CHECK(!keys.empty() && keys.back().insert(k).second, path, ": safetensors header has duplicate key ",
                   quote_name(k));
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text, text + n, cb);
  } catch (const json::exception& e) {
    fail(path, ": malformed safetensors header JSON (", e.what(), ")");
  }
}

int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& where) {
  int64_t n = 1;
  for (int64_t d : shape) KILN_CHECK(!__builtin_mul_overflow(n, d, &n), where, ": shape is too large");
  return n;
}

}  // namespace

int64_t SafeTensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated against overflow when read
  return n;
}

SafeTensorsReader::SafeTensorsReader(const std::string& path) : path_(path), file_(path) {
  parse(file_.data(), file_.size());
}

SafeTensorsReader SafeTensorsReader::from_bytes(std::string bytes, std::string name) {
  SafeTensorsReader r;
  r.path_ = std::move(name);
  r.copy_ = std::make_unique<std::string>(std::move(bytes));
  r.parse(reinterpret_cast<const uint8_t*>(r.copy_->data()), r.copy_->size());
  return r;
}

void SafeTensorsReader::parse(const uint8_t* bytes, const size_t size) {
  const std::string& path = path_;
  KILN_CHECK(size >= 8, path, ": too short for a safetensors file (", size, " bytes)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | bytes[i];
  KILN_CHECK(n <= size - 8, path, ": safetensors header length ", n, " is beyond the end of the file (", size,
             " bytes; truncated or not a safetensors file)");
  KILN_CHECK(n >= 2 && bytes[8] == '{', path, ": safetensors header does not start with '{'");
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  json header = parse_header(text, size_t(n), path);
  KILN_CHECK(header.is_object(), path, ": safetensors header is not a JSON object");

  const uint8_t* data = bytes + 8 + n;
  const size_t data_size = size - 8 - n;
  for (auto& [name, info] : header.items()) {
    const std::string where = str(path, ": tensor ", quote_name(name));
    if (name == "__metadata__") {
      KILN_CHECK(info.is_object(), path, ": __metadata__ must be an object of strings");
      for (auto& [k, v] : info.items()) {
        KILN_CHECK(v.is_string(), path, ": __metadata__ value for ", quote_name(k), " is not a string");
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    KILN_CHECK(info.is_object(), where, ": header entry is not an object");
    KILN_CHECK(info.contains("dtype") && info["dtype"].is_string(), where, ": missing or non-string dtype");
    KILN_CHECK(info.contains("shape") && info["shape"].is_array(), where, ": missing or non-array shape");
    KILN_CHECK(info.contains("data_offsets") && info["data_offsets"].is_array() && info["data_offsets"].size() == 2,
               where, ": data_offsets must be [begin, end]");
    SafeTensorsEntry e;
    e.name = name;
    e.dtype = info["dtype"].get<std::string>();
    const DTypeInfo* dt = lookup_dtype(e.dtype);
    KILN_CHECK(dt, where, ": unknown dtype ", quote_name(e.dtype));
    for (auto& d : info["shape"]) {
      KILN_CHECK(d.is_number_integer(), where, ": shape ", info["shape"].dump(), " has a non-integer dimension");
      KILN_CHECK(d.is_number_unsigned() || d.get<int64_t>() >= 0, where, ": shape ", info["shape"].dump(),
                 " has a negative dimension");
      KILN_CHECK(d.get<uint64_t>() <= uint64_t(INT64_MAX), where, ": shape dimension too large");
      e.shape.push_back(d.get<int64_t>());
    }
    for (auto& o : info["data_offsets"])
      KILN_CHECK(o.is_number_unsigned() || (o.is_number_integer() && o.get<int64_t>() >= 0), where, ": data_offsets ",
                 info["data_offsets"].dump(), " must be non-negative integers");
    uint64_t begin = info["data_offsets"][0].get<uint64_t>(), end = info["data_offsets"][1].get<uint64_t>();
    KILN_CHECK(begin <= end, where, ": data_offsets [", begin, ", ", end, "] are reversed");
    KILN_CHECK(end <= data_size, where, ": data_offsets [", begin, ", ", end, "] are beyond the data section (",
               data_size, " bytes; truncated file?)");
    int64_t numel = checked_numel(e.shape, where);
    uint64_t want = 0;
    KILN_CHECK(!__builtin_mul_overflow(uint64_t(numel), uint64_t(dt->size), &want), where, ": shape is too large");
    KILN_CHECK(end - begin == want, where, ": shape ", shape_str(e.shape), " of ", e.dtype, " needs ", want,
               " bytes but data_offsets [", begin, ", ", end, "] hold ", end - begin);
    e.begin = size_t(begin);
    e.end = size_t(end);
    e.bytes = data + e.begin;
    entries_.push_back(std::move(e));
  }

  // Data order; two tensors may not share bytes (empty tensors take no bytes and cannot overlap).
  std::sort(entries_.begin(), entries_.end(), [](const SafeTensorsEntry& a, const SafeTensorsEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const SafeTensorsEntry* prev = nullptr;
  for (const auto& e : entries_) {
    if (e.begin == e.end) continue;
    KILN_CHECK(!prev || e.begin >= prev->end, path, ": tensors ", quote_name(prev ? prev->name : ""), " and ",
               quote_name(e.name), " overlap in the data section");
    prev = &e;
  }

  for (auto& e : entries_) {
    const DTypeInfo* dt = lookup_dtype(e.dtype);
    if (!dt->kiln || e.shape.size() > 4) continue;
    Tensor t;
    t.name = e.name;
    t.dtype = *dt->kiln;
    t.shape = Shape::of(e.shape);
    t.data = const_cast<uint8_t*>(e.bytes);  // read-only map; kiln never writes through loaded tensors
    // A writer that did not pad its header leaves data unaligned; keep an aligned copy so that
    // t.as<float>() is a valid pointer.
    if (reinterpret_cast<uintptr_t>(e.bytes) % dt->size != 0) {
      size_t nbytes = e.end - e.begin;
      aligned_copies_.emplace_back(new uint64_t[(nbytes + 7) / 8]);
      std::memcpy(aligned_copies_.back().get(), e.bytes, nbytes);
      t.data = aligned_copies_.back().get();
    }
    e.tensor_index = int(tensors_.size());
    tensors_.push_back(std::move(t));
  }
}

const SafeTensorsEntry* SafeTensorsReader::find_entry(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

const Tensor* SafeTensorsReader::find(const std::string& name) const {
  const SafeTensorsEntry* e = find_entry(name);
  if (!e) return nullptr;
  KILN_CHECK(e->tensor_index >= 0, path(), ": tensor ", quote_name(name), " has dtype ", e->dtype, " and shape ",
             shape_str(e->shape), ", which kiln cannot load (F32, BF16, F16, I32, U16 up to 4 dims)");
  return &tensors_[size_t(e->tensor_index)];
}

const Tensor& SafeTensorsReader::get(const std::string& name) const {
  const Tensor* t = find(name);
  KILN_CHECK(t, path(), ": no tensor ", quote_name(name));
  return *t;
}

// ---------------------------------------------------------------------------------------------------------
// Writing

namespace {

struct WriteItem {
  const Tensor* src;
  DType out;
};

void write_items(const std::string& path, std::vector<WriteItem> items, const std::map<std::string, std::string>& md) {
  std::set<std::string> names;
  for (const auto& it : items) {
    const Tensor& t = *it.src;
    KILN_CHECK(t.name != "__metadata__", path, ": a tensor may not be named __metadata__");
    KILN_CHECK(names.insert(t.name).second, path, ": tensor ", quote_name(t.name), " given twice");
    for (int i = 0; i < t.shape.ndim; i++)
      KILN_CHECK(t.shape[i] >= 0, path, ": tensor ", quote_name(t.name), " has a negative dimension ", t.shape.str());
    KILN_CHECK(t.data || t.numel() == 0, path, ": tensor ", quote_name(t.name), " has no data");
  }
  std::stable_sort(items.begin(), items.end(), [](const WriteItem& a, const WriteItem& b) {
    int ra = dtype_rank(a.out), rb = dtype_rank(b.out);
    return ra != rb ? ra > rb : a.src->name < b.src->name;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!md.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : md) m[k] = v;
    header["__metadata__"] = m;
  }
  size_t offset = 0;
  for (const auto& it : items) {
    size_t nbytes = size_t(it.src->numel()) * dtype_size(it.out);
    header[it.src->name] = {{"dtype", std::string(dtype_name(it.out))},
                            {"shape", it.src->shape.vec()},
                            {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; i++) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  write_file_atomic(path, [&](int fd) {
    write_all(fd, len, 8, path);
    write_all(fd, text.data(), text.size(), path);
    std::vector<uint16_t> buf;
    for (const auto& it : items) {
      const Tensor& t = *it.src;
      if (it.out == t.dtype) {
        write_all(fd, t.data, t.nbytes(), path);
        continue;
      }
      // Conversion from f32, in chunks that stay in cache.
      const float* src = t.f32();
      const size_t n = size_t(t.numel()), chunk = size_t(1) << 16;
      buf.resize(std::min(n, chunk));
      for (size_t s = 0; s < n; s += chunk) {
        size_t m = std::min(chunk, n - s);
        if (it.out == DType::BF16)
          for (size_t i = 0; i < m; i++) buf[i] = f32_to_bf16(src[s + i]);
        else
          for (size_t i = 0; i < m; i++) buf[i] = f32_to_f16(src[s + i]);
        write_all(fd, buf.data(), m * 2, path);
      }
    }
  });
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<WriteItem> items;
  for (const auto& t : tensors) items.push_back({&t, t.dtype});
  write_items(path, std::move(items), metadata);
}

void write_safetensors_converted(const std::string& path, const std::vector<Tensor>& f32_tensors, DType on_disk,
                                 const std::map<std::string, std::string>& metadata) {
  KILN_CHECK(on_disk == DType::F32 || on_disk == DType::BF16 || on_disk == DType::F16, path,
             ": weights can be written as F32, BF16 or F16, not ", dtype_name(on_disk));
  std::vector<WriteItem> items;
  for (const auto& t : f32_tensors) {
    KILN_CHECK(t.dtype == DType::F32, path, ": tensor ", quote_name(t.name), " is ", dtype_name(t.dtype),
               ", expected F32");
    items.push_back({&t, on_disk});
  }
  write_items(path, std::move(items), metadata);
}

void convert_to_f32(const void* src, DType src_dtype, float* dst, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  switch (src_dtype) {
    case DType::F32:
      std::memcpy(dst, p, n * 4);
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case DType::F16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    default:
      fail("convert_to_f32: dtype ", dtype_name(src_dtype), " is not a floating-point type");
  }
}

}  // namespace kiln
