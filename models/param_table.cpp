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

}  // namespace kiln
