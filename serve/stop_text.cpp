#include "serve/stop_text.h"

#include <algorithm>

#include "infer/text_stream.h"

namespace kiln::serve {

StopText::StopText(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
  for (const auto& s : stops_) longest_ = std::max(longest_, s.size());
}

std::string StopText::release(size_t end) {
  std::string out = buf_.substr(emitted_, end - emitted_);
  emitted_ = end;
  released_ += out;
  return out;
}

std::string StopText::push(std::string_view bytes) {
  if (stopped_) return "";
  const size_t before = buf_.size();
  buf_.append(bytes);
  if (!stops_.empty()) {
    // A stop string completed by these bytes starts at most longest_ - 1 bytes before them.
    const size_t from = before >= longest_ ? before - (longest_ - 1) : 0;
    size_t first = std::string::npos;
    for (const auto& s : stops_) first = std::min(first, buf_.find(s, from));
    if (first != std::string::npos) {
      stopped_ = true;
      buf_.resize(std::max(first, emitted_));
      return release(buf_.size());
    }
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const auto& s : stops_)
    for (size_t k = std::min(s.size() - 1, buf_.size()); k > hold; k--)
      if (buf_.compare(buf_.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
  size_t end = TextStream::complete_prefix(buf_, buf_.size() - hold);
  return release(std::max(end, emitted_));
}

std::string StopText::finish() { return release(buf_.size()); }

}  // namespace kiln::serve
