// Hostile and malformed requests against kiln serve on 127.0.0.1, in a bounded loop: broken JSON, wrong types,
// huge or negative numbers, over-size bodies, 100k-token prompts, invalid UTF-8, deep nesting, unknown routes
// and methods, bad keys, slow headers. Every one must get a 4xx with a JSON error object (or, for a silent
// connection, be closed by the server), the server must not crash, and afterwards it must answer a real request
// exactly as before.
// usage: node robustness.mjs KILN WORK_DIR [REQUESTS (default 10000)]
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { check, failed, makeModel, startServer, stopServer } from "./harness.mjs";

const [kiln, work, countArg] = process.argv.slice(2);
const total = Number(countArg ?? 10000);
fs.mkdirSync(work, { recursive: true });
const model = makeModel(path.join(work, "model"));
const KEY = "sk-robust";
const srv = await startServer(kiln, ["--model", model, "--threads", "2", "--timeout", "2", "--max-body", "1000000",
  "--api-key", KEY, "--http-threads", "32"]);
const H = { Authorization: "Bearer " + KEY, "Content-Type": "application/json" };

const good = { prompt: "The meaning of life is", max_tokens: 12, temperature: 0 };
const reference = async () => {
  const r = await fetch(srv.url + "/v1/completions", { method: "POST", headers: H, body: JSON.stringify(good) });
  return r.status === 200 ? (await r.json()).choices[0].text : `status ${r.status}`;
};
const before = await reference();

// A deterministic stream of bad requests: case i picks a kind and its variant from i.
let seed = 12345;
const rnd = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
// Values each field must refuse (null is read as absent, as OpenAI does, so it is not among them).
const wrong = {
  max_tokens: ["x", -1, 0, 1e300, -1e300, 3.5, true, [], {}, 2 ** 63], max_completion_tokens: ["x", -5, 1e30, false],
  temperature: ["x", -1, 3, 1e300, true, [1]], top_p: ["x", -0.5, 1.5, true], top_k: ["x", -2, 3.5, true, 1e20],
  n: ["x", 0, -1, 3.5, 1e9, true], stop: [7, Array(40).fill("s"), [1], "s".repeat(300), { a: 1 }],
  stream: ["yes", 1, []], seed: ["x", 1e300, 3.5, -1e300], logprobs: ["x", 3.5, -1, [], 1000],
  presence_penalty: [3, -3, "x", 1e300], frequency_penalty: [2.5, -2.5, {}], stream_options: [3, { include_usage: 5 }],
  user: [12, [], {}], model: [1, [], {}],
};
const fields = Object.keys(wrong);
const rawBody = (s) => Buffer.from(s, "latin1");
function badRequest(i) {
  const kind = i % 14;
  const route = i % 2 ? "/v1/completions" : "/v1/chat/completions";
  const base = route === "/v1/completions" ? { ...good } : { messages: [{ role: "user", content: "hi" }], max_tokens: 4 };
  switch (kind) {
    case 0: {  // broken JSON: a valid body cut anywhere, or garbage
      const s = JSON.stringify(base);
      return { route, body: s.slice(0, rnd(s.length - 1)) + (rnd(2) ? "" : "}}}") };
    }
    case 1: {  // a wrong type or an out-of-range value
      const f = fields[rnd(fields.length)], v = wrong[f][rnd(wrong[f].length)];
      return { route, body: JSON.stringify({ ...base, [f]: v }) };
    }
    case 2:  // huge numbers
      return { route, body: JSON.stringify({ ...base, max_tokens: 10 ** (6 + rnd(20)) }) };
    case 3:  // 100k-token prompts (ids), or a text prompt longer than the context
      return rnd(2) ? { route: "/v1/completions", body: JSON.stringify({ prompt: Array(100000).fill(464), max_tokens: 1 }) }
                    : { route: "/v1/completions", body: JSON.stringify({ prompt: "word ".repeat(2000), max_tokens: 1 }) };
    case 4:  // invalid UTF-8 inside a string
      return { route, body: Buffer.concat([rawBody('{"prompt":"ab'), Buffer.from([0xff, 0xfe, 0xc3]), rawBody('","max_tokens":2}')]) };
    case 5:  // nesting
      return { route, body: "[".repeat(5000 + rnd(5000)) + "]".repeat(100) };
    case 6:  // unknown routes
      return { route: ["/v2/x", "/../../etc/passwd", "/v1/completions/x", "/%00", "/v1/models/../../x"][rnd(5)],
               method: ["GET", "POST"][rnd(2)], body: "{}" };
    case 7:  // wrong methods
      return { route: ["/v1/completions", "/v1/chat/completions", "/tokenize"][rnd(3)], method: ["GET", "PUT", "DELETE", "PATCH"][rnd(4)] };
    case 8:  // bad or missing keys
      return { route, body: JSON.stringify(base), headers: rnd(2) ? { "Content-Type": "application/json" }
                                                                 : { Authorization: "Bearer nope", "Content-Type": "application/json" } };
    case 9:  // chat messages that are not messages
      return { route: "/v1/chat/completions", body: JSON.stringify({ messages: [[{ content: "no role" }], { role: 5 },
        { role: "user", content: { a: 1 } }, "hi", { role: "user", content: [{ type: "image_url", image_url: "file:///etc/passwd" }] }][rnd(5)] }) };
    case 10:  // token ids outside the vocabulary or negative
      return { route: "/v1/completions", body: JSON.stringify({ prompt: [1, 2, [50257, -1, 2 ** 31][rnd(3)]], max_tokens: 2 }) };
    case 11:  // tokenize / detokenize with bad bodies
      return rnd(2) ? { route: "/tokenize", body: JSON.stringify({ content: [1, 2] }) }
                    : { route: "/detokenize", body: JSON.stringify({ tokens: [1, 99999999] }) };
    case 12:  // bodies beyond --max-body (every 50th time a 10 MB one), or empty
      return i % 50 === 12 ? { route, body: "x".repeat(10 << 20) } : { route, body: rnd(2) ? "" : "null" };
    default:  // n and prompt lists beyond the limits, empty messages
      return { route: "/v1/completions", body: JSON.stringify(rnd(2) ? { prompt: Array(100).fill("a"), n: 1 } : { prompt: "a", n: 500 }) };
  }
}

// Slow headers: connections that send half a request line and go silent must be closed by the server.
const slow = [0, 1, 2].map(() => new Promise((resolve) => {
  const t0 = Date.now();
  const s = net.connect(srv.port, "127.0.0.1", () => s.write("POST /v1/completions HTTP/1.1\r\nHost: x\r\n"));
  s.on("data", () => {});  // read what the server says (a 408/400), so its close is seen
  s.on("close", () => resolve(Date.now() - t0));
  s.on("error", () => {});
  setTimeout(() => { s.destroy(); resolve(Infinity); }, 15000);
}));

let bad = 0, done = 0;
const examples = [];
async function worker(w, workers) {
  for (let i = w; i < total; i += workers) {
    const q = badRequest(i);
    let status = 0, body = "";
    try {
      const r = await fetch(srv.url + q.route, { method: q.method ?? "POST", headers: q.headers ?? H,
        body: q.method && q.method !== "POST" && q.method !== "PUT" && q.method !== "PATCH" ? undefined : q.body });
      status = r.status;
      body = await r.text();
    } catch (e) { status = -1; body = String(e); }
    let errorObject = false;
    try { errorObject = typeof JSON.parse(body).error.message === "string"; } catch { /* not JSON */ }
    if (status < 400 || status >= 500 || !errorObject) {
      bad++;
      if (examples.length < 5) examples.push(`case ${i % 14}: ${String(q.body).slice(0, 150)} -> ${status} ${body.slice(0, 100)}`);
    }
    done++;
  }
}
await Promise.all(Array.from({ length: 16 }, (_, w) => worker(w, 16)));
for (const e of examples) console.log("   " + e);
check(done === total && bad === 0, `${total} hostile requests: each a 4xx with an error object (${bad} not)`);
const closed = await Promise.all(slow);
check(closed.every((ms) => ms < 10000), `slow headers: the server closes silent connections (${closed.map((x) => x + " ms").join(", ")})`);

// A file or model path in a request names nothing: "model" is only echoed.
const r = await fetch(srv.url + "/v1/completions", { method: "POST", headers: H,
  body: JSON.stringify({ ...good, model: "../../../etc/passwd" }) });
const j = await r.json();
check(r.status === 200 && j.choices[0].text === before, "a path in 'model' changes nothing");
check((await fetch(srv.url + "/health")).status === 200, "still healthy");
check(await reference() === before, "the same request answers exactly as before the loop");
const metrics = await (await fetch(srv.url + "/metrics", { headers: H })).text();
check(/kiln_requests_total\{route="\/v1\/completions",status="400"\} \d+/.test(metrics), "/metrics counted the 400s");
const { code } = await stopServer(srv);
check(code === 0 && !/Sanitizer|runtime error/.test(srv.stderr()), "the server exits cleanly (no sanitizer report)");
if (failed()) { console.log(srv.stderr().slice(-2000)); process.exit(1); }
console.log("all checks passed");
