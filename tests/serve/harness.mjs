// Shared by the server tests: start `kiln serve` on a free port and wait until it is ready, run `kiln generate`
// for the reference text, small assertion helpers. Node's own fetch (undici) is the raw HTTP client.
import { spawn, spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const here = path.dirname(fileURLToPath(import.meta.url));
export const npm = path.join(here, "..", "..", "third_party", "npm", "node_modules");

let failures = 0;
export function check(cond, what) {
  console.log((cond ? "ok    " : "FAIL  ") + what);
  if (!cond) failures++;
}
export function failed() { return failures; }

// Writes the random GPT-2 checkpoint with GPT-2's tokenizer (tests/serve/make_model.py) into dir.
export function makeModel(dir) {
  const r = spawnSync("/usr/bin/python3", [path.join(here, "make_model.py"), dir, npm], { encoding: "utf8" });
  if (r.status !== 0) throw new Error("make_model.py failed: " + r.stderr);
  return dir;
}

// Starts kiln serve with these arguments (plus --port 0); resolves {url, proc, stderr()} once /health is 200.
export async function startServer(kiln, args) {
  const proc = spawn(kiln, ["serve", "--port", "0", ...args], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  const port = await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("kiln serve did not start: " + err)), 60000);
    proc.stderr.on("data", (d) => {
      err += d.toString();
      const m = err.match(/listening on http:\/\/[^:]+:(\d+)/);
      if (m) { clearTimeout(t); resolve(Number(m[1])); }
    });
    proc.on("exit", (code) => reject(new Error(`kiln serve exited (${code}): ${err}`)));
  });
  const url = `http://127.0.0.1:${port}`;
  const seen = [];
  for (let i = 0; i < 600; i++) {
    try {
      const r = await fetch(url + "/health");
      seen.push(r.status);
      if (r.status === 200) break;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  return { url, proc, port, healthSeen: seen, stderr: () => err };
}

export async function stopServer(s, signal = "SIGTERM") {
  const done = new Promise((resolve) => s.proc.on("exit", (code, sig) => resolve({ code, sig })));
  s.proc.kill(signal);
  return done;
}

// kiln generate's JSON for a prompt: {tokens, text, finish_reason}; text is prompt + completion.
export function generate(kiln, model, prompt, extra = []) {
  const r = spawnSync(kiln, ["generate", "--model", model, "--prompt", prompt, "--json", "--threads", "1", ...extra],
    { encoding: "utf8" });
  if (r.status !== 0) throw new Error("kiln generate failed: " + r.stderr);
  return JSON.parse(r.stdout);
}

// The completion text kiln generate produces for a prompt (its text minus the prompt's).
export function completionOf(kiln, model, prompt, extra = []) {
  const g = generate(kiln, model, prompt, extra);
  return { text: g.text.slice(prompt.length), tokens: g.tokens, finish: g.finish_reason };
}

// Reads an SSE response body: the data payloads in order.
export async function sseEvents(res) {
  const text = await res.text();
  return text.split("\n\n").filter((b) => b.trim()).map((b) => {
    if (!b.startsWith("data: ")) throw new Error("not an SSE data event: " + JSON.stringify(b.slice(0, 80)));
    return b.slice(6);
  });
}
