// Peer for kiln's tokenizer tests: encodes texts with the gpt-3-encoder npm package (a port of OpenAI's
// encoder.py, installed by scripts/setup.sh into third_party/npm).
// Usage: node tests/peer/gpt2_encode.js <texts.json> [vocab-dir]
//   texts.json: a JSON array of strings. Prints a JSON array with the token ids of each text.
//   vocab-dir:  a directory with another encoder.json + vocab.bpe (e.g. a tokenizer kiln trained); the
//               package's Encoder.js is copied beside them and loads them instead of GPT-2's.
const fs = require('fs');
const path = require('path');
const pkg = path.join(__dirname, '..', '..', 'third_party', 'npm', 'node_modules', 'gpt-3-encoder');
let modulePath = pkg;
if (process.argv[3]) {
  modulePath = path.join(path.resolve(process.argv[3]), 'Encoder.js');
  fs.copyFileSync(path.join(pkg, 'Encoder.js'), modulePath);
}
const { encode } = require(modulePath);
const texts = JSON.parse(fs.readFileSync(process.argv[2], 'utf-8'));
process.stdout.write(JSON.stringify(texts.map(t => encode(t))) + '\n');
