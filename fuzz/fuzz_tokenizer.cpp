// tokenizer.json (+ tokenizer_config.json), then encoding and decoding with what was loaded. The input is
//   tokenizer.json text \0 tokenizer_config.json text \0 a text to encode
// (parts may be missing). An accepted tokenizer must encode the fixed texts below and the input's text to ids
// inside the vocabulary that decode back to the text (bpe.h: decode(encode(x)) == x; added tokens with
// lstrip/rstrip swallow whitespace, so those are only checked for valid ids), and its tokenizer.json as written
// by to_hf_json must load again and encode the same way.
#include <vector>

#include "fuzz/fuzz_util.h"
#include "tokenizer/bpe.h"
#include "tokenizer/normalize.h"
#include "tokenizer/tokenizer_config.h"

using namespace kiln;

namespace {

const char* const kTexts[] = {
    "Hello, world! It's 2024.", " the  quick\n\nbrown fox\r\n\tjumps", "<|endoftext|>x<|endoftext|>",
    "\xff\xfe\x80 invalid UTF-8 \xc3", "1234567 \xd9\xa1\xd9\xa2 x1y", "\xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98\x80!!",
    "", "   ", "a", "Cafe\xcc\x81 \xe1\x84\x80\xe1\x85\xa1 a\xcc\xa3\xcc\x82 \xe2\x84\xab",
};

void check_encodings(const Tokenizer& t, const std::string& text, const std::string& what) {
  bool strips = false;
  for (const SpecialToken& s : t.specials()) strips |= s.lstrip || s.rstrip;
  for (bool allow_special : {false, true}) {
    const std::vector<uint32_t> ids = t.encode(text, allow_special, 1);
    for (uint32_t id : ids) FUZZ_CHECK(id < uint32_t(t.vocab_size()), what, ": id ", id, " outside the vocabulary");
    const std::string back = t.decode(ids);
    // An NFC tokenizer gives back the normalized text: exact where NFC changes nothing, else a fixed point.
    if (!strips && (!t.normalizes_nfc() || nfc_is_identity(text)))
      FUZZ_CHECK(back == text, what, ": decode(encode(text)) differs (allow_special ", allow_special, ")");
    if (!strips && t.normalizes_nfc())
      FUZZ_CHECK(t.decode(t.encode(back, allow_special, 1)) == back, what, ": NFC round trip is not a fixed point");
    std::vector<uint32_t> appended;
    t.encode_append(text, appended, allow_special);
    FUZZ_CHECK(appended == ids, what, ": encode_append differs from encode");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> parts = fuzz::split_parts(data, size, 3);
  const std::string name = "tokenizer.json", cfg_name = "tokenizer_config.json";
  Tokenizer t;
  if (!fuzz::accepts([&] { t = Tokenizer::parse_hf_json(parts[0], name); }, name)) return 0;
  if (!parts[1].empty() &&
      !fuzz::accepts([&] { t.set_config(TokenizerConfig::parse(parts[1], cfg_name), cfg_name); }, cfg_name))
    return 0;
  fuzz::accepts(
      [&] {
        for (const char* s : kTexts) check_encodings(t, s, "fixed text");
        check_encodings(t, parts[2], "input text");
        for (uint32_t id : t.prefix_ids()) FUZZ_CHECK(id < uint32_t(t.vocab_size()), "prefix id ", id);
        for (uint32_t id : t.suffix_ids()) FUZZ_CHECK(id < uint32_t(t.vocab_size()), "suffix id ", id);
        if (t.bos_id()) FUZZ_CHECK(*t.bos_id() < uint32_t(t.vocab_size()), "bos id");
        if (t.eot_id()) FUZZ_CHECK(*t.eot_id() < uint32_t(t.vocab_size()), "eot id");
        for (uint32_t id = 0; id < uint32_t(t.vocab_size()); id++) {
          FUZZ_CHECK(t.decode_token(id) == t.decode(&id, 1), "decode_token ", id);
          (void)t.token_type(id);
        }
      },
      "");
  // Out-of-range ids are refused.
  const uint32_t bad = uint32_t(t.vocab_size());
  FUZZ_CHECK(!fuzz::accepts([&] { t.decode(&bad, 1); }, ""), "decoded id ", bad);
  // What saving writes loads again and encodes the same way (saving may refuse a vocabulary it cannot spell).
  std::string written;
  if (!fuzz::accepts([&] { written = t.to_hf_json(); }, "")) return 0;
  Tokenizer again;
  FUZZ_CHECK(fuzz::accepts([&] { again = Tokenizer::parse_hf_json(written, "written " + name); }, "written " + name),
             "the tokenizer.json kiln wrote does not load");
  FUZZ_CHECK(again.vocab_size() == t.vocab_size(), "vocabulary size changed on a round trip");
  FUZZ_CHECK(again.pre_tokenizer() == t.pre_tokenizer(), "pre-tokenizer changed on a round trip");
  for (const char* s : kTexts)
    FUZZ_CHECK(again.encode(s, true, 1) == t.encode(s, true, 1), "round trip encodes differently: ", s);
  FUZZ_CHECK(again.encode(parts[2], true, 1) == t.encode(parts[2], true, 1), "round trip encodes the input differently");
  return 0;
}
