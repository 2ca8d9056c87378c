// Peer for kiln's tokenizer.json files: encodes texts with @huggingface/tokenizers (Hugging Face's pure
// JS implementation of the `tokenizers` library, installed by scripts/setup.sh into third_party/npm).
// Usage: node tests/peer/hf_encode.js <tokenizer.json> <texts.json> [plain]
// Prints a JSON array with the token ids of each text (added tokens such as <|endoftext|> are special).
// With "plain", the post_processor adds nothing (add_special_tokens: false; no bos from a template).
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require(path.join(__dirname, '..', '..', 'third_party', 'npm', 'node_modules', '@huggingface',
                                        'tokenizers'));
const tokenizer = new Tokenizer(JSON.parse(fs.readFileSync(process.argv[2], 'utf-8')), {});
const texts = JSON.parse(fs.readFileSync(process.argv[3], 'utf-8'));
process.stdout.write(JSON.stringify(texts.map(t => tokenizer.encode(t, { add_special_tokens: process.argv[4] !== 'plain' }).ids)) + '\n');
