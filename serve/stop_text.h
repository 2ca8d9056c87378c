// A completion's text as it streams out, with any number of stop strings (OpenAI's `stop`).
//
// Bytes come token by token. A stop string may be split across tokens, so the bytes that could still be the
// start of one are held back until the next token shows they are not; once a stop string appears, the text
// ends before it (the stop string is never sent). As infer/text_stream.h does for one stop string, only whole
// UTF-8 characters are released until the end.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace kiln::serve {

class StopText {
 public:
  explicit StopText(std::vector<std::string> stops = {});
  // Adds one token's bytes; returns the bytes now safe to send (possibly empty).
  std::string push(std::string_view bytes);
  // The held-back rest (nothing after a stop).
  std::string finish();
  bool stopped() const { return stopped_; }
  const std::string& text() const { return released_; }  // everything released so far

 private:
  std::vector<std::string> stops_;
  size_t longest_ = 0;
  std::string buf_;
  size_t emitted_ = 0;
  std::string released_;
  bool stopped_ = false;
  std::string release(size_t end);
};

}  // namespace kiln::serve
