// kiln serve under 1, 4 and 16 concurrent streams, beside llama.cpp (node-llama-cpp, several sequences of one
// context) on the same weights (GPT-2 124M with random weights, exported to GGUF by `kiln export`), both on the
// CPU with the same threads. Per run: aggregate decode tokens/s, p50 / p99 inter-token latency and the median
// time to first token, and the ratio kiln / llama.cpp. Greedy, the same prompt ids, --tokens new tokens each.
// usage: node bench/serve_bench.mjs KILN WORK_DIR [--threads 2] [--tokens 64] [--streams 1,4,16] [--repeat 1]
//        [--config bench/gpt2-124m.json] [--no-peer | --peer-only]
// With --repeat R, every stream count runs once per round, R rounds (interleaved, so that a slow spell of the
// shared host falls on all of them alike); each line is the run of median tokens/s at that stream count, with
// all R figures, and the 16-vs-1 line is the median of the R rounds' own ratios.
import fs from "node:fs";
import path from "node:path";
import { spawnSync } from "node:child_process";
import { fileURLToPath, pathToFileURL } from "node:url";
import { makeModel, startServer, stopServer, npm } from "../tests/serve/harness.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const [kiln, work] = argv;
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const threads = Number(opt("--threads", "2")), tokens = Number(opt("--tokens", "64"));
const streams = opt("--streams", "1,4,16").split(",").map(Number);
const configPath = opt("--config", path.join(here, "gpt2-124m.json"));
const repeat = Math.max(1, Number(opt("--repeat", "1")));
// Runs `run(n)` for every stream count, `repeat` rounds; returns the median-tokens/s summary per stream count
// (all rounds' tokens/s in `all`, in round order).
async function rounds(run) {
  const by = new Map(streams.map((n) => [n, []]));
  for (let i = 0; i < repeat; i++)
    for (const n of streams) by.get(n).push(await run(n));
  return streams.map((n) => {
    const rs = by.get(n), sorted = [...rs].sort((a, b) => a.tps - b.tps);
    return { ...sorted[Math.floor((sorted.length - 1) / 2)], all: rs.map((r) => r.tps) };
  });
}
const peer = !argv.includes("--no-peer"), ours = !argv.includes("--peer-only");
fs.mkdirSync(work, { recursive: true });

const cfg = { model_type: "gpt2", ...JSON.parse(fs.readFileSync(configPath, "utf8")) };
const cfgFile = path.join(work, "config.json");
fs.writeFileSync(cfgFile, JSON.stringify(cfg));
const modelDir = path.join(work, "model");
if (!fs.existsSync(path.join(modelDir, "model.safetensors"))) {
  const r = spawnSync("/usr/bin/python3", [path.join(here, "..", "tests", "serve", "make_model.py"), modelDir, npm, cfgFile], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(r.stderr);
}
const prompt = Array.from({ length: 32 }, (_, i) => 464 + 37 * i);  // the same ids for every stream and both servers

const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : NaN; };
const median = (xs) => pct(xs, 0.5);
function summary(name, n, t0, t1, perStream) {
  const total = perStream.reduce((a, s) => a + s.tokens, 0);
  const itl = perStream.flatMap((s) => s.gaps);
  return { name, streams: n, tokens: total, seconds: (t1 - t0) / 1000, tps: total / ((t1 - t0) / 1000),
           itl_p50_ms: median(itl), itl_p99_ms: pct(itl, 0.99), ttft_ms: median(perStream.map((s) => s.ttft)) };
}

// ---- kiln serve: SSE streams, one chunk per token (no stop strings, so nothing is held back but UTF-8) ----
async function kilnRun(url, n) {
  const one = async () => {
    const t0 = performance.now();
    const res = await fetch(url + "/v1/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt, max_tokens: tokens, temperature: 0, stream: true, stream_options: { include_usage: true } }) });
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = "", last = 0, ttft = 0, count = 0;
    const gaps = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let k;
      while ((k = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(6, k);
        buf = buf.slice(k + 2);
        if (ev === "[DONE]") continue;
        const j = JSON.parse(ev);
        if (j.usage) count = j.usage.completion_tokens;
        if (!j.choices.length || !j.choices[0].text) continue;
        const now = performance.now();
        if (!ttft) ttft = now - t0; else gaps.push(now - last);
        last = now;
      }
    }
    return { tokens: count, ttft, gaps };
  };
  const t0 = performance.now();
  const r = await Promise.all(Array.from({ length: n }, one));
  return summary("kiln", n, t0, performance.now(), r);
}

const results = [];
const fmt = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : "-");
const show = (r) => {
  results.push(r);
  console.log(`${r.name.padEnd(11)} ${String(r.streams).padStart(7)}  ${fmt(r.tps).padStart(8)}  ${fmt(r.itl_p50_ms).padStart(10)}  ${fmt(r.itl_p99_ms).padStart(10)}  ${fmt(r.ttft_ms).padStart(7)}` +
              (r.all && r.all.length > 1 ? `   (runs: ${r.all.map((t) => fmt(t)).join(", ")})` : ""));
};
console.log(`GPT-2 124M (random weights), CPU, ${threads} threads, ${tokens} new tokens per stream, prompt ${prompt.length} tokens`);
console.log("server      streams  tokens/s   ITL p50 ms  ITL p99 ms  TTFT ms");
if (ours) {
  const srv = await startServer(kiln, ["--model", modelDir, "--threads", String(threads), "--parallel", "16", "--ctx", "512"]);
  await kilnRun(srv.url, 1);  // warm up
  for (const r of await rounds((n) => kilnRun(srv.url, n))) show(r);
  await stopServer(srv);
}

// ---- llama.cpp: one context with 16 sequences, evaluated concurrently (node-llama-cpp batches them) ----
if (peer) {
  const gguf = path.join(work, "model-f32.gguf");
  if (!fs.existsSync(gguf)) {
    const r = spawnSync(kiln, ["export", "--model", modelDir, "--format", "gguf", "--out", gguf, "--dtype", "f32"], { encoding: "utf8" });
    if (r.status !== 0) throw new Error(r.stderr);
  }
  const { getLlama, LlamaLogLevel } = await import(pathToFileURL(path.join(npm, "node-llama-cpp", "dist", "index.js")).href);
  const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
  const model = await llama.loadModel({ modelPath: gguf, gpuLayers: 0 });
  const context = await model.createContext({ contextSize: 512 * 16, sequences: 16, threads, batchSize: 512,
    flashAttention: false });
  const seqs = Array.from({ length: 16 }, () => context.getSequence());
  const peerRun = async (n) => {
    const one = async (seq) => {
      await seq.clearHistory();
      const t0 = performance.now();
      let last = 0, ttft = 0, count = 0;
      const gaps = [];
      for await (const _ of seq.evaluate(prompt, { temperature: 0, yieldEogToken: true })) {
        const now = performance.now();
        if (!ttft) ttft = now - t0; else gaps.push(now - last);
        last = now;
        if (++count >= tokens) break;
      }
      return { tokens: count, ttft, gaps };
    };
    const t0 = performance.now();
    const r = await Promise.all(seqs.slice(0, n).map(one));
    return summary("llama.cpp", n, t0, performance.now(), r);
  };
  await peerRun(1);  // warm up
  for (const r of await rounds((n) => peerRun(n))) show(r);
  await context.dispose();
  await model.dispose();
}

for (const r of results) {
  const p = results.find((x) => x.name === "llama.cpp" && x.streams === r.streams);
  if (r.name === "kiln" && p) console.log(`${r.streams} streams: kiln / llama.cpp tokens/s = ${fmt(r.tps / p.tps, 2)}`);
}
const k1 = results.find((r) => r.name === "kiln" && r.streams === 1), k16 = results.find((r) => r.name === "kiln" && r.streams === 16);
if (k1 && k16) {
  const ratios = k16.all.map((t, i) => t / k1.all[i]).sort((a, b) => a - b);
  const med = ratios[Math.floor((ratios.length - 1) / 2)];
  console.log(`kiln: 16 streams give ${fmt(med, 2)}x the tokens/s of one` +
              (ratios.length > 1 ? ` (median of ${ratios.length} rounds: ${ratios.map((x) => fmt(x, 2)).join(", ")})` : ""));
}
process.exit(0);
