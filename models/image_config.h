// Reading an image model's config.json (the DiT, the ViT, RealNVP): the text parsed, its model_type checked, and
// integer fields read into place, each failure one line naming `where` and the field.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"

namespace kiln {

class ImageConfigReader {
 public:
  ImageConfigReader(const std::string& text, const std::string& where, const char* model_type) : where_(where) {
    try {
      j_ = nlohmann::json::parse(text);
    } catch (const std::exception& e) {
      fail(where, ": not valid JSON (", e.what(), ")");
    }
    KILN_CHECK(j_.is_object() && j_.value("model_type", "") == model_type, where, ": model_type must be \"",
               model_type, "\"");
  }
  // An absent field leaves v as it is (the default).
  void get(const char* key, int& v) const {
    if (!j_.contains(key)) return;
    KILN_CHECK(j_[key].is_number_integer(), where_, ": field ", key, " must be an integer");
    v = j_[key].get<int>();
  }
  const nlohmann::json& json() const { return j_; }
  const std::string& where() const { return where_; }

 private:
  nlohmann::json j_;
  std::string where_;
};

}  // namespace kiln
