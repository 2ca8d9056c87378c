// llama.cpp's batch-1 decoding speed (node-llama-cpp from third_party/npm, as tests/peer/llama_cpp_greedy.mjs
// drives it: CPU, F32 KV cache, flash attention off): loads a .gguf, evaluates the prompt, then times each
// generated token (greedy) as the JS iterator hands it over, so the figure includes node-llama-cpp's own
// per-token overhead (measure that with a tiny model). Prints {"tokens_per_s": median over tokens, "n"}.
//   node bench/llama_cpp_decode.mjs MODEL.gguf --prompt 1,2,3 --new 64 [--threads 2]
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.join(here, "..", "third_party", "npm", "node_modules", "node-llama-cpp", "dist", "index.js");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(pkg).href);

const a = { model: null, prompt: [], n: 64, threads: 2 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--prompt") a.prompt = argv[++i].split(",").map(Number);
  else if (argv[i] === "--new") a.n = Number(argv[++i]);
  else if (argv[i] === "--threads") a.threads = Number(argv[++i]);
  else a.model = argv[i];
}
if (!a.model || !a.prompt.length) throw new Error("usage: llama_cpp_decode.mjs MODEL.gguf --prompt IDS [--new N] [--threads T]");
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: a.model, gpuLayers: 0 });
const context = await model.createContext({
  contextSize: Math.min(model.trainContextSize, a.prompt.length + a.n + 8),
  threads: a.threads,
  flashAttention: false,
  experimentalKvCacheKeyType: "F32",
  experimentalKvCacheValueType: "F32",
});
const seq = context.getSequence();
const gaps = [];
let t = 0, count = 0;
for await (const _tok of seq.evaluate(a.prompt, { temperature: 0, yieldEogToken: true })) {
  const now = performance.now();
  if (count > 0) gaps.push(now - t);  // the first token comes with the prompt
  t = now;
  if (++count >= a.n) break;
}
gaps.sort((x, y) => x - y);
const med = gaps[Math.floor(gaps.length / 2)];
console.log(JSON.stringify({ tokens_per_s: 1000 / med, ms_per_token: med, n: gaps.length }));
await context.dispose();
await model.dispose();
process.exit(0);
