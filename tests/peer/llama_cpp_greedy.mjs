// llama.cpp as a peer (node-llama-cpp 3.21.1 from third_party/npm, scripts/setup.sh): loads a .gguf on the CPU
// and continues the given prompt token ids greedily.
//   node llama_cpp_greedy.mjs MODEL.gguf --prompt 1,2,3 --k 8 [--logprobs] [--threads N]
// Prints {"tokens": [...]} and, with --logprobs, "last_logprobs": log-softmax of the logits at the last prompt
// position (llama.cpp's API gives probabilities, so logits only up to a constant).
// F32 KV cache and flash attention off: with the defaults a greedy choice whose top two logits are a few 1e-4
// apart can flip (see /work/shared/notes/llama-cpp-gguf.md).
// One thread unless --threads says otherwise (0: llama.cpp's default): its default threads spin while they wait,
// and on a busy 2-core machine 16 tokens of a tiny model then took 21 s instead of 25 ms.
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.join(here, "..", "..", "third_party", "npm", "node_modules", "node-llama-cpp", "dist", "index.js");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(pkg).href);

function parseArgs(argv) {
  const a = { model: null, prompt: [], k: 8, logprobs: false, ctx: 0, threads: 1 };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i];
    if (v === "--prompt") a.prompt = argv[++i].split(",").filter((s) => s.length).map(Number);
    else if (v === "--k") a.k = Number(argv[++i]);
    else if (v === "--ctx") a.ctx = Number(argv[++i]);
    else if (v === "--threads") a.threads = Number(argv[++i]);
    else if (v === "--logprobs") a.logprobs = true;
    else if (!a.model) a.model = v;
    else throw new Error(`unexpected argument ${v}`);
  }
  if (!a.model || a.prompt.length === 0 || a.prompt.some((t) => !Number.isInteger(t)))
    throw new Error("usage: llama_cpp_greedy.mjs MODEL.gguf --prompt ID,ID,... [--k N] [--logprobs] [--ctx N] [--threads N]");
  return a;
}

const args = parseArgs(process.argv.slice(2));
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: args.model, gpuLayers: 0 });
const contextSize = args.ctx || Math.min(model.trainContextSize, args.prompt.length + args.k + 8);
const context = await model.createContext({
  contextSize,
  threads: args.threads || undefined,
  flashAttention: false,
  experimentalKvCacheKeyType: "F32",
  experimentalKvCacheValueType: "F32",
});
const result = { tokens: [] };
const sequence = context.getSequence();
if (args.logprobs) {
  const items = args.prompt.slice(0, -1);
  items.push([args.prompt.at(-1), { generateNext: { probabilities: true } }]);
  const out = await sequence.controlledEvaluate(items, { temperature: 0 });
  const probs = out.at(-1).next.probabilities;
  const lp = new Array(model.tokens.vocabSize ?? probs.size).fill(null);
  for (const [tok, p] of probs) lp[tok] = Math.log(p);
  result.last_logprobs = lp;
  await sequence.clearHistory();
}
for await (const token of sequence.evaluate(args.prompt, { temperature: 0, yieldEogToken: true })) {
  result.tokens.push(token);
  if (result.tokens.length >= args.k) break;
}
console.log(JSON.stringify(result));
await context.dispose();
await model.dispose();
process.exit(0);
