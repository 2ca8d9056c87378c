// Turning generated token bytes into text that can be printed as it arrives.
//
// Byte-level BPE tokens are byte strings: a multi-byte UTF-8 character can be split across tokens, so the
// stream only releases bytes up to the last complete character (invalid bytes are released as they are;
// the rest comes out at finish()). With a stop string, bytes that could be the start of the stop string are
// held back until they are known not to be, and once the stop string appears everything from it on is dropped.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace kiln {

class TextStream {
 public:
  explicit TextStream(std::string stop = "") : stop_(std::move(stop)) {}

  // Adds the bytes of one token; returns the bytes that are now safe to print (possibly empty).
  std::string push(std::string_view bytes);
  // The held-back rest (nothing after a stop).
  std::string finish();
  bool stopped() const { return stopped_; }
  // Everything released so far plus, after finish(), the rest: the completion text.
  const std::string& text() const { return released_; }

  // The largest n' <= n such that s[0, n') does not end inside a UTF-8 sequence that s[0, n) leaves
  // incomplete (a lead byte whose continuation bytes have not all arrived).
  static size_t complete_prefix(std::string_view s, size_t n);

 private:
  std::string stop_;
  std::string buf_;       // all completion bytes so far (until a stop)
  size_t emitted_ = 0;    // bytes of buf_ released
  std::string released_;
  bool stopped_ = false;
};

}  // namespace kiln
