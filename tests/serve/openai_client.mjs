// kiln serve through the official `openai` npm client (and a raw SSE reader, and imitations of Dify's
// OpenAI-compatible provider), against `kiln generate` as the reference:
//   1. completions and chat, streaming and not: greedy and seeded text equal to kiln generate's; usage equal to
//      the independent GPT-2 tokenizer's counts (gpt-3-encoder); stop strings; n; logprobs; API keys;
//   2. every raw SSE chunk's shape, the usage chunk ("choices": []) and data: [DONE];
//   3. Dify's credential check (non-streaming max_tokens 5 "ping" -> object chat.completion) and its stream parser;
//   4. 16 simultaneous streams each get their text alone; disconnecting half of them mid-stream leaves the rest
//      correct and frees their KV blocks; /metrics agrees with what was sent;
//   5. a full queue answers 503 with Retry-After; SIGTERM ends a stream with an error event and exits 0.
// usage: node openai_client.mjs KILN WORK_DIR
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { check, failed, makeModel, startServer, stopServer, completionOf, sseEvents, npm } from "./harness.mjs";

const require = createRequire(import.meta.url);
const OpenAI = require(path.join(npm, "openai")).default ?? require(path.join(npm, "openai"));
const gpt2 = require(path.join(npm, "gpt-3-encoder"));

const [kiln, work] = process.argv.slice(2);
fs.mkdirSync(work, { recursive: true });
const model = makeModel(path.join(work, "model"));
const KEY = "sk-test-" + Math.random().toString(36).slice(2);
const srv = await startServer(kiln, ["--model", model, "--threads", "2", "--api-key", KEY, "--parallel", "16",
  "--model-name", "kiln-test"]);
const client = new OpenAI({ apiKey: KEY, baseURL: srv.url + "/v1", maxRetries: 0 });
const sft = (user) => `<|user|>\n${user}\n<|assistant|>\n`;  // kiln's SFT chat format (serve/chat.h)

// ---- 1. the openai client ----------------------------------------------------------------------------------
const prompt = "The meaning of life is";
const ref = completionOf(kiln, model, prompt, ["--max-new", "24", "--temperature", "0"]);
{
  const r = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 24, temperature: 0 });
  check(r.object === "text_completion" && r.choices[0].text === ref.text, "completion: greedy text == kiln generate's");
  check(r.usage.prompt_tokens === gpt2.encode(prompt).length && r.usage.completion_tokens === 24 &&
    r.usage.total_tokens === r.usage.prompt_tokens + 24, "completion: usage == the GPT-2 tokenizer's counts");
  check(r.choices[0].finish_reason === "length", "completion: finish_reason length");
  check(r.model === "kiln-test", "completion: model echoed");
}
{
  const s = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 24, temperature: 0, stream: true });
  let text = "", finish = null;
  for await (const c of s) { text += c.choices[0]?.text ?? ""; finish = c.choices[0]?.finish_reason ?? finish; }
  check(text === ref.text && finish === "length", "completion stream: greedy text == kiln generate's");
}
{
  const user = "Tell me a story";
  const cref = completionOf(kiln, model, sft(user), ["--max-new", "16", "--temperature", "0"]);
  const r = await client.chat.completions.create({ model: "kiln-test", messages: [{ role: "user", content: user }],
    max_tokens: 16, temperature: 0 });
  check(r.object === "chat.completion" && r.choices[0].message.role === "assistant" &&
    r.choices[0].message.content === cref.text, "chat: greedy text == kiln generate's on the SFT-rendered prompt");
  check(r.usage.prompt_tokens === gpt2.encode(sft(user)).length && r.usage.completion_tokens === 16,
    "chat: usage == the GPT-2 tokenizer's counts");
  const s = await client.chat.completions.create({ model: "kiln-test", messages: [{ role: "user", content: user }],
    max_tokens: 16, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = "", usage = null, role = null;
  for await (const c of s) {
    if (c.usage) usage = c.usage;
    if (c.choices.length) { text += c.choices[0].delta.content ?? ""; role = c.choices[0].delta.role ?? role; }
  }
  check(text === cref.text && role === "assistant", "chat stream: greedy text == kiln generate's");
  check(usage && usage.prompt_tokens === r.usage.prompt_tokens && usage.completion_tokens === 16,
    "chat stream: include_usage gives the usage chunk");
  // Content as text parts reads the same.
  const p = await client.chat.completions.create({ model: "kiln-test", max_tokens: 16, temperature: 0,
    messages: [{ role: "user", content: [{ type: "text", text: "Tell me " }, { type: "text", text: "a story" }] }] });
  check(p.choices[0].message.content === cref.text, "chat: content as text parts");
}
{
  // Seeded sampling: choice i draws from seed + i, as kiln generate --seed.
  const s0 = completionOf(kiln, model, prompt, ["--max-new", "20", "--temperature", "0.9", "--top-k", "50", "--seed", "42"]);
  const s1 = completionOf(kiln, model, prompt, ["--max-new", "20", "--temperature", "0.9", "--top-k", "50", "--seed", "43"]);
  const r = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 20, temperature: 0.9, top_k: 50,
    seed: 42, n: 2 });
  check(r.choices.length === 2 && r.choices[0].text === s0.text && r.choices[1].text === s1.text,
    "completion n=2 seeded: choice i == kiln generate --seed 42+i");
  check(s0.text !== s1.text, "the two seeds differ");
  check(r.usage.completion_tokens === 40, "n=2: usage counts both choices");
  const t = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 20, temperature: 0.9, top_k: 50,
    top_p: 0.8, seed: 5 });
  const tref = completionOf(kiln, model, prompt, ["--max-new", "20", "--temperature", "0.9", "--top-k", "50",
    "--top-p", "0.8", "--seed", "5"]);
  check(t.choices[0].text === tref.text, "seeded with top_p: == kiln generate");
}
{
  // Stop strings, matched across token boundaries and not sent: one spanning the 3rd and 4th tokens' text.
  const toks = ref.tokens.slice(gpt2.encode(prompt).length);
  const pieces = toks.map((t) => gpt2.decode([t]));
  const at = pieces.slice(0, 3).join("").length;
  const stop = ref.text.slice(at - 2, at + 2);
  const want = ref.text.slice(0, ref.text.indexOf(stop));
  const r = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 24, temperature: 0,
    stop: ["zzzz-never", stop] });
  check(r.choices[0].text === want && r.choices[0].finish_reason === "stop",
    `stop ${JSON.stringify(stop)} across a token boundary: text ends before it, finish_reason stop`);
  const s = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 24, temperature: 0, stop, stream: true });
  let text = "";
  for await (const c of s) text += c.choices[0]?.text ?? "";
  check(text === want, "stop in a stream: never sent");
}
{
  // Logprobs: the chosen token of a greedy run is the most probable one; top_logprobs sorted, log-probabilities.
  const r = await client.chat.completions.create({ model: "kiln-test", messages: [{ role: "user", content: "Hi" }],
    max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 3 });
  const lp = r.choices[0].logprobs.content;
  check(lp.length === 5 && lp.every((e) => e.top_logprobs.length === 3 && e.logprob <= 0 &&
    Math.abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6 && e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob),
    "logprobs: greedy token == top 1, sorted, <= 0");
  check(lp.map((e) => e.token).join("") === r.choices[0].message.content, "logprobs: tokens spell the content");
  const c = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 4, temperature: 0, logprobs: 2 });
  const L = c.choices[0].logprobs;
  check(L.tokens.join("") === c.choices[0].text && L.token_logprobs.length === 4 && Object.keys(L.top_logprobs[0]).length === 2,
    "completion logprobs: legacy format");
}
{
  // Penalties change a greedy continuation that repeats itself.
  const a = await client.completions.create({ model: "kiln-test", prompt, max_tokens: 24, temperature: 0, frequency_penalty: 2 });
  check(a.choices[0].text !== ref.text, "frequency_penalty changes a repeating greedy text");
}
{
  // API keys: 401 without or with a wrong key, /health public.
  const bad = new OpenAI({ apiKey: "wrong", baseURL: srv.url + "/v1", maxRetries: 0 });
  let status = 0;
  try { await bad.models.list(); } catch (e) { status = e.status; }
  check(status === 401, "wrong API key: 401");
  const r = await fetch(srv.url + "/v1/models");
  const j = await r.json();
  check(r.status === 401 && j.error && j.error.type === "invalid_request_error", "no API key: 401 with an error object");
  check((await fetch(srv.url + "/health")).status === 200, "/health needs no key");
  const m = await client.models.list();
  check(m.data.length === 1 && m.data[0].id === "kiln-test", "models.list: the one model");
}
{
  // The context check names the numbers.
  let err = null;
  try { await client.completions.create({ model: "kiln-test", prompt, max_tokens: 1000 }); } catch (e) { err = e; }
  check(err && err.status === 400 && /maximum context length is 256 tokens/.test(err.message) &&
    /1005 tokens/.test(err.message), "prompt + max_tokens beyond the context: 400 with the numbers");
}

// ---- 2. raw SSE chunks ------------------------------------------------------------------------------------
const auth = { Authorization: "Bearer " + KEY, "Content-Type": "application/json" };
{
  const res = await fetch(srv.url + "/v1/chat/completions", { method: "POST", headers: auth, body: JSON.stringify({
    model: "x", messages: [{ role: "user", content: "Hi" }], max_tokens: 6, temperature: 0, stream: true,
    stream_options: { include_usage: true } }) });
  check(res.headers.get("content-type").startsWith("text/event-stream"), "SSE: content-type text/event-stream");
  const ev = await sseEvents(res);
  check(ev[ev.length - 1] === "[DONE]", "SSE: ends with data: [DONE]");
  const chunks = ev.slice(0, -1).map((e) => JSON.parse(e));
  const ids = new Set(chunks.map((c) => c.id));
  check(chunks.every((c) => Array.isArray(c.choices) && c.object === "chat.completion.chunk" &&
    typeof c.created === "number" && c.model === "kiln-test") && ids.size === 1, "SSE: every chunk has id, object, created, model, choices[]");
  check(chunks[0].choices[0].delta.role === "assistant", "SSE: the first chunk opens the assistant's turn");
  const last = chunks[chunks.length - 1];
  check(last.choices.length === 0 && last.usage && last.usage.completion_tokens === 6, "SSE: the usage chunk has choices []");
  const fin = chunks.filter((c) => c.choices.length && c.choices[0].finish_reason);
  check(fin.length === 1 && fin[0].choices[0].finish_reason === "length", "SSE: one finish_reason chunk");
}

// ---- 3. Dify ------------------------------------------------------------------------------------------------
{
  // The credential check of Dify's OpenAI-API-compatible provider: a non-streaming "ping" of 5 tokens.
  const res = await fetch(srv.url + "/v1/chat/completions", { method: "POST", headers: auth, body: JSON.stringify({
    model: "kiln-test", messages: [{ role: "user", content: "ping" }], max_tokens: 5, temperature: 0, stream: false }) });
  const j = await res.json();
  check(res.status === 200 && j.object === "chat.completion" && typeof j.choices[0].message.content === "string",
    "Dify credential check: object chat.completion");
  // Its streaming parser: lines after "data: ", [DONE] ends, error objects raise, choices[0] read when present.
  const sres = await fetch(srv.url + "/v1/chat/completions", { method: "POST", headers: auth, body: JSON.stringify({
    model: "kiln-test", messages: [{ role: "user", content: "ping" }], max_tokens: 5, temperature: 0, stream: true,
    stream_options: { include_usage: true } }) });
  let full = "", finish = null, usage = null, ok = true;
  for (const line of (await sres.text()).split("\n")) {
    let l = line.trim();
    if (!l || l.startsWith(":")) continue;
    l = l.replace(/^data:\s*/, "");
    if (l === "[DONE]") break;
    const chunk = JSON.parse(l);
    if (chunk.error) { ok = false; break; }
    if (!("choices" in chunk)) { ok = false; break; }  // Dify: KeyError
    if (chunk.usage) usage = chunk.usage;
    if (chunk.choices.length === 0) continue;
    const choice = chunk.choices[0];
    if (choice.delta?.content) full += choice.delta.content;
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  check(ok && full === j.choices[0].message.content && finish === "length" && usage.completion_tokens === 5,
    "Dify stream parser reads the same text, finish and usage");
}

// ---- 4. concurrency ---------------------------------------------------------------------------------------
const metric = async (name) => {
  const t = await (await fetch(srv.url + "/metrics", { headers: auth })).text();
  const m = t.match(new RegExp("^" + name.replace(/[{}"=/.]/g, (c) => "\\" + c) + " (\\S+)$", "m"));
  return m ? Number(m[1]) : 0;
};
const prompts = Array.from({ length: 16 }, (_, i) => `Request number ${i} says`);
const streamChat = async (p, abortAfter = 0) => {
  const ctl = new AbortController();
  const s = await client.chat.completions.create({ model: "kiln-test", messages: [{ role: "user", content: p }],
    max_tokens: 24, temperature: 0, stream: true }, { signal: ctl.signal });
  let text = "", n = 0;
  try {
    for await (const c of s) {
      text += c.choices[0]?.delta?.content ?? "";
      if (abortAfter && ++n >= abortAfter) { ctl.abort(); break; }
    }
  } catch (e) { if (!abortAfter) throw e; }
  return text;
};
{
  const alone = [];
  for (const p of prompts) alone.push(await streamChat(p));
  const gen0 = await metric("kiln_generation_tokens_total");
  const req0 = await metric('kiln_requests_total{route="/v1/chat/completions",status="200"}');
  const together = await Promise.all(prompts.map((p) => streamChat(p)));
  check(together.every((t, i) => t === alone[i]), "16 simultaneous streams: each text == its text alone");
  check(new Set(alone).size > 8, "the 16 prompts give different texts");
  const gen1 = await metric("kiln_generation_tokens_total");
  check(gen1 - gen0 === 16 * 24, "/metrics: generated tokens == 16 x 24 sent");
  const mixed = await Promise.all(prompts.map((p, i) => streamChat(p, i % 2 ? 3 : 0)));
  check(mixed.every((t, i) => i % 2 === 1 || t === alone[i]), "disconnecting half mid-stream: the rest unchanged");
  // The server frees a disconnected sequence at its next step; on a loaded machine a step can take a while, so
  // wait (bounded) until nothing runs before reading the counters.
  for (let i = 0; i < 300 && await metric("kiln_running_sequences") !== 0; i++)
    await new Promise((r) => setTimeout(r, 100));
  const gen2 = await metric("kiln_generation_tokens_total");
  check(gen2 - gen1 >= 8 * 24 && gen2 - gen1 < 16 * 24, `/metrics: the disconnected streams stopped early (${gen2 - gen1} tokens)`);
  check(await metric("kiln_running_sequences") === 0 && await metric("kiln_kv_cache_used_blocks") === 0,
    "/metrics: no sequence running and no KV block held afterwards");
  const req1 = await metric('kiln_requests_total{route="/v1/chat/completions",status="200"}');
  check(req1 - req0 >= 24, "/metrics: requests counted");
  // A non-streaming client that goes away frees its sequences too, long before their 4 x 200 tokens are made.
  const ctl = new AbortController();
  const gone = fetch(srv.url + "/v1/completions", { method: "POST", signal: ctl.signal,
    headers: { "Content-Type": "application/json", ...auth },
    body: JSON.stringify({ prompt: "A long answer", max_tokens: 200, n: 4, temperature: 0 }) });
  for (let i = 0; i < 300 && await metric("kiln_running_sequences") === 0; i++)
    await new Promise((r) => setTimeout(r, 20));
  ctl.abort();
  await gone.catch(() => {});
  for (let i = 0; i < 300 && await metric("kiln_running_sequences") !== 0; i++)
    await new Promise((r) => setTimeout(r, 100));
  const gen3 = await metric("kiln_generation_tokens_total");
  check(await metric("kiln_running_sequences") === 0 && gen3 - gen2 < 800 &&
    await metric('kiln_requests_total{route="/v1/completions",status="499"}') === 1,
    `a disconnected non-streaming request is freed early (${gen3 - gen2} of 800 tokens made; counted as 499)`);
}

// ---- 5. a full queue; shutdown ------------------------------------------------------------------------------
{
  const small = await startServer(kiln, ["--model", model, "--threads", "1", "--parallel", "1", "--max-queue", "1"]);
  const body = JSON.stringify({ prompt, max_tokens: 200, temperature: 0 });
  const post = () => fetch(small.url + "/v1/completions", { method: "POST",
    headers: { "Content-Type": "application/json" }, body });
  // The first request runs (its slot taken) before three more arrive: one of them waits, the others are refused.
  const first = post();
  for (let i = 0; i < 300; i++) {
    const t = await (await fetch(small.url + "/metrics")).text();
    if (/^kiln_running_sequences 1$/m.test(t)) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  const others = Promise.all([1, 2, 3].map(post));
  const rs = [await first, ...(await others)];
  const busy = rs.filter((r) => r.status === 503);
  check(busy.length >= 1 && busy.every((r) => r.headers.get("retry-after") === "1"), `full queue: ${busy.length} x 503 with Retry-After`);
  const okr = rs.filter((r) => r.status === 200);
  const texts = await Promise.all(okr.map(async (r) => (await r.json()).choices[0].text));
  check(okr.length >= 2 && texts.every((t) => t === texts[0]), "the queued requests ran after the first");
  for (const r of busy) await r.text();
  // SIGTERM during a stream: the stream ends with an error event and [DONE]; the server exits 0.
  const sres = await fetch(small.url + "/v1/completions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: 250, stream: true }) });
  const reader = sres.body.getReader();
  await reader.read();
  const exit = stopServer(small);
  let rest = "";
  for (;;) { const { done, value } = await reader.read(); if (done) break; rest += Buffer.from(value).toString(); }
  const { code } = await exit;
  check(/"error"/.test(rest) && rest.trimEnd().endsWith("data: [DONE]"), "SIGTERM: the stream ends with an error event and [DONE]");
  check(code === 0, "SIGTERM: exit code 0");
}

const { code } = await stopServer(srv);
check(code === 0, "server stopped cleanly");
if (failed()) { console.log(`${failed()} check(s) failed`); process.exit(1); }
console.log("all checks passed");
