// quote_name: names taken from a file, made safe for a one-line error message.
#pragma once
#include <string>
#include <string_view>

namespace kiln {

// For error messages: a name from a file in double quotes (not std::quoted, which leaves control characters), control
// characters escaped and long names cut, so the message stays one readable line whatever the file holds.
inline std::string quote_name(std::string_view name) {
  constexpr size_t kMax = 120;
  std::string out = "\"";
  for (size_t i = 0; i < name.size() && i < kMax; i++) {
    unsigned char c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
      const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += char(c);
    }
  }
  if (name.size() > kMax) out += "...";
  return out + "\"";
}

}  // namespace kiln
