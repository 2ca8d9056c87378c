// kiln serve --draft-model (speculative decoding inside continuous batching, serve/engine.h): greedy text equals
// the plain server's, streaming and not, for one client and for several at once, with a draft that agrees with
// the target (the target itself: nearly every proposal passes, bonus tokens and the draft's lag) and with one
// that does not (another random model: nearly every proposal fails, rollbacks); stop strings that fall inside an
// accepted run cut the text where the plain server cuts it; /metrics counts proposals and acceptances;
// /v1/models and the startup line name the drafting; bad combinations are one-line errors at startup. The same
// for --medusa (a chain of the heads' top-1 guesses, tests/serve/make_medusa.py's heads) and --medusa-tree
// (greedy requests check the default candidate tree with tree attention; sampled ones keep the chain), and for
// MTP self-drafting (a deepseek_v3-style model's own modules, the default for such a model), and for
// --prompt-lookup (n-gram proposals from each request's own tokens). With KILN_EMU (kiln on the SIMT emulator),
// --device cuda: MTP self-drafting (latent attention through the paged cache) and Medusa trees give the plain
// device server's greedy text.
// usage: node speculative.mjs KILN WORK_DIR [KILN_EMU]
import fs from "node:fs";
import path from "node:path";
import { spawnSync } from "node:child_process";
import { check, failed, here, makeModel, npm, startServer, stopServer, sseEvents } from "./harness.mjs";

const [kiln, work, kilnEmu] = process.argv.slice(2);
fs.mkdirSync(work, { recursive: true });
const target = makeModel(path.join(work, "target"));
// A smaller random draft with the target's vocabulary, and one with another vocabulary (refused).
const cfg = (o) => { const f = path.join(work, o.name + ".json"); fs.writeFileSync(f, JSON.stringify(o.cfg)); return f; };
const gpt2cfg = (extra) => ({ model_type: "gpt2", n_layer: 1, n_head: 2, n_embd: 32, vocab_size: 50257,
  n_positions: 256, layer_norm_epsilon: 1e-5, ...extra });
const otherDraft = path.join(work, "draft");
{
  const r = spawnSync("/usr/bin/python3", [path.join(here, "make_model.py"), otherDraft, npm,
    cfg({ name: "draft_cfg", cfg: gpt2cfg({}) })], { encoding: "utf8" });
  if (r.status !== 0) throw new Error("make_model.py (draft) failed: " + r.stderr);
}
// The target with 3 Medusa heads (tests/serve/make_medusa.py).
const withHeads = path.join(work, "target_medusa");
{
  const r = spawnSync("/usr/bin/python3", [path.join(here, "make_medusa.py"), target, withHeads, "3"], { encoding: "utf8" });
  if (r.status !== 0) throw new Error("make_medusa.py failed: " + r.stderr);
}
const prompts = ["The meaning of life is", "Once upon a time", "In 1492, Columbus", "def fibonacci(n):"];
const MAX = 24;

async function complete(url, prompt, extra = {}) {
  const r = await fetch(url + "/v1/completions", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: MAX, temperature: 0, ...extra }) });
  const j = await r.json();
  if (!j.choices) throw new Error("completion failed: " + JSON.stringify(j));
  return { text: j.choices[0].text, finish: j.choices[0].finish_reason, tokens: j.usage.completion_tokens };
}
async function stream(url, prompt, extra = {}) {
  const r = await fetch(url + "/v1/completions", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: MAX, temperature: 0, stream: true, ...extra }) });
  let text = "", finish = null;
  for (const e of await sseEvents(r)) {
    if (e === "[DONE]") break;
    const c = JSON.parse(e);
    if (c.choices?.length) { text += c.choices[0].text ?? ""; finish = c.choices[0].finish_reason ?? finish; }
  }
  return { text, finish };
}
async function metric(url, name) {
  const m = (await (await fetch(url + "/metrics")).text()).match(new RegExp("^" + name + " (\\d+)", "m"));
  return m ? Number(m[1]) : NaN;
}

// ---- the plain server's greedy texts, and where a stop string inside them cuts ------------------------------
const plain = await startServer(kiln, ["--model", target, "--threads", "2", "--parallel", "8"]);
const ref = [];
const tPlain = performance.now();
for (const p of prompts) ref.push(await complete(plain.url, p));
const plainTps = prompts.length * MAX / ((performance.now() - tPlain) / 1000);  // one client, for the log
// A stop string from the middle of each text (past the first tokens, so it falls inside a drafted run).
const stops = ref.map((r) => r.text.slice(Math.floor(r.text.length / 2), Math.floor(r.text.length / 2) + 3));
const refStop = [];
for (let i = 0; i < prompts.length; i++) refStop.push(await complete(plain.url, prompts[i], { stop: [stops[i]] }));
const refShort = await complete(plain.url, prompts[0], { max_tokens: 7 });
check(ref.every((r) => r.finish === "length" && r.tokens === MAX), "plain: every reference ran to max_tokens");
check(refStop.every((r) => r.finish === "stop"), "plain: the stop strings stop the references");
check(/speculative decoding: none/.test(plain.stderr()), "plain: the startup line says no drafting");
await stopServer(plain);

for (const [label, draft, k, tree] of [["self-draft", target, 4], ["random draft", otherDraft, 3], ["medusa", null, 3],
  ["medusa tree", null, 3, true], ["prompt lookup", "lookup", 5]]) {
  const medusa = draft === null, lookup = draft === "lookup";
  const srv = await startServer(kiln, medusa
    ? ["--model", withHeads, "--model-name", "target", "--threads", "2", "--parallel", "8", "--medusa",
       ...(tree ? ["--medusa-tree", "default"] : [])]
    : lookup ? ["--model", target, "--threads", "2", "--parallel", "8", "--prompt-lookup", "--draft-tokens", String(k)]
    : ["--model", target, "--threads", "2", "--parallel", "8", "--draft-model", draft, "--draft-tokens", String(k)]);
  check(new RegExp(medusa ? `speculative decoding: Medusa heads, a chain of ${k} top-1 guesses` +
    (tree ? ".*greedy requests: a tree of 15 nodes" : "")
    : lookup ? `speculative decoding: prompt lookup, up to ${k} tokens a round from n-grams of 1 to 3`
    : `speculative decoding: draft model .*, ${k} tokens a round`).test(srv.stderr()),
    `${label}: the startup line names the drafting`);
  const models = await (await fetch(srv.url + "/v1/models")).json();
  const method = tree ? "medusa_tree" : medusa ? "medusa_chain" : lookup ? "prompt_lookup" : "draft_model";
  check(models.data[0].speculative?.method === method && models.data[0].speculative?.draft_tokens === k,
    `${label}: /v1/models says speculative ${method}, ${k} tokens`);
  // One client at a time, not streaming and streaming.
  let same = true, sameStream = true, oneClient = 0;
  for (let i = 0; i < prompts.length; i++) {
    const t0 = performance.now();
    const a = await complete(srv.url, prompts[i]);
    oneClient += performance.now() - t0;
    same &&= a.text === ref[i].text && a.finish === "length" && a.tokens === MAX;
    const s = await stream(srv.url, prompts[i]);
    sameStream &&= s.text === ref[i].text && s.finish === "length";
  }
  check(same, `${label}: greedy text == the plain server's (one client)`);
  check(sameStream, `${label}: streamed greedy text == the plain server's (one client)`);
  // Several clients at once (their rounds batched), streaming and not mixed.
  const together = await Promise.all(prompts.map((p, i) => (i % 2 ? stream(srv.url, p) : complete(srv.url, p))));
  check(together.every((r, i) => r.text === ref[i].text), `${label}: ${prompts.length} concurrent clients each get the plain text`);
  // Stop strings inside accepted runs, and a short max_tokens.
  const st = await Promise.all(prompts.map((p, i) => stream(srv.url, p, { stop: [stops[i]] })));
  check(st.every((r, i) => r.text === refStop[i].text && r.finish === "stop"),
    `${label}: stop strings cut where the plain server cuts (streaming, concurrent)`);
  const short = await complete(srv.url, prompts[0], { max_tokens: 7 });
  check(short.text === refShort.text && short.tokens === 7 && short.finish === "length",
    `${label}: max_tokens 7 gives the plain server's 7 tokens`);
  // Seeded sampling runs through the acceptance rule and is reproducible alone.
  const s1 = await complete(srv.url, prompts[1], { temperature: 0.9, seed: 42 });
  const s2 = await complete(srv.url, prompts[1], { temperature: 0.9, seed: 42 });
  check(s1.text === s2.text && s1.tokens === MAX, `${label}: a seeded sample repeats with its seed`);
  const drafted = await metric(srv.url, "kiln_spec_draft_tokens_total");
  const accepted = await metric(srv.url, "kiln_spec_accepted_tokens_total");
  const rounds = await metric(srv.url, "kiln_spec_rounds_total");
  console.log(`# ${label}: ${rounds} rounds, ${drafted} drafted, ${accepted} accepted; one client ` +
    `${(prompts.length * MAX / (oneClient / 1000)).toFixed(1)} tokens/s (plain ${plainTps.toFixed(1)})`);
  check(drafted > 0 && rounds > 0 && accepted >= 0 && accepted <= drafted, `${label}: /metrics counts rounds and proposals`);
  if (draft === target) check(accepted >= 0.9 * drafted, `${label}: the target drafting for itself passes >= 90% of proposals`);
  else if (!medusa && !lookup) check(accepted < 0.5 * drafted, `${label}: a random draft mostly fails (rollbacks exercised)`);
  await stopServer(srv);
}

// ---- MTP self-drafting: a deepseek_v3-style model with two MTP modules (random weights, GPT-2's tokenizer) ---
const mtpCfg = path.join(work, "deepseek_mtp.json");
fs.writeFileSync(mtpCfg, JSON.stringify({ model_type: "deepseek_v3", hidden_size: 64, num_attention_heads: 2,
  num_hidden_layers: 2, intermediate_size: 96, vocab_size: 50257, max_position_embeddings: 256, rms_norm_eps: 1e-6,
  q_lora_rank: 32, kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 16, v_head_dim: 16,
  num_nextn_predict_layers: 2, hidden_act: "silu", tie_word_embeddings: false }));
{
  const mtpArgs = ["--random-init", mtpCfg, "--tokenizer", target, "--threads", "2", "--parallel", "8"];
  const base = await startServer(kiln, [...mtpArgs, "--no-mtp-draft"]);
  check(/speculative decoding: none/.test(base.stderr()), "mtp: --no-mtp-draft serves without drafting");
  const mref = [];
  for (const p of prompts) mref.push(await complete(base.url, p));
  const mstops = mref.map((r) => r.text.slice(Math.floor(r.text.length / 2), Math.floor(r.text.length / 2) + 3));
  const mrefStop = [];
  for (let i = 0; i < prompts.length; i++) mrefStop.push(await complete(base.url, prompts[i], { stop: [mstops[i]] }));
  await stopServer(base);
  const srv = await startServer(kiln, mtpArgs);  // drafting with the modules is the default
  check(/speculative decoding: MTP self-drafting, 2 of the model's 2 modules a round/.test(srv.stderr()),
    "mtp: the startup line names MTP self-drafting");
  const models = await (await fetch(srv.url + "/v1/models")).json();
  check(models.data[0].speculative?.method === "mtp" && models.data[0].speculative?.draft_tokens === 2,
    "mtp: /v1/models says speculative mtp, 2 tokens");
  let same = true, sameStream = true;
  for (let i = 0; i < prompts.length; i++) {
    same &&= (await complete(srv.url, prompts[i])).text === mref[i].text;
    sameStream &&= (await stream(srv.url, prompts[i])).text === mref[i].text;
  }
  check(same && sameStream, "mtp: greedy text == the plain server's (one client, streaming and not)");
  const together = await Promise.all(prompts.map((p, i) => (i % 2 ? stream(srv.url, p) : complete(srv.url, p))));
  check(together.every((r, i) => r.text === mref[i].text), "mtp: concurrent clients each get the plain text");
  const st = await Promise.all(prompts.map((p, i) => stream(srv.url, p, { stop: [mstops[i]] })));
  check(st.every((r, i) => r.text === mrefStop[i].text && r.finish === mrefStop[i].finish),
    "mtp: stop strings cut where the plain server cuts");
  const s1 = await complete(srv.url, prompts[2], { temperature: 0.9, seed: 7 });
  const s2 = await complete(srv.url, prompts[2], { temperature: 0.9, seed: 7 });
  check(s1.text === s2.text && s1.tokens === MAX, "mtp: a seeded sample repeats with its seed");
  const drafted = await metric(srv.url, "kiln_spec_draft_tokens_total");
  const rounds = await metric(srv.url, "kiln_spec_rounds_total");
  console.log(`# mtp: ${rounds} rounds, ${drafted} drafted, ${await metric(srv.url, "kiln_spec_accepted_tokens_total")} accepted`);
  check(drafted > 0 && rounds > 0, "mtp: /metrics counts rounds and proposals");
  await stopServer(srv);
}

// ---- --device cuda on the SIMT emulator: MTP self-drafting and Medusa trees against the plain device server ----
if (kilnEmu) {
  process.env.KILN_GPU_EMULATOR = "1";  // the servers below inherit it
  // Head dims the device kernels take: latent attention's qk 48 + 16, GPT-2 heads of 64.
  const gpuMtp = cfg({ name: "gpu_mtp", cfg: { model_type: "deepseek_v3", hidden_size: 64, num_attention_heads: 2,
    num_hidden_layers: 2, intermediate_size: 96, vocab_size: 50257, max_position_embeddings: 256, rms_norm_eps: 1e-6,
    q_lora_rank: 32, kv_lora_rank: 32, qk_nope_head_dim: 48, qk_rope_head_dim: 16, v_head_dim: 32,
    num_nextn_predict_layers: 2, hidden_act: "silu", tie_word_embeddings: false } });
  const gpuTarget = path.join(work, "gpu_target"), gpuHeads = path.join(work, "gpu_target_medusa");
  {
    const r = spawnSync("/usr/bin/python3", [path.join(here, "make_model.py"), gpuTarget, npm,
      cfg({ name: "gpu_target_cfg", cfg: gpt2cfg({ n_layer: 2, n_head: 1, n_embd: 64 }) })], { encoding: "utf8" });
    if (r.status !== 0) throw new Error("make_model.py (gpu target) failed: " + r.stderr);
    const m = spawnSync("/usr/bin/python3", [path.join(here, "make_medusa.py"), gpuTarget, gpuHeads, "3"], { encoding: "utf8" });
    if (m.status !== 0) throw new Error("make_medusa.py (gpu target) failed: " + m.stderr);
  }
  const few = prompts.slice(0, 2);
  for (const [label, model, plainArgs, args, line] of [
    ["gpu mtp", ["--random-init", gpuMtp, "--tokenizer", target], ["--no-mtp-draft"], [], /MTP self-drafting, 2 of/],
    ["gpu medusa tree", ["--model", gpuHeads], [], ["--medusa", "--medusa-tree", "default"], /Medusa heads.*a tree of 15 nodes/],
  ]) {
    const common = ["--device", "cuda", ...model, "--parallel", "4"];
    const base = await startServer(kilnEmu, [...common, ...plainArgs]);
    const ref = [];
    for (const p of few) ref.push(await complete(base.url, p));
    await stopServer(base);
    const srv = await startServer(kilnEmu, [...common, ...args]);
    check(line.test(srv.stderr()), `${label}: the startup line names the drafting`);
    const got = await Promise.all(few.map((p, i) => (i % 2 ? stream(srv.url, p) : complete(srv.url, p))));
    check(got.every((r, i) => r.text === ref[i].text), `${label}: greedy text == the plain device server's`);
    const rounds = await metric(srv.url, "kiln_spec_rounds_total");
    check(rounds > 0, `${label}: /metrics counts rounds (${rounds})`);
    await stopServer(srv);
  }
}

// ---- bad combinations: one-line errors at startup ---------------------------------------------------------
const smallVocab = path.join(work, "small_vocab.json");
fs.writeFileSync(smallVocab, JSON.stringify(gpt2cfg({ vocab_size: 50304 })));
const shortCtx = path.join(work, "short_ctx.json");
fs.writeFileSync(shortCtx, JSON.stringify(gpt2cfg({ n_positions: 64 })));
for (const [what, args, pattern, modelDir] of [
  ["draft vocabulary differs", ["--draft-random-init", smallVocab], /vocab_size 50304 differs from the target's 50257/],
  ["--draft-tokens 0", ["--draft-model", otherDraft, "--draft-tokens", "0"], /--draft-tokens must be in \[1, 15\], got 0/],
  ["--draft-tokens 99", ["--draft-model", otherDraft, "--draft-tokens", "99"], /--draft-tokens must be in \[1, 15\], got 99/],
  ["draft context shorter", ["--draft-random-init", shortCtx], /its context of 64 positions is shorter than the served context of 256/],
  ["--medusa without heads", ["--medusa"], /--medusa: .* has no Medusa heads/],
  ["--medusa-tokens 4 of 3 heads", ["--medusa", "--medusa-tokens", "4"], /--medusa-tokens must be in \[1, 3\]/, withHeads],
  ["--medusa with a draft", ["--medusa", "--draft-model", otherDraft], /give at most one of --medusa and --draft-model/, withHeads],
  ["--medusa-tree without --medusa", ["--medusa-tree", "default"], /--medusa-tree needs --medusa/, withHeads],
  ["--medusa-tree bad node", ["--medusa", "--medusa-tree", "0;x"], /--medusa-tree: node 'x' is not a path of ranks/, withHeads],
  ["--mtp-draft without modules", ["--mtp-draft"], /--mtp-draft: the model \(gpt2\) has no multi-token-prediction modules/],
  ["--draft-tokens 3 of 2 modules", ["--draft-tokens", "3"], /--draft-tokens 3: the model has 2 multi-token-prediction modules/, mtpCfg],
  ["--mtp-draft with a draft", ["--mtp-draft", "--draft-model", otherDraft], /give at most one of --mtp-draft, --medusa, --draft-model and --prompt-lookup/, mtpCfg],
  ["--prompt-lookup with a draft", ["--prompt-lookup", "--draft-model", otherDraft], /give at most one of --prompt-lookup, --medusa and --draft-model/],
  ["--prompt-lookup --draft-tokens 16", ["--prompt-lookup", "--draft-tokens", "16"], /--draft-tokens must be in \[1, 15\], got 16/],
  ["--lookup-min-ngram 0", ["--prompt-lookup", "--lookup-min-ngram", "0"], /--lookup-min-ngram \(0\) and --lookup-max-ngram \(3\) must satisfy 1 <= min <= max/],
]) {
  const model = modelDir === mtpCfg ? ["--random-init", mtpCfg, "--tokenizer", target] : ["--model", modelDir ?? target];
  const r = spawnSync(kiln, ["serve", "--port", "0", ...model, "--threads", "1", ...args], { encoding: "utf8",
    timeout: 60000 });
  const lines = r.stderr.trim().split("\n").filter((l) => !/listening on/.test(l));
  check(r.status !== 0 && r.status !== null && lines.length === 1 && pattern.test(lines[0]),
    `startup error, ${what}: ${JSON.stringify(lines.join(" | ").slice(0, 200))}`);
}

if (failed()) { console.log(`${failed()} check(s) failed`); process.exit(1); }
console.log("all checks passed");
