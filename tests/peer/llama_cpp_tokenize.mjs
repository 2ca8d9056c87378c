// llama.cpp as a tokenizer peer (node-llama-cpp 3.21.1 from third_party/npm): loads a .gguf's vocabulary and
// tokenizes texts with it.
//   node llama_cpp_tokenize.mjs MODEL.gguf TEXTS.json
// TEXTS.json is a JSON array of strings. Prints one JSON line:
//   {"special": [[ids], ...], "ordinary": [[ids], ...], "bos": id, "eos": id, "add_bos": bool, "pre": "...",
//    "token_type": [per id], "chat_template": "..."}
// add_bos is llama.cpp's own reading (shouldPrependBosToken); pre and token_type are the file's metadata.
// special: control tokens spelled in the text are matched (llama.cpp's parse_special); ordinary: they are text.
// User-defined tokens are matched in both.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.join(here, "..", "..", "third_party", "npm", "node_modules", "node-llama-cpp", "dist", "index.js");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(pkg).href);

const [modelPath, textsPath] = process.argv.slice(2);
if (!modelPath || !textsPath) throw new Error("usage: llama_cpp_tokenize.mjs MODEL.gguf TEXTS.json");
const texts = JSON.parse(fs.readFileSync(textsPath, "utf8"));
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath, gpuLayers: 0, vocabOnly: true });
const result = {
  special: texts.map((t) => Array.from(model.tokenize(t, true))),
  ordinary: texts.map((t) => Array.from(model.tokenize(t, false))),
  bos: model.tokens.bos,
  eos: model.tokens.eos,
  add_bos: model.tokens.shouldPrependBosToken,
  pre: model.fileInfo.metadata.tokenizer.ggml.pre ?? null,
  token_type: Array.from(model.fileInfo.metadata.tokenizer.ggml.token_type ?? []),
  chat_template: model.fileInfo.metadata.tokenizer.chat_template ?? null,
};
console.log(JSON.stringify(result));
await model.dispose();
process.exit(0);
