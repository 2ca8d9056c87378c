// kiln serve with and without speculative decoding, in the same run: a plain server, one with --draft-model and
// (when the target directory given has Medusa heads) one with --medusa and one with --medusa --medusa-tree, all up at once and asked in turn
// (interleaved rounds, so a slow spell of the shared host falls on all alike). Per method and stream count:
// aggregate decode tokens/s (completion tokens / wall time of the batch of requests), median of the rounds, the
// ratio to plain, the acceptance from /metrics, and whether the greedy texts equal plain's.
// usage: node bench/serve_speculative_bench.mjs KILN TARGET_DIR DRAFT_DIR [--medusa-dir DIR] [--threads 1]
//        [--tokens 128] [--streams 1,4] [--repeat 3] [--draft-tokens 4] [--weights-dtype f32]
import { startServer, stopServer } from "../tests/serve/harness.mjs";

const argv = process.argv.slice(2);
const [kiln, target, draft] = argv;
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const threads = opt("--threads", "1"), tokens = Number(opt("--tokens", "128"));
const streams = opt("--streams", "1,4").split(",").map(Number);
const repeat = Number(opt("--repeat", "3")), K = opt("--draft-tokens", "4");
const medusaDir = opt("--medusa-dir", null);
const prompts = ["Once upon a time", "The little dog", "She looked at the sky and", "One day, a boy named Tom",
  "The king said", "In the morning the children"];

const common = ["--threads", threads, "--parallel", "16", "--weights-dtype", opt("--weights-dtype", "f32")];
const methods = [["plain", ["--model", target]], [`draft K=${K}`, ["--model", target, "--draft-model", draft, "--draft-tokens", K]]];
if (medusaDir) methods.push(["medusa chain", ["--model", medusaDir, "--medusa"]],
  ["medusa tree", ["--model", medusaDir, "--medusa", "--medusa-tree", "default"]]);
const servers = [];
for (const [name, args] of methods) servers.push({ name, srv: await startServer(kiln, [...common, ...args]) });

async function complete(url, prompt) {
  const r = await fetch(url + "/v1/completions", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: tokens, temperature: 0 }) });
  const j = await r.json();
  return { text: j.choices[0].text, n: j.usage.completion_tokens };
}
async function run(url, n) {
  const t0 = performance.now();
  const rs = await Promise.all(Array.from({ length: n }, (_, i) => complete(url, prompts[i % prompts.length])));
  const s = (performance.now() - t0) / 1000;
  return { tps: rs.reduce((a, r) => a + r.n, 0) / s, texts: rs.map((r) => r.text) };
}
async function metric(url, name) {
  const m = (await (await fetch(url + "/metrics")).text()).match(new RegExp("^" + name + " (\\d+)", "m"));
  return m ? Number(m[1]) : 0;
}

const results = new Map();  // method -> streams -> [tps]
const texts = new Map();
for (let r = 0; r < repeat; r++)
  for (const n of streams)
    for (const { name, srv } of servers) {
      const x = await run(srv.url, n);
      const key = name + "/" + n;
      if (!results.has(key)) results.set(key, []);
      results.get(key).push(x.tps);
      texts.set(key, x.texts);
    }
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor((a.length - 1) / 2)];
console.log(`kiln serve, greedy, ${tokens} new tokens per request, --threads ${threads}, --weights-dtype ` +
  `${opt("--weights-dtype", "f32")}, median of ${repeat} interleaved rounds`);
console.log("method          streams  tokens/s  x plain  acceptance  text == plain");
for (const { name, srv } of servers) {
  const drafted = await metric(srv.url, "kiln_spec_draft_tokens_total");
  const accepted = await metric(srv.url, "kiln_spec_accepted_tokens_total");
  for (const n of streams) {
    const tps = median(results.get(name + "/" + n)), base = median(results.get("plain/" + n));
    const same = JSON.stringify(texts.get(name + "/" + n)) === JSON.stringify(texts.get("plain/" + n));
    console.log(`${name.padEnd(15)} ${String(n).padStart(7)} ${tps.toFixed(1).padStart(9)} ${(tps / base).toFixed(2).padStart(8)} ` +
      `${(drafted ? (accepted / drafted).toFixed(3) : "-").padStart(11)}  ${same ? "yes" : "NO"}`);
  }
}
for (const { srv } of servers) await stopServer(srv);
