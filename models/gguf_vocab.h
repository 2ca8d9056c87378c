// A kiln Tokenizer as GGUF's tokenizer.ggml.* data (llama.cpp's "gpt2" byte-level BPE): the token spellings,
// the merges in rank order, the token types, bos/eos, whether bos is added, the pre-tokenizer and chat template.
#pragma once
#include <string>

#include "models/gguf_export.h"
#include "tokenizer/bpe.h"

namespace kiln {

// vocab_size: the model's. A GGUF vocabulary must have exactly that many tokens, so ids past the tokenizer's
// (a padded embedding) become "[PAD<id>]" tokens of type unused (5), as llama.cpp's own converter writes them.
// Types: 3 (control) for special added tokens, 4 (user-defined) for the others, 1 for the rest. bos is the
// tokenizer's bos, else its end-of-text token (GPT-2 uses one token for both; llama.cpp's default bos id would
// be an arbitrary token); add_bos_token says whether the tokenizer puts bos before a text. Throws naming
// `where` when the tokenizer has more tokens than the model's vocabulary.
GgufTokenizer gguf_tokenizer(const Tokenizer& tok, int vocab_size, const std::string& where);

}  // namespace kiln
