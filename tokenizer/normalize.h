// Unicode normalization form C (tokenizer.json's "NFC" normalizer, which Qwen2's tokenizer applies before
// pre-tokenization): canonical decomposition, canonical ordering of combining marks, canonical composition,
// from the tables in nfc_tables.h (generated from Python's unicodedata) plus Hangul's algorithmic syllables.
// Text made only of code points that NFC never touches (ASCII, most of every script) is returned as it is after
// one scan. Bytes that are not valid UTF-8 pass through unchanged and break a run of combining marks.
#pragma once
#include <string>
#include <string_view>

namespace kiln {

// True when nfc(text) == text is guaranteed without normalizing (the quick check).
bool nfc_is_identity(std::string_view text);
std::string nfc(std::string_view text);

}  // namespace kiln
