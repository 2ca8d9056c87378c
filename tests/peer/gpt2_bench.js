// Speed of the gpt-3-encoder npm package on a text file, for comparison with `kiln tokenizer bench`.
// The package concatenates arrays per pre-token (quadratic in a text's length), so the file is encoded in
// pieces of about 4 kB cut at line ends, which is the package at its best. Best of --repeat runs.
// Usage: node tests/peer/gpt2_bench.js <file> [repeat]
const fs = require('fs');
const path = require('path');
const { encode } = require(path.join(__dirname, '..', '..', 'third_party', 'npm', 'node_modules', 'gpt-3-encoder'));
const text = fs.readFileSync(process.argv[2], 'utf-8');
const repeat = parseInt(process.argv[3] || '3');
const pieces = [];
for (let pos = 0; pos < text.length;) {
  let cut = text.indexOf('\n', Math.min(text.length, pos + 4096));
  cut = cut < 0 ? text.length : cut + 1;
  pieces.push(text.slice(pos, cut));
  pos = cut;
}
let best = Infinity, tokens = 0;
for (let r = 0; r < repeat; r++) {
  const t0 = process.hrtime.bigint();
  tokens = 0;
  for (const p of pieces) tokens += encode(p).length;
  best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
}
const bytes = Buffer.byteLength(text, 'utf-8');
console.log(JSON.stringify({ peer: 'gpt-3-encoder', bytes, tokens, mb_s: bytes / 1e6 / best }));
