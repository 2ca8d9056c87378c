"""End-to-end check of `kiln generate` and `kiln eval` against the PyTorch reference (tests/peer/torch_gpt2.py).

A small random GPT-2 checkpoint (and a small byte-level BPE tokenizer in GPT-2's encoder.json / vocab.bpe
format) is written here. Then:
  1. greedy continuation of 40 tokens by `kiln generate --json` equals, token for token, the reference's greedy
     continuation, which recomputes the full prefix at every step (no cache);
  2. at the context limit kiln stops at n_positions tokens, says so on stderr, and still matches the reference;
  3. with the tokenizer: --prompt text is encoded, the streamed stdout is exactly the prompt's and the new
     tokens' bytes (Python's own byte-level decoding), the end-of-text token ends generation, and --stop ends
     the text before the stop string;
  4. a seeded sample is reproducible; bad prompts give one-line errors;
  5. `kiln eval` reports the mean next-token loss of sequential batches of a shard, equal to the reference's.

usage: generate_vs_torch.py KILN_BINARY WORK_DIR
"""
import json
import math
import os
import struct
import subprocess
import sys

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "peer"))
from torch_gpt2 import random_weights, forward, load_checkpoint, param_names, write_safetensors  # noqa: E402
from gpt2_bytes import byte_order as gpt2_byte_order, bytes_to_unicode  # noqa: E402

kiln, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
ok = True


def check(cond, what):
    global ok
    print(("ok    " if cond else "FAIL  ") + what)
    ok &= bool(cond)


def write_model(d, cfg, seed):
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    W, _ = random_weights(cfg, seed, 0.05, 0.1)
    write_safetensors(os.path.join(d, "model.safetensors"), W)


def kiln_run(args, expect_ok=True):
    r = subprocess.run([kiln] + args, capture_output=True)
    if expect_ok and r.returncode != 0:
        print(r.stderr.decode(errors="replace"))
        raise SystemExit(f"kiln {' '.join(args[:1])} failed")
    return r


def reference_greedy(P, cfg, prompt, max_new, eot=None, n_text=None):
    """Greedy continuation recomputing the whole prefix each step; also the smallest top-1/top-2 logit gap.
    n_text: only ids below it are candidates (the tokenizer's vocabulary, when the model's is larger)."""
    seq, gap = list(prompt), math.inf
    with torch.no_grad():
        for _ in range(max_new):
            if len(seq) >= cfg["n_positions"]:
                break
            logits = forward(P, cfg, torch.tensor([seq]))[0, -1][:n_text]
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
            if eot is not None and seq[-1] == eot:
                break
    return seq, gap


# ---- 1, 2: greedy continuation with prompt ids, no tokenizer ------------------------------------------------
cfg = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 211, "n_positions": 64, "layer_norm_epsilon": 1e-5}
model = os.path.join(work, "model")
write_model(model, cfg, 1234)
_, P = load_checkpoint(model)
prompt = [int(x) for x in torch.randint(0, cfg["vocab_size"], (8,), generator=torch.Generator().manual_seed(5))]
ids_arg = ",".join(map(str, prompt))

ref, gap = reference_greedy(P, cfg, prompt, 40)
print(f"reference: smallest top-1/top-2 logit gap over the 40 steps: {gap:.2e}")
assert gap > 1e-3, "random model has a near tie: greedy decoding is not a meaningful comparison"
r = kiln_run(["generate", "--model", model, "--prompt-ids", ids_arg, "--max-new", "40", "--temperature", "0",
              "--json", "--threads", "2"])
out = json.loads(r.stdout)
check(out["tokens"] == ref, f"greedy 40 tokens equal the reference ({len(out['tokens']) - len(prompt)} new)")
if out["tokens"] != ref:
    print("kiln ", out["tokens"][len(prompt):])
    print("torch", ref[len(prompt):])
check(out["text"] is None and out["finish_reason"] == "length", "no tokenizer: text null, finish_reason length")
print(r.stderr.decode().strip())

ref_ctx, gap = reference_greedy(P, cfg, prompt, 100)
assert gap > 1e-3
r = kiln_run(["generate", "--model", model, "--prompt-ids", ids_arg, "--max-new", "100", "--temperature", "0",
              "--json"])
out = json.loads(r.stdout)
check(len(out["tokens"]) == cfg["n_positions"] and out["tokens"] == ref_ctx,
      f"context limit: stops at {cfg['n_positions']} tokens, equal to the reference")
check(out["finish_reason"] == "context" and b"context limit" in r.stderr, "context limit reported on stderr")

# Text mode without a tokenizer prints the ids.
r = kiln_run(["generate", "--model", model, "--prompt-ids", ids_arg, "--max-new", "40", "--temperature", "0"])
check(r.stdout.decode().split() == [str(t) for t in ref], "text mode without a tokenizer prints the ids")

# ---- 3: a tokenizer, text prompts, streaming bytes, end-of-text, --stop ------------------------------------


b2u = bytes_to_unicode()
merges_text = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s"),
               ("e", "s"), ("Ã", "©")]  # the last one is "é" (C3 A9) as one token
byte_order = gpt2_byte_order(b2u)
vocab = [b2u[b] for b in byte_order] + [a + b for a, b in merges_text] + ["<|endoftext|>"]
eot = len(vocab) - 1
u2b = {v: k for k, v in b2u.items()}
tok_bytes = [bytes(u2b[c] for c in t) if i != eot else b"<|endoftext|>" for i, t in enumerate(vocab)]

tcfg = dict(cfg, vocab_size=300, n_positions=96)
tmodel = os.path.join(work, "model_tok")
write_model(tmodel, tcfg, 99)
json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(tmodel, "encoder.json"), "w"), ensure_ascii=False)
with open(os.path.join(tmodel, "vocab.bpe"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges_text))
_, TP = load_checkpoint(tmodel)

text = "the theses in the café"
r = kiln_run(["generate", "--model", tmodel, "--prompt", text, "--max-new", "60", "--temperature", "0", "--json"])
out = json.loads(r.stdout)
# The prompt's encoding: check it decodes to the text and uses the merges (fewer tokens than bytes).
enc = None
for k in range(1, len(out["tokens"]) + 1):
    if b"".join(tok_bytes[t] for t in out["tokens"][:k]) == text.encode():
        enc = out["tokens"][:k]
        break
check(enc is not None and len(enc) < len(text.encode()), f"--prompt encoded to {enc}")
ref_t, gap = reference_greedy(TP, tcfg, enc, 60, eot=eot, n_text=len(vocab))
assert gap > 1e-3, "tokenizer model has a near tie"
check(out["tokens"] == ref_t, f"greedy with a tokenizer equals the reference ({len(ref_t) - len(enc)} new tokens, "
                              f"finish {out['finish_reason']})")
check((out["finish_reason"] == "eot") == (ref_t[-1] == eot), "the tokenizer's end-of-text token ends generation")
# --eot-id: a token the greedy continuation produces at step 10 ends it there; it is listed but has no text.
stop_id = ref_t[len(enc) + 9]
first = ref_t.index(stop_id, len(enc))
r = kiln_run(["generate", "--model", tmodel, "--prompt", text, "--max-new", "60", "--temperature", "0", "--json",
              "--eot-id", str(stop_id)])
out = json.loads(r.stdout)
want_text = (text.encode() + b"".join(tok_bytes[t] for t in ref_t[len(enc):first])).decode("utf-8", "replace")
check(out["tokens"] == ref_t[:first + 1] and out["finish_reason"] == "eot" and
      (out["text"] == want_text or "\ufffd" in want_text),
      f"--eot-id {stop_id}: stops after its first occurrence ({first + 1 - len(enc)} new tokens), no text for it")
completion = b"".join(tok_bytes[t] for t in ref_t[len(enc):] if t != eot)
r = kiln_run(["generate", "--model", tmodel, "--prompt", text, "--max-new", "60", "--temperature", "0"])
check(r.stdout == text.encode() + completion + b"\n", "streamed stdout is exactly the prompt and completion bytes")
if r.stdout != text.encode() + completion + b"\n":
    print("kiln ", r.stdout)
    print("torch", text.encode() + completion + b"\n")

# --stop: a printable piece of the completion; the text ends right before its first occurrence.
stop = None
for t in ref_t[len(enc) + 3:]:
    bt = tok_bytes[t]
    if t != eot and bt.isascii() and bt.strip() and bt.decode().isprintable():
        stop = bt.decode()
        break
if stop is not None:
    cut = completion.find(stop.encode())
    r = kiln_run(["generate", "--model", tmodel, "--prompt", text, "--max-new", "60", "--temperature", "0",
                  "--stop", stop])
    check(r.stdout == text.encode() + completion[:cut] + b"\n", f"--stop {stop!r} ends the text before it")
    r = kiln_run(["generate", "--model", tmodel, "--prompt", text, "--max-new", "60", "--temperature", "0",
                  "--stop", stop, "--json"])
    check(json.loads(r.stdout)["finish_reason"] == "stop", "--stop: finish_reason stop")
else:
    print("note: no printable token in the completion to use as a stop string")

# ---- 4: seeded sampling, errors ------------------------------------------------------------------------------
sample = ["generate", "--model", model, "--prompt-ids", ids_arg, "--max-new", "30", "--temperature", "0.9",
          "--top-k", "20", "--top-p", "0.9", "--json"]
a = json.loads(kiln_run(sample + ["--seed", "7"]).stdout)["tokens"]
b = json.loads(kiln_run(sample + ["--seed", "7"]).stdout)["tokens"]
c = json.loads(kiln_run(sample + ["--seed", "8"]).stdout)["tokens"]
check(a == b and a != c, "a seed reproduces a sample (and another seed differs)")

for args, needle in [(["--prompt-ids", "1,211,3"], b"211"), (["--prompt-ids", "1,x"], b"'x'"),
                     (["--prompt-ids", ",".join(["1"] * 65)], b"65 tokens"), (["--prompt", "hi"], b"tokenizer"),
                     (["--prompt-ids", "1", "--top-p", "0"], b"--top-p")]:
    r = kiln_run(["generate", "--model", model] + args, expect_ok=False)
    err = r.stderr.strip()
    check(r.returncode != 0 and needle in err and len(err.splitlines()) == 1, f"error for {args}: {err.decode()}")
r = kiln_run(["generate", "--model", model, "--tokenizer", tmodel, "--prompt", "hi"], expect_ok=False)
check(r.returncode != 0 and b"vocab_size" in r.stderr, f"tokenizer larger than the model: {r.stderr.strip().decode()}")

# ---- 5: kiln eval ----------------------------------------------------------------------------------------------
n_tok = 3000
g = torch.Generator().manual_seed(77)
toks = torch.randint(0, cfg["vocab_size"], (n_tok,), generator=g).tolist()
shard = os.path.join(work, "eval.bin")
with open(shard, "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n_tok, *([0] * 253)))
    f.write(struct.pack(f"<{n_tok}H", *toks))
B, T = 4, 32
for max_batches in [0, 5]:
    args = ["eval", "--model", model, "--data", shard, "--batch", str(B), "--seq", str(T)]
    if max_batches:
        args += ["--max-batches", str(max_batches)]
    res = json.loads(kiln_run(args).stdout)
    # Reference: llm.c's sequential batches (B*T+1 consecutive tokens, advancing by B*T), one pass.
    n_batches = (n_tok - 1) // (B * T)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    losses = []
    with torch.no_grad():
        for i in range(n_batches):
            chunk = torch.tensor(toks[i * B * T: i * B * T + B * T + 1])
            x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
            logits = forward(P, cfg, x)
            losses.append(F.cross_entropy(logits.view(-1, cfg["vocab_size"]), y.view(-1), reduction="sum"))
    ref_loss = float(sum(losses)) / (n_batches * B * T)
    check(res["batches"] == n_batches and abs(res["loss"] - ref_loss) < 1e-4 and
          abs(res["perplexity"] - math.exp(ref_loss)) < 1e-3 * math.exp(ref_loss),
          f"eval (max_batches={max_batches}): kiln {res['loss']:.6f} over {res['batches']} batches, "
          f"torch {ref_loss:.6f} over {n_batches}")

print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
