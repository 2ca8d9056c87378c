// kiln's chat-template interpreter (serve/jinja.h, through `kiln chat-template`) against @huggingface/jinja,
// the implementation transformers.js and the Hub use, on the real chat templates of Llama 3 and 3.1, Mistral
// v0.1 and v0.3, Qwen2.5 and Qwen3 (tests/serve/chat_templates/, as their tokenizer_config.json hold them), a
// template of the language's features, and kiln's own SFT default; each over conversations with system
// prompts, several turns, tools and tool calls, reasoning, unicode and whitespace, and inputs the templates
// refuse. Every rendering must be byte-identical (or both must raise). Where @huggingface/jinja follows
// JavaScript rather than Python's Jinja, kiln follows Python and the features template stays off those cases:
// the sign of a negative modulo, and a string's length (UTF-16 units there, characters here).
// usage: node jinja_vs_hf.mjs KILN WORK_DIR
import fs from "node:fs";
import path from "node:path";
import { spawnSync } from "node:child_process";
import { check, failed, here, npm } from "./harness.mjs";

const { Template } = await import(path.join(npm, "@huggingface", "jinja", "dist", "index.js"));
const [kiln, work] = process.argv.slice(2);
fs.mkdirSync(work, { recursive: true });

const sys = { role: "system", content: "You are terse.\n" };
const u1 = { role: "user", content: "  What is 2+2?  " }, a1 = { role: "assistant", content: "4." };
const u2 = { role: "user", content: "Et en français ? — «quatre» 🙂\n\nMerci." };
const tools = [{ type: "function", function: { name: "get_weather", description: "Weather of a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
const call = { role: "assistant", content: "", tool_calls: [{ id: "abc123XYZ", type: "function",
  function: { name: "get_weather", arguments: { city: "Paris" } } }] };
const toolMsg = { role: "tool", content: '{"temp": 21}', tool_call_id: "abc123XYZ" };
const base = { bos_token: "<s>", eos_token: "</s>" };
const convs = [
  { messages: [u1], add_generation_prompt: true },
  { messages: [sys, u1], add_generation_prompt: true },
  { messages: [sys, u1, a1, u2], add_generation_prompt: true },
  { messages: [u1, a1], add_generation_prompt: false },
  { messages: [u1, a1, u2], add_generation_prompt: false },
  { messages: [{ role: "user", content: "" }], add_generation_prompt: true },
  { messages: [u1, u2], add_generation_prompt: true },  // not alternating: Mistral refuses
];
const withTools = [
  { messages: [sys, u1], tools, add_generation_prompt: true },
  { messages: [u1, call, toolMsg], tools, add_generation_prompt: true },
  { messages: [u1, call, toolMsg, toolMsg, a1, u2], tools, add_generation_prompt: true },
];
const qwen3 = [
  { messages: [u1, { role: "assistant", content: "<think>\nadd them\n</think>\n\n4." }, u2], add_generation_prompt: true },
  { messages: [u1], add_generation_prompt: true, enable_thinking: false },
  { messages: [u1, { role: "assistant", content: "4.", reasoning_content: "easy" }], add_generation_prompt: false },
];
const cases = {
  "llama3.jinja": convs,
  // (builtin_tools is left out: its `reject` filter is one @huggingface/jinja does not have.)
  "llama3.1.jinja": [...convs, ...withTools],
  "mistral_v0.1.jinja": [...convs, { messages: [sys, u1] }],
  "mistral_v0.3.jinja": [...convs, ...withTools.slice(0, 2)],
  "qwen2.5.jinja": [...convs, ...withTools],
  "qwen3.jinja": [...convs, ...withTools, ...qwen3],
  "features.jinja": [...convs, { messages: [{ role: "user", content: "RAISE" }] }, { messages: [] }],
  "sft": convs,
};

const dir = path.join(here, "chat_templates");
for (const [name, contexts] of Object.entries(cases)) {
  const ctxs = contexts.map((c) => ({ ...base, ...c }));
  const ctxFile = path.join(work, name + ".contexts.json");
  fs.writeFileSync(ctxFile, JSON.stringify(ctxs));
  const args = ["chat-template", "--contexts", ctxFile];
  let source;
  if (name === "sft") {
    // kiln's default, the SFT format: its Jinja source is what `kiln chat-template` renders with no template.
    source = "{% for message in messages %}{{ '<|' + message.role + '|>\\n' + message.content }}{% if message.role == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";
  } else {
    source = fs.readFileSync(path.join(dir, name), "utf8");
    args.push("--template", path.join(dir, name));
  }
  const r = spawnSync(kiln, args, { encoding: "utf8" });
  if (r.status !== 0) { check(false, `${name}: kiln chat-template failed: ${r.stderr.trim()}`); continue; }
  const ours = JSON.parse(r.stdout);
  const tmpl = new Template(source);
  let same = 0;
  for (let i = 0; i < ctxs.length; i++) {
    let theirs;
    try { theirs = tmpl.render(ctxs[i]); } catch (e) { theirs = { error: e.message }; }
    const a = ours[i], b = theirs;
    const ok = typeof b === "string" ? a === b : typeof a === "object" && a !== null && "error" in a;
    if (ok) same++;
    else console.log(`   ${name} context ${i}:\n     kiln: ${JSON.stringify(a)}\n     hf:   ${JSON.stringify(b)}`);
  }
  const raised = ours.filter((x) => typeof x === "object").length;
  check(same === ctxs.length, `${name}: ${same}/${ctxs.length} renderings identical to @huggingface/jinja (${raised} raise)`);
}
if (failed()) process.exit(1);
console.log("all checks passed");
