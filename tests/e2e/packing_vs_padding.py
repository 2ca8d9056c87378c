"""End-to-end check of packed and padded batching and of supervised fine-tuning data, against PyTorch.

Everything kiln computes here is recomputed independently: the tokenizer is byte-level with no merges (so a
text's ids are its bytes, in GPT-2's byte order), documents, sequences and the first micro-batch are derived
from the corpus and the documented rules (train/packing.h), and the reference loss is tests/peer/torch_gpt2.py
run per document (one forward per sequence, batch 1, its own length, float64).
  1. `kiln data prepare` on a corpus whose document lengths are log-normal (10..1000 tokens): the shards hold
     the documents, spilling across shards.
  2. From a saved random checkpoint (--init), the first-step loss of `--packing` (sequential order) equals the
     reference's mean loss over the documents of the first packed micro-batch, and so does padded batching
     (`--batching padded`, one row per document of that micro-batch); more steps run for both.
  3. A packed run killed mid-way and resumed gives the same losses as an uninterrupted one.
  4. `kiln data prepare-sft` on a small JSONL: every example's tokens and loss mask equal the template rendered
     here; the first-step loss of packed and padded SFT training equals the reference's loss over response
     tokens only; plain rows are refused for masked data; a malformed line is reported as file:line.

usage: packing_vs_padding.py KILN_BINARY WORK_DIR
"""
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "peer"))
from torch_gpt2 import forward, load_checkpoint, param_names, read_shard, write_safetensors  # noqa: E402
from gpt2_bytes import byte_order as gpt2_byte_order, bytes_to_unicode  # noqa: E402

kiln, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
ok = True


def check(cond, what):
    global ok
    print(("ok    " if cond else "FAIL  ") + what)
    ok &= bool(cond)


def run(args, env=None, expect=0):
    r = subprocess.run([kiln] + args, capture_output=True, env=dict(os.environ, **(env or {})))
    if expect is not None and r.returncode != expect:
        print(r.stderr.decode(errors="replace"))
        raise SystemExit(f"kiln {' '.join(args[:2])}: exit {r.returncode}, expected {expect}")
    return r


# ---- a byte-level tokenizer without merges (GPT-2 file format) -------------------------------------------------
b2u = bytes_to_unicode()
byte_order = gpt2_byte_order(b2u)
byte_id = {b: i for i, b in enumerate(byte_order)}
EOT = 256
tok_dir = os.path.join(work, "tokenizer")
os.makedirs(tok_dir)
json.dump({**{b2u[b]: i for i, b in enumerate(byte_order)}, "<|endoftext|>": EOT},
          open(os.path.join(tok_dir, "encoder.json"), "w", encoding="utf-8"), ensure_ascii=False)
open(os.path.join(tok_dir, "vocab.bpe"), "w").write("#version: 0.2\n")


def encode(text):
    return [byte_id[b] for b in text.encode("utf-8")]


# ---- model -------------------------------------------------------------------------------------------------
T = 128
cfg = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 257, "n_positions": T, "layer_norm_epsilon": 1e-5}


def write_model(d, seed):
    os.makedirs(d)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    g = torch.Generator().manual_seed(seed)
    C, V = cfg["n_embd"], cfg["vocab_size"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C), "c_attn.weight": (C, 3 * C), "c_attn.bias": (3 * C,),
              "c_fc.weight": (C, 4 * C), "c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
              "attn.c_proj.weight": (C, C)}
    W = {}
    for n in param_names(cfg):
        s = next((v for k, v in shapes.items() if n.endswith(k)), (C,))
        if n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            W[n] = 1.0 + 0.1 * torch.randn(s, generator=g)
        else:
            W[n] = (0.05 if len(s) == 1 else 0.1) * torch.randn(s, generator=g)
    write_safetensors(os.path.join(d, "model.safetensors"), W)


model_dir = os.path.join(work, "model")
write_model(model_dir, 7)
_, P = load_checkpoint(model_dir, torch.float64)


# ---- the documented batching rules, recomputed -------------------------------------------------------------------
def read_docs(pattern_dir, prefix):
    """Documents (tokens, mask or None) of the shards <dir>/<prefix>_*.bin in order, from .bin/.idx/.mask."""
    stream, mask, starts = [], [], []
    has_mask = None
    for name in sorted(f for f in os.listdir(pattern_dir) if f.startswith(prefix + "_") and f.endswith(".bin")):
        path = os.path.join(pattern_dir, name)
        toks = read_shard(path).tolist()
        raw = open(path + ".idx", "rb").read()
        magic, version, count = struct.unpack("<IIq", raw[:16])
        assert magic == 0x434F444B and version == 1 and len(raw) == 16 + 8 * count
        starts += [len(stream) + s for s in struct.unpack(f"<{count}q", raw[16:])]
        if os.path.exists(path + ".mask"):
            m = open(path + ".mask", "rb").read()
            magic, version, count = struct.unpack("<IIq", m[:16])
            assert m[:4] == b"KMSK" and version == 1 and count == len(toks) and len(m) == 16 + count
            mask += list(m[16:])
            has_mask = True
        stream += toks
    bounds = starts + [len(stream)]
    return [(stream[a:b], mask[a:b] if has_mask else None) for a, b in zip(bounds, bounds[1:])]


def sequences(docs, whole_max, piece):
    for d, (toks, _) in enumerate(docs):
        n = len(toks)
        if n <= whole_max:
            yield (d, 0, n)
        else:
            for b in range(0, n, piece):
                yield (d, b, min(piece, n - b))


def first_packed(docs, B):
    """Sequences of the first packed micro-batch (greedy, in order, at most B*T tokens)."""
    out, used = [], 0
    npos = cfg["n_positions"]
    for s in sequences(docs, min(B * T, npos), min(T, npos)):
        if used + s[2] > B * T:
            break
        out.append(s)
        used += s[2]
    return out


def reference_loss(docs, seqs):
    """Mean next-token loss over the sequences' targets: one float64 forward per sequence."""
    total, count = 0.0, 0
    with torch.no_grad():
        for d, b, n in seqs:
            toks, mask = docs[d]
            logits = forward(P, cfg, torch.tensor([toks[b:b + n]]))[0]
            rows = [i for i in range(n) if b + i + 1 < len(toks) and (mask is None or mask[b + i + 1])]
            tgt = torch.tensor([toks[b + i + 1] for i in rows])
            total += float(F.cross_entropy(logits[rows], tgt, reduction="sum"))
            count += len(rows)
    return total / count, count


def first_loss(metrics):
    return json.loads(open(metrics).readline())["loss"]


def losses(metrics):
    return [json.loads(l)["loss"] for l in open(metrics)]


def train(name, data, extra, env=None, expect=0):
    out = os.path.join(work, name)
    args = ["train", "--init", model_dir, "--data", data, "--seq", str(T), "--threads", "2", "--no-progress",
            "--metrics", out + ".jsonl"] + extra + ([] if "--lr" in extra else ["--lr", "1e-3"])
    return run(args, env, expect), out + ".jsonl"


def rel(a, b):
    return abs(a - b) / abs(b)


# ---- 1. a corpus with a wide spread of document lengths ----------------------------------------------------------
rng = random.Random(1)
texts = []
for _ in range(160):
    n = int(min(1000, max(10, rng.lognormvariate(math.log(90), 1.0))))  # tokens, with end-of-text
    words, length = [], 0
    while length < n - 1:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8)))
        words.append(w)
        length += len(w) + 1
    texts.append(" ".join(words)[:n - 1])
corpus = os.path.join(work, "corpus.jsonl")
with open(corpus, "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
data_dir = os.path.join(work, "data")
run(["data", "prepare", "--tokenizer", tok_dir, "--input", corpus, "--out", data_dir, "--shard-tokens", "6000"])
docs = read_docs(data_dir, "train")
lengths = [len(t) for t, _ in docs]
check([t for t, _ in docs] == [encode(t) + [EOT] for t in texts],
      f"prepare: {len(docs)} documents of {min(lengths)}..{max(lengths)} tokens (median "
      f"{sorted(lengths)[len(lengths) // 2]}) over {len(os.listdir(data_dir)) // 2} shards")
data = os.path.join(data_dir, "train_*.bin")

# ---- 2. first-step loss: packed == padded == the per-document reference ------------------------------------------
B = 8
first = first_packed(docs, B)
ref, n_targets = reference_loss(docs, first)
_, m_packed = train("packed", data, ["--packing", "--batch", str(B), "--steps", "1", "--data-order", "sequential"])
_, m_padded = train("padded", data, ["--batching", "padded", "--batch", str(len(first)), "--steps", "1",
                                     "--data-order", "sequential"])
lp, ld = first_loss(m_packed), first_loss(m_padded)
real = sum(n for _, _, n in first)
print(f"first micro-batch: {len(first)} sequences ({sum(b > 0 for _, b, _ in first)} pieces of cut documents), "
      f"{real} tokens of {B * T} (packed), "
      f"padding {1 - real / (len(first) * T):.1%} of the padded rows; {n_targets} targets")
check(rel(lp, ref) < 1e-5, f"packed first-step loss {lp:.7f} equals the per-document reference {ref:.7f} "
                          f"(relative {rel(lp, ref):.1e})")
check(rel(ld, ref) < 1e-5, f"padded first-step loss {ld:.7f} equals the per-document reference {ref:.7f} "
                          f"(relative {rel(ld, ref):.1e})")
check(rel(lp, ld) < 1e-5, f"packed and padded first-step losses agree (relative {rel(lp, ld):.1e})")
_, m_packed = train("packed8", data, ["--packing", "--batch", "4", "--steps", "8", "--seed", "3"])
_, m_padded = train("padded8", data, ["--batching", "padded", "--batch", "4", "--steps", "8", "--seed", "3"])
lp8, ld8 = losses(m_packed), losses(m_padded)
check(all(math.isfinite(x) for x in lp8 + ld8) and lp8[-1] < lp8[0] and ld8[-1] < ld8[0],
      f"8 shuffled steps each: packed {lp8[0]:.3f} -> {lp8[-1]:.3f}, padded {ld8[0]:.3f} -> {ld8[-1]:.3f}")

# ---- 3. packed resume ----------------------------------------------------------------------------------------
common = ["--packing", "--batch", "2", "--steps", "10", "--save-every", "3", "--seed", "5"]
_, m_a = train("resume_a", data, common + ["--out", os.path.join(work, "ra")])
train("resume_b", data, common + ["--out", os.path.join(work, "rb")], {"KILN_TEST_KILL_AT_STEP": "5"}, expect=-9)
_, m_b = train("resume_b", data, common + ["--out", os.path.join(work, "rb"), "--resume"])
check(losses(m_a) == losses(m_b) and len(losses(m_b)) == 10,
      "packed run killed after step 5 and resumed from step 3: the same 10 losses")

# ---- 4. supervised fine-tuning data -----------------------------------------------------------------------------
examples = []
srng = random.Random(4)
words = ["alpha", "beta", "gamma", "delta", "kiln", "fire", "clay", "café", "x"]


def phrase(k):
    return " ".join(srng.choice(words) for _ in range(k))


for i in range(30):
    if i % 3 == 0:
        examples.append({"prompt": phrase(srng.randint(0, 12)), "response": phrase(srng.randint(1, 12))})
    else:
        msgs = [{"role": "system", "content": phrase(3)}] if i % 3 == 1 else []
        for _ in range(srng.randint(1, 3)):
            msgs.append({"role": "user", "content": phrase(srng.randint(1, 10))})
            msgs.append({"role": "assistant", "content": phrase(srng.randint(1, 10))})
        if i % 5 == 0:
            msgs.append({"role": "user", "content": "a trailing question"})
        examples.append({"messages": msgs})


def render(ex):
    """The template of train/sft.h: (tokens, mask)."""
    msgs = ex["messages"] if "messages" in ex else [{"role": "user", "content": ex["prompt"]},
                                                    {"role": "assistant", "content": ex["response"]}]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    toks, mask, context = [], [], ""
    for m in msgs[:last + 1]:
        context += f"<|{m['role']}|>\n"
        if m["role"] != "assistant":
            context += m["content"] + "\n"
            continue
        toks += encode(context)
        mask += [0] * len(encode(context))
        context = ""
        toks += encode(m["content"]) + [EOT]
        mask += [1] * (len(encode(m["content"])) + 1)
    return toks, mask


sft_in = os.path.join(work, "sft.jsonl")
with open(sft_in, "w") as f:
    for ex in examples:
        f.write(json.dumps(ex) + "\n")
sft_dir = os.path.join(work, "sft")
r = run(["data", "prepare-sft", "--tokenizer", tok_dir, "--input", sft_in, "--out", sft_dir, "--val-fraction", "0.2",
         "--seed", "3", "--shard-tokens", "1500"])
stats = json.loads(r.stdout)
sft_train, sft_val = read_docs(sft_dir, "train"), read_docs(sft_dir, "val")
want = [render(ex) for ex in examples]
got = sft_train + sft_val
matched = sorted(want.index((t, m)) if (t, m) in want else -1 for t, m in got)
check(matched == list(range(len(examples))) and stats["examples"] == len(examples),
      f"prepare-sft: {stats['train_examples']} train + {stats['val_examples']} val examples, tokens and masks "
      f"equal the template ({stats['trained_tokens']} response tokens)")

first = first_packed(sft_train, 4)
ref, n_targets = reference_loss(sft_train, first)
sdata = os.path.join(sft_dir, "train_*.bin")
_, m_packed = train("sft_packed", sdata, ["--packing", "--batch", "4", "--steps", "1", "--data-order", "sequential"])
_, m_padded = train("sft_padded", sdata, ["--batching", "padded", "--batch", str(len(first)), "--steps", "1",
                                          "--data-order", "sequential"])
lp, ld = first_loss(m_packed), first_loss(m_padded)
check(rel(lp, ref) < 1e-5 and rel(ld, ref) < 1e-5,
      f"SFT first-step loss over {n_targets} response targets of {len(first)} examples: packed {lp:.7f}, "
      f"padded {ld:.7f}, reference {ref:.7f}")
r, m_sft = train("sft_20", sdata, ["--packing", "--batch", "4", "--steps", "20", "--lr", "3e-3", "--val-data",
                                   os.path.join(sft_dir, "val_*.bin"), "--eval-every", "10", "--val-batches", "2"])
ls = losses(m_sft)
val = [json.loads(l)["val_loss"] for l in open(m_sft) if "val_loss" in l]
check(ls[-1] < ls[0] and len(val) == 2 and all(math.isfinite(v) for v in val),
      f"SFT 20 packed steps: loss {ls[0]:.3f} -> {ls[-1]:.3f}, val {val[0]:.3f} -> {val[1]:.3f}")
r, _ = train("sft_rows", sdata, ["--batch", "2", "--steps", "1"], expect=1)
check(b".mask" in r.stderr and b"--packing" in r.stderr, "rows batching refuses masked data: " +
      r.stderr.decode().strip())
bad = os.path.join(work, "bad.jsonl")
with open(bad, "w") as f:
    f.write(json.dumps(examples[0]) + "\n\n" + json.dumps({"prompt": "hi", "response": ""}) + "\n")
r = run(["data", "prepare-sft", "--tokenizer", tok_dir, "--input", bad, "--out", os.path.join(work, "bad")], expect=1)
check(f"{bad}:3: empty response".encode() in r.stderr, "a bad line is reported as file:line: " +
      r.stderr.decode().strip())

print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
