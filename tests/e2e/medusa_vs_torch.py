"""End-to-end check: kiln train --medusa-heads (Medusa-1) against the PyTorch reference tests/peer/torch_medusa.py.

Both start from the same random GPT-2 base written here and read the same shard in llm.c's sequential order; the
heads train with AdamW (weight decay, clipping low enough to engage, warmup + cosine). Per-step losses (the
weighted total and each head's) must agree to 1e-4; then kiln generate decodes with the trained heads and its
greedy output must equal plain greedy output.

usage: medusa_vs_torch.py KILN_BINARY WORK_DIR
"""
import json
import os
import struct
import subprocess
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "peer"))
from torch_gpt2 import random_weights, write_safetensors  # noqa: E402

kiln, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
cfg = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 211, "n_positions": 48, "layer_norm_epsilon": 1e-5}
init = os.path.join(work, "init")
os.makedirs(init, exist_ok=True)
json.dump(cfg, open(os.path.join(init, "config.json"), "w"))
W, g = random_weights(cfg, 4321, 0.02, 0.05)
write_safetensors(os.path.join(init, "model.safetensors"), W)
n_tok = 4000
toks = [(7 * i + (i // 13) * 3 + int(torch.randint(0, 4, (1,), generator=g))) % cfg["vocab_size"] for i in range(n_tok)]
shard = os.path.join(work, "data.bin")
with open(shard, "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n_tok, *([0] * 253)))
    f.write(struct.pack(f"<{n_tok}H", *toks))

K = 3
hp = dict(batch=4, seq=32, steps=8, lr=3e-3, min_lr=3e-4, warmup=2, weight_decay=0.1, grad_clip=0.5)
flags = ["--" + k.replace("_", "-") + "=" + str(v) for k, v in hp.items()]
out, metrics = os.path.join(work, "kiln_out"), os.path.join(work, "metrics.jsonl")
subprocess.run([kiln, "train", "--medusa-heads", str(K), "--init", init, "--data", shard, "--data-order",
                "sequential", "--threads", "2", "--out", out, "--metrics", metrics] + flags, check=True)
ref_json = os.path.join(work, "ref.json")
subprocess.run([sys.executable, os.path.join(here, "..", "peer", "torch_medusa.py"), init, shard, ref_json,
                "--heads", str(K)] + flags, check=True)
ours = [json.loads(l) for l in open(metrics)]
ref = json.load(open(ref_json))
ok = len(ours) == hp["steps"]
for m, rl, rh in zip(ours, ref["losses"], ref["head_losses"]):
    d = max([abs(m["loss"] - rl)] + [abs(m[f"medusa_loss_{k + 1}"] - rh[k]) for k in range(K)])
    print(f"step {m['step']:3d}  kiln {m['loss']:.6f}  torch {rl:.6f}  worst |diff| over total and heads {d:.2e}")
    ok &= d <= 1e-4

# Decoding with the trained heads: greedy Medusa output equals plain greedy output.
def gen(*extra):
    r = subprocess.run([kiln, "generate", "--model", os.path.join(out, "latest"), "--prompt-ids", "5,12,19",
                        "--max-new", "40", "--temperature", "0", "--json", "--eot-id", "-1", *extra],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout)
plain, med = gen("--no-medusa"), gen()
print("medusa:", med["medusa"])
ok &= plain["tokens"] == med["tokens"] and med["medusa"]["heads"] == K
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
