#include "models/param_table.h"

#include "core/error.h"

namespace kiln {

void ParamTable::add(std::string name, std::string key, Shape shape, bool packed) {
  const size_t at = packed ? end_ : total;
  specs.push_back(ParamSpec{std::move(name), std::move(key), shape, shape.ndim >= 2, at});
  end_ = at + size_t(shape.numel());
  total = (end_ + 15) / 16 * 16;  // every tensor that is not packed starts on a 16-float boundary
}

const ParamSpec* ParamTable::find(const std::string& name) const {
  for (const auto& s : specs)
    if (s.name == name) return &s;
  return nullptr;
}

const ParamSpec* ParamTable::find_key(const std::string& key) const {
  for (const auto& s : specs)
    if (s.key == key) return &s;
  return nullptr;
}

const ParamSpec& ParamTable::get_key(const std::string& key) const {
  const ParamSpec* s = find_key(key);
  KILN_CHECK(s, "parameter table: no tensor ", key);
  return *s;
}

void ParamTable::split_last() {
  KILN_CHECK(!specs.empty() && specs.back().shape.ndim >= 2 && specs.back().name.find('*') != std::string::npos,
             "parameter table: split tensor without a '*' in its name");
  specs.back().split = true;
}

std::vector<FileTensor> ParamTable::file_tensors() const {
  std::vector<FileTensor> out;
  out.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); i++) {
    const ParamSpec& s = specs[i];
    if (!s.split) {
      out.push_back({s.name, s.shape, s.offset, i});
      continue;
    }
    Shape part;
    for (int d = 1; d < s.shape.ndim; d++) part.dims[size_t(part.ndim++)] = s.shape[d];
    const size_t star = s.name.find('*');
    for (int64_t e = 0; e < s.shape[0]; e++)
      out.push_back({s.name.substr(0, star) + std::to_string(e) + s.name.substr(star + 1), part,
                     s.offset + size_t(e * part.numel()), i});
  }
  return out;
}

}  // namespace kiln
