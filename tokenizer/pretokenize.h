// GPT-2's pre-tokenization, written out by hand (no regex library):
//
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// Text is UTF-8. Each valid UTF-8 sequence is one character, classified by the tables in
// unicode_tables.h (letter \p{L}, number \p{N}, whitespace \s = Unicode White_Space, or other).
// Invalid UTF-8: every byte that does not start a valid, shortest-form sequence of a scalar value is a
// character of its own in the "other" class, so any byte string pre-tokenizes, every byte lands in
// exactly one pre-token, and decode(encode(x)) == x. (The Python and JS encoders only see Unicode
// strings; on valid UTF-8 kiln matches them.)
//
// Known differences from the gpt-3-encoder npm package: JavaScript's \s also matches U+FEFF and not
// U+0085, and Node's Unicode version may be newer than the tables here (letters assigned after
// Unicode 14 are "other" to kiln).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kiln {
// The pre-tokenization rules kiln implements (tokenizer.json's pre_tokenizer; GGUF's tokenizer.ggml.pre).
enum class PreTokenizer : uint8_t { kGpt2, kLlama3, kQwen2 };
// The command line's names of those rules ("gpt2", "llama3", "qwen2"); anything else is gpt2's (the CLI checks
// the name before it asks).
inline PreTokenizer pre_tokenizer_named(std::string_view name) {
  return name == "llama3" ? PreTokenizer::kLlama3 : name == "qwen2" ? PreTokenizer::kQwen2 : PreTokenizer::kGpt2;
}
}  // namespace kiln

namespace kiln::pretok {

enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

// Class of a code point (table lookup for the BMP, binary search above it).
CharClass classify(uint32_t cp);

// ASCII classes, the hot path.
extern const uint8_t kAsciiClass[128];

struct Char {
  uint32_t len;  // bytes
  CharClass cls;
};

// Decodes the character at p (p < end). Invalid bytes come back as one-byte "other" characters.
inline Char next_char(const uint8_t* p, const uint8_t* end) {
  uint8_t b = p[0];
  if (b < 0x80) return {1, CharClass(kAsciiClass[b])};
  size_t left = size_t(end - p);
  uint32_t cp;
  uint32_t len;
  if (b >= 0xC2 && b <= 0xDF) {
    if (left < 2 || (p[1] & 0xC0) != 0x80) return {1, kOther};
    cp = (uint32_t(b & 0x1F) << 6) | (p[1] & 0x3F);
    len = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    if (left < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return {1, kOther};
    cp = (uint32_t(b & 0x0F) << 12) | (uint32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) return {1, kOther};  // overlong or surrogate
    len = 3;
  } else if (b >= 0xF0 && b <= 0xF4) {
    if (left < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return {1, kOther};
    cp = (uint32_t(b & 0x07) << 18) | (uint32_t(p[1] & 0x3F) << 12) | (uint32_t(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    if (cp < 0x10000 || cp > 0x10FFFF) return {1, kOther};
    len = 4;
  } else {
    return {1, kOther};  // continuation byte, C0/C1, F5..FF
  }
  return {len, classify(cp)};
}

// Calls emit(begin, end) (byte offsets into text) for each pre-token, in order. The pre-tokens tile the
// text exactly.
template <class Emit>
void pretokenize(std::string_view text, Emit&& emit) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  const uint8_t* end = s + n;
  size_t i = 0;
  while (i < n) {
    const size_t start = i;
    // Contractions: 's 't 're 've 'm 'll 'd (lower case only, as in the regex).
    if (s[i] == '\'' && i + 1 < n) {
      uint8_t a = s[i + 1];
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(start, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        uint8_t b2 = s[i + 2];
        if ((a == 'r' && b2 == 'e') || (a == 'v' && b2 == 'e') || (a == 'l' && b2 == 'l')) {
          emit(start, i + 3);
          i += 3;
          continue;
        }
      }
    }
    Char c = next_char(s + i, end);
    // " ?X+": one leading ASCII space joins a following letter, number or other run.
    if (s[i] == ' ' && i + 1 < n) {
      Char d = next_char(s + i + 1, end);
      if (d.cls != kSpace) {
        i += 1;
        c = d;
      }
    }
    if (c.cls != kSpace) {
      // A maximal run of one class.
      const CharClass cls = c.cls;
      i += c.len;
      while (i < n) {
        if (s[i] < 0x80) {
          if (kAsciiClass[s[i]] != cls) break;
          i += 1;
        } else {
          Char d = next_char(s + i, end);
          if (d.cls != cls) break;
          i += d.len;
        }
      }
      emit(start, i);
      continue;
    }
    // Whitespace: "\s+(?!\S)" takes the run minus its last character when a non-space follows (that
    // character then starts the next pre-token, e.g. " word"); "\s+" takes a lone one.
    size_t last = i;
    i += c.len;
    while (i < n) {
      Char d = next_char(s + i, end);
      if (d.cls != kSpace) break;
      last = i;
      i += d.len;
    }
    if (i < n && last > start) i = last;
    emit(start, i);
  }
}

// Llama 3's pre-tokenization (MaxDigits = 3) and Qwen2's (MaxDigits = 1), written out by hand like
// GPT-2's above, same character classes and invalid-byte rule:
//
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//
// Hand-written rather than a regex library (PCRE2 with UCP was the candidate): no new dependency, the
// classes are exactly GPT-2's (same tables, same invalid-byte rule, which PCRE2's UTF mode would reject),
// and the ASCII fast path is shared. Speed (kiln tokenizer bench, GPT-2's vocabulary, 2.5 MB of
// fortunes, one thread, a shared 2-core machine): GPT-2 97 MB/s, Llama 3 75-88 MB/s, Qwen2 76-86 MB/s.
// PCRE2 was not measured (libpcre2-dev is not installed here). The alternatives are tried in order at each position, as a backtracking engine does; the comments name
// the one each branch implements. (?i) folds case as Hugging Face's Rust regex engines do: 'S, 'LL, and
// also U+017F (long s) for s; the JS peer folds ASCII only.
template <int MaxDigits, class Emit>
void pretokenize_llama3(std::string_view text, Emit&& emit) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  const uint8_t* end = s + n;
  auto run = [&](size_t j, CharClass cls) {  // end of the maximal run of cls starting at j
    while (j < n) {
      if (s[j] < 0x80) {
        if (kAsciiClass[s[j]] != cls) break;
        j += 1;
      } else {
        Char d = next_char(s + j, end);
        if (d.cls != cls) break;
        j += d.len;
      }
    }
    return j;
  };
  size_t i = 0;
  while (i < n) {
    const size_t start = i;
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if (s[i] == '\'' && i + 1 < n) {
      const uint8_t a = s[i + 1] | 0x20;  // only 'A'..'Z' fold onto the letters tested here
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(start, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const uint8_t b2 = s[i + 2] | 0x20;
        if ((a == 'r' && b2 == 'e') || (a == 'v' && b2 == 'e') || (a == 'l' && b2 == 'l') ||
            (s[i + 1] == 0xC5 && s[i + 2] == 0xBF)) {  // 'ſ
          emit(start, i + 3);
          i += 3;
          continue;
        }
      }
    }
    const Char c = next_char(s + i, end);
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (c.cls == kLetter) {
      i = run(i + c.len, kLetter);
      emit(start, i);
      continue;
    }
    if (c.cls != kNumber && s[i] != '\r' && s[i] != '\n' && i + c.len < n &&
        next_char(s + i + c.len, end).cls == kLetter) {
      i = run(i + c.len, kLetter);
      emit(start, i);
      continue;
    }
    // \p{N}{1,3} (Qwen2: \p{N})
    if (c.cls == kNumber) {
      i += c.len;
      for (int k = 1; k < MaxDigits && i < n; k++) {
        Char d = next_char(s + i, end);
        if (d.cls != kNumber) break;
        i += d.len;
      }
      emit(start, i);
      continue;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    size_t j = i;
    if (s[i] == ' ' && i + 1 < n && next_char(s + i + 1, end).cls == kOther) j = i + 1;
    if (j > i || c.cls == kOther) {
      j = run(j, kOther);
      while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
      emit(start, j);
      i = j;
      continue;
    }
    // Whitespace. \s*[\r\n]+ : through the last \r or \n of the run.
    size_t last = i, newline_end = 0;
    j = i;
    while (j < n) {
      Char d = next_char(s + j, end);
      if (d.cls != kSpace) break;
      if (s[j] == '\r' || s[j] == '\n') newline_end = j + 1;
      last = j;
      j += d.len;
    }
    if (newline_end) {
      i = newline_end;
    } else {
      // \s+(?!\S) : the run minus its last character when a non-space follows; \s+ : a lone one.
      i = (j < n && last > start) ? last : j;
    }
    emit(start, i);
  }
}

// Calls emit(begin, end) for each pre-token of text under rule `pre`.
template <class Emit>
void pretokenize(PreTokenizer pre, std::string_view text, Emit&& emit) {
  switch (pre) {
    case PreTokenizer::kGpt2:
      pretokenize(text, emit);
      break;
    case PreTokenizer::kLlama3:
      pretokenize_llama3<3>(text, emit);
      break;
    case PreTokenizer::kQwen2:
      pretokenize_llama3<1>(text, emit);
      break;
  }
}

// True if pre-tokenizing text[0, p) and text[p, n) separately gives the same pre-tokens as the whole:
// p is after a non-space character and either at a ' ' followed by a non-space character, or right
// after a single whitespace character other than ' ' (e.g. "x\n|Y") followed by a non-space one.
bool is_safe_split(std::string_view text, size_t p);

// The first safe split point at or after `from`, or text.size() if there is none.
size_t next_safe_split(std::string_view text, size_t from);

// The same for Llama 3 and Qwen2: only at a ' ' after a non-space character ("x\tY" is one pre-token
// there, so GPT-2's second kind of point is not safe).
bool is_safe_split(PreTokenizer pre, std::string_view text, size_t p);
size_t next_safe_split(PreTokenizer pre, std::string_view text, size_t from);

}  // namespace kiln::pretok
