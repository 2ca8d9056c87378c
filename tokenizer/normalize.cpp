#include "tokenizer/normalize.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tokenizer/nfc_tables.h"

namespace kiln {

namespace {

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;
constexpr uint32_t kInvalid = 0xFFFFFFFF;  // stands for a byte that is not UTF-8; kept in `raw`

// One decoded unit: a code point, or (cp == kInvalid) a raw byte.
struct Unit {
  uint32_t cp;
  uint8_t raw;
};

// Decodes one UTF-8 sequence at s[i]; returns its length, 0 if it is not valid UTF-8 (overlong, surrogate,
// out of range or truncated).
size_t decode(std::string_view s, size_t i, uint32_t* cp) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[i + k]); };
  const uint8_t c = b(0);
  if (c < 0x80) return *cp = c, 1;
  size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
  if (n == 0 || c >= 0xF8 || i + n > s.size()) return 0;
  uint32_t v = c & (0x7F >> n);
  for (size_t k = 1; k < n; k++) {
    if ((b(k) & 0xC0) != 0x80) return 0;
    v = (v << 6) | (b(k) & 0x3F);
  }
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (v < kMin[n] || v > 0x10FFFF || (v >= 0xD800 && v < 0xE000)) return 0;
  return *cp = v, n;
}

void encode(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

bool maybe_changes(uint32_t cp) {
  const auto& t = nfc_tables::kMaybeChanges;
  auto it = std::upper_bound(std::begin(t), std::end(t), cp, [](uint32_t c, const nfc_tables::Range& r) { return c < r.lo; });
  return it != std::begin(t) && cp <= (it - 1)->hi;
}

int combining_class(uint32_t cp) {
  if (cp == kInvalid) return 0;
  const auto& t = nfc_tables::kCombiningClass;
  auto it = std::upper_bound(std::begin(t), std::end(t), cp, [](uint32_t c, const nfc_tables::Ccc& r) { return c < r.lo; });
  return it != std::begin(t) && cp <= (it - 1)->hi ? (it - 1)->ccc : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {  // Hangul syllable: L V (T)
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto& t = nfc_tables::kDecomp;
  auto it = std::lower_bound(std::begin(t), std::end(t), cp, [](const nfc_tables::Decomp& d, uint32_t c) { return d.cp < c; });
  if (it != std::end(t) && it->cp == cp) {
    out.insert(out.end(), nfc_tables::kDecompPool + it->offset, nfc_tables::kDecompPool + it->offset + it->len);
  } else {
    out.push_back(cp);
  }
}

uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& t = nfc_tables::kCompose;
  auto it = std::lower_bound(std::begin(t), std::end(t), std::pair(a, b), [](const nfc_tables::Pair& p, std::pair<uint32_t, uint32_t> k) {
    return p.first != k.first ? p.first < k.first : p.second < k.second;
  });
  return it != std::end(t) && it->first == a && it->second == b ? it->composite : kInvalid;
}

// NFC of one run of valid code points.
void normalize_run(std::vector<uint32_t>& cps, std::string& out) {
  std::vector<uint32_t> d;
  d.reserve(cps.size() + 8);
  for (uint32_t cp : cps) decompose(cp, d);
  // Canonical ordering: a stable sort of each run of non-starters by combining class.
  for (size_t i = 0; i < d.size();) {
    if (combining_class(d[i]) == 0) {
      i++;
      continue;
    }
    size_t j = i;
    while (j < d.size() && combining_class(d[j]) != 0) j++;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [](uint32_t a, uint32_t b) { return combining_class(a) < combining_class(b); });
    i = j;
  }
  // Canonical composition: each character joins the last starter unless a character between them blocks it
  // (has a class of 0 or one not lower than its own).
  size_t starter = SIZE_MAX, n = 0;
  int last_class = -1;
  for (size_t i = 0; i < d.size(); i++) {
    const uint32_t c = d[i];
    const int cc = combining_class(c);
    if (starter != SIZE_MAX && (last_class < cc || (last_class == 0 && n == starter + 1))) {
      const uint32_t k = compose(d[starter], c);
      if (k != kInvalid) {
        d[starter] = k;
        continue;
      }
    }
    if (cc == 0) starter = n;
    last_class = cc;
    d[n++] = c;
  }
  for (size_t i = 0; i < n; i++) encode(d[i], out);
}

}  // namespace

bool nfc_is_identity(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      i++;
      continue;
    }
    uint32_t cp;
    const size_t n = decode(text, i, &cp);
    if (n == 0) {
      i++;
      continue;
    }
    if (maybe_changes(cp)) return false;
    i += n;
  }
  return true;
}

std::string nfc(std::string_view text) {
  if (nfc_is_identity(text)) return std::string(text);
  std::string out;
  out.reserve(text.size() + 16);
  std::vector<uint32_t> run;
  for (size_t i = 0; i < text.size();) {
    uint32_t cp;
    const size_t n = decode(text, i, &cp);
    if (n == 0) {  // a byte that is not UTF-8 ends the run and is kept as it is
      normalize_run(run, out);
      run.clear();
      out += text[i++];
      continue;
    }
    run.push_back(cp);
    i += n;
  }
  normalize_run(run, out);
  return out;
}

}  // namespace kiln
