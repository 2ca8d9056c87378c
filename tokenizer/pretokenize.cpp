#include "tokenizer/pretokenize.h"

#include <algorithm>
#include <array>
#include <memory>

#include "tokenizer/unicode_tables.h"

namespace kiln::pretok {

namespace {

template <size_t N>
bool in_ranges(const unicode::CodeRange (&r)[N], uint32_t cp) {
  // First range whose hi >= cp.
  const unicode::CodeRange* it =
      std::lower_bound(r, r + N, cp, [](const unicode::CodeRange& a, uint32_t v) { return a.hi < v; });
  return it != r + N && it->lo <= cp;
}

CharClass classify_slow(uint32_t cp) {
  if (in_ranges(unicode::kWhiteSpaceRanges, cp)) return kSpace;
  if (in_ranges(unicode::kLetterRanges, cp)) return kLetter;
  if (in_ranges(unicode::kNumberRanges, cp)) return kNumber;
  return kOther;
}

// One byte per BMP code point, filled once from the range tables (64 KiB).
const uint8_t* bmp_table() {
  static const std::unique_ptr<uint8_t[]> table = [] {
    std::unique_ptr<uint8_t[]> t(new uint8_t[0x10000]);
    for (uint32_t cp = 0; cp < 0x10000; cp++) t[cp] = classify_slow(cp);
    return t;
  }();
  return table.get();
}

constexpr std::array<uint8_t, 128> make_ascii() {
  std::array<uint8_t, 128> a{};
  for (int c = 0; c < 128; c++) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
      a[c] = kLetter;
    else if (c >= '0' && c <= '9')
      a[c] = kNumber;
    else if (c == ' ' || (c >= 0x09 && c <= 0x0D))
      a[c] = kSpace;
    else
      a[c] = kOther;
  }
  return a;
}
constexpr std::array<uint8_t, 128> kAscii = make_ascii();

// Class of the character that ends right before byte p (p > 0). Decoding is self-synchronizing: the
// nearest non-continuation byte at most 4 back starts the character if its sequence ends exactly at p;
// otherwise byte p-1 is a stray continuation byte, an "other" character of its own.
CharClass class_before(const uint8_t* s, size_t n, size_t p) {
  for (size_t k = 1; k <= 4 && k <= p; k++) {
    uint8_t b = s[p - k];
    if ((b & 0xC0) == 0x80) continue;
    Char c = next_char(s + p - k, s + n);
    return c.len == k ? c.cls : kOther;
  }
  return kOther;
}

}  // namespace

const uint8_t kAsciiClass[128] = {
#define K(i) \
  kAscii[i], kAscii[i + 1], kAscii[i + 2], kAscii[i + 3], kAscii[i + 4], kAscii[i + 5], kAscii[i + 6], kAscii[i + 7]
    K(0),  K(8),  K(16), K(24), K(32),  K(40),  K(48), K(56), K(64),
    K(72), K(80), K(88), K(96), K(104), K(112), K(120)
#undef K
};

CharClass classify(uint32_t cp) {
  if (cp < 0x10000) return CharClass(bmp_table()[cp]);
  return classify_slow(cp);
}

bool is_safe_split(std::string_view text, size_t p) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  if (p == 0 || p >= n) return false;
  if (s[p] == ' ') {
    // "x| y": the space starts " y" in any case.
    return p + 1 < n && next_char(s + p + 1, s + n).cls != kSpace && class_before(s, n, p) != kSpace;
  }
  uint8_t w = s[p - 1];
  if (w != ' ' && w < 0x80 && kAsciiClass[w] == kSpace) {
    // "x\n|y": a lone whitespace character between non-spaces is a pre-token of its own.
    return p >= 2 && next_char(s + p, s + n).cls != kSpace && class_before(s, n, p - 1) != kSpace;
  }
  return false;
}

size_t next_safe_split(std::string_view text, size_t from) {
  for (size_t p = std::max<size_t>(from, 1); p < text.size(); p++)
    if (is_safe_split(text, p)) return p;
  return text.size();
}

bool is_safe_split(PreTokenizer pre, std::string_view text, size_t p) {
  if (pre == PreTokenizer::kGpt2) return is_safe_split(text, p);
  const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
  // No alternative takes a ' ' after a non-space character, and none looks behind.
  return p > 0 && p < text.size() && s[p] == ' ' && class_before(s, text.size(), p) != kSpace;
}

size_t next_safe_split(PreTokenizer pre, std::string_view text, size_t from) {
  if (pre == PreTokenizer::kGpt2) return next_safe_split(text, from);
  for (size_t p = std::max<size_t>(from, 1); p < text.size(); p++)
    if (is_safe_split(pre, text, p)) return p;
  return text.size();
}

}  // namespace kiln::pretok
