#include "infer/text_stream.h"

#include <algorithm>
#include <cstdint>

namespace kiln {

size_t TextStream::complete_prefix(std::string_view s, size_t n) {
  // Walk back over at most 3 continuation bytes to the lead byte of the last character.
  size_t i = n;
  while (i > 0 && n - i < 4 && (uint8_t(s[i - 1]) & 0xC0) == 0x80) i--;
  if (i == 0) return n;
  const uint8_t lead = uint8_t(s[i - 1]);
  size_t len = 1;
  if (lead >= 0xF0 && lead <= 0xF7)
    len = 4;
  else if (lead >= 0xE0)
    len = lead <= 0xEF ? 3 : 1;
  else if (lead >= 0xC0)
    len = 2;
  // Incomplete: hold the lead byte and what follows. Anything else (ASCII, a complete character, stray
  // continuation bytes, bytes that cannot lead) is released as it is.
  return (len > 1 && (i - 1) + len > n) ? i - 1 : n;
}

std::string TextStream::push(std::string_view bytes) {
  if (stopped_) return {};
  const size_t searched = buf_.size();
  buf_.append(bytes);
  size_t safe = buf_.size();
  if (!stop_.empty()) {
    // The stop string can only newly appear in a window that reaches into the new bytes.
    const size_t from = searched >= stop_.size() ? searched - stop_.size() + 1 : 0;
    const size_t at = buf_.find(stop_, from);
    if (at != std::string::npos) {
      stopped_ = true;
      std::string out = buf_.substr(emitted_, at > emitted_ ? at - emitted_ : 0);
      released_ += out;
      emitted_ = at;
      return out;
    }
    // Hold back the longest suffix that is a proper prefix of the stop string.
    for (size_t k = std::min(stop_.size() - 1, buf_.size()); k > 0; k--)
      if (buf_.compare(buf_.size() - k, k, stop_, 0, k) == 0) {
        safe = buf_.size() - k;
        break;
      }
  }
  safe = std::max(emitted_, complete_prefix(buf_, safe));
  std::string out = buf_.substr(emitted_, safe - emitted_);
  emitted_ = safe;
  released_ += out;
  return out;
}

std::string TextStream::finish() {
  if (stopped_) return {};
  std::string out = buf_.substr(emitted_);
  emitted_ = buf_.size();
  released_ += out;
  return out;
}

}  // namespace kiln
