"""End-to-end check: kiln train --medusa-heads K --medusa-joint (Medusa-2) against PyTorch autograd.

Medusa-2 trains the base and the heads together on one weighted loss (train/medusa_trainer.h):
    loss = CE_base + w · Σ_k decay^k · CE_k
CE_base: the base's mean next-token cross-entropy; CE_k: head k's (1-based, predicting the token k+1 places past
the next one, within the row) mean cross-entropy; head k: u = h + SiLU(W_k h + b_k), logits_k = H_k u, on the
base's final LayerNorm output h. Written here from that definition (GPT-2 from tests/peer/torch_gpt2.py), not from
kiln's code.

Both start from the same random GPT-2 base and the same random heads (init/medusa.safetensors, so kiln continues
from them instead of its zero initialisation) and read the same shard in llm.c's sequential order.
  1. The first step's batch: kiln's loss terms (total, base, each head) and every gradient tensor it writes
     (--medusa-grads-out: the base's and the heads', before clipping) against torch's autograd on the same batch.
     Per tensor: max |kiln − torch| <= 1e-5 + 2e-4 · max |torch|.
  2. Eight steps of AdamW on both parts (weight decay on matrices, each part clipped by its own global norm,
     warmup + cosine), per-step losses within 1e-4.

usage: medusa2_vs_torch.py KILN_BINARY WORK_DIR
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
import torch_gpt2  # noqa: E402
from torch_gpt2 import random_weights, read_safetensors, read_shard, write_safetensors  # noqa: E402

kiln, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
torch.set_num_threads(2)
cfg = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 211, "n_positions": 48, "layer_norm_epsilon": 1e-5}
C, V, K = cfg["n_embd"], cfg["vocab_size"], 3
decay_w, heads_w = 0.8, 0.2
init = os.path.join(work, "init")
os.makedirs(init, exist_ok=True)
json.dump(cfg, open(os.path.join(init, "config.json"), "w"))
W, g = random_weights(cfg, 2468, 0.02, 0.05)
write_safetensors(os.path.join(init, "model.safetensors"), W)
# Heads off their zero start, so every path of the gradient carries weight.
heads0 = {}
for k in range(K):
    heads0[f"medusa.{k}.res.weight"] = 0.05 * torch.randn(C, C, generator=g)
    heads0[f"medusa.{k}.res.bias"] = 0.05 * torch.randn(C, generator=g)
    heads0[f"medusa.{k}.head.weight"] = W["transformer.wte.weight"] + 0.02 * torch.randn(V, C, generator=g)
write_safetensors(os.path.join(init, "medusa.safetensors"), heads0)
n_tok = 4000
toks = [(5 * i + (i // 11) * 7 + int(torch.randint(0, 5, (1,), generator=g))) % V for i in range(n_tok)]
shard = os.path.join(work, "data.bin")
with open(shard, "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n_tok, *([0] * 253)))
    f.write(struct.pack(f"<{n_tok}H", *toks))

hp = dict(batch=4, seq=32, steps=8, lr=3e-3, min_lr=3e-4, warmup=2, weight_decay=0.1, grad_clip=0.5)
flags = ["--" + k.replace("_", "-") + "=" + str(v) for k, v in hp.items()]
out, metrics, grads_file = (os.path.join(work, n) for n in ("kiln_out", "metrics.jsonl", "grads.safetensors"))
subprocess.run([kiln, "train", "--medusa-heads", str(K), "--medusa-joint", "--init", init, "--data", shard,
                "--data-order", "sequential", "--threads", "2", "--out", out, "--metrics", metrics,
                "--medusa-grads-out", grads_file, f"--medusa-decay={decay_w}", f"--medusa-heads-weight={heads_w}"]
               + flags, check=True)
ours = [json.loads(l) for l in open(metrics)]
kg = read_safetensors(grads_file)

# ---- the reference ----
base = {n: t.clone().requires_grad_(True) for n, t in W.items()}
heads = {n: t.clone().requires_grad_(True) for n, t in heads0.items()}
eps = cfg["layer_norm_epsilon"]


def hidden(P, idx):
    """GPT-2's final LayerNorm output [B, T, C] (torch_gpt2.forward without the LM head)."""
    return torch_gpt2.hidden(P, cfg, idx)


def joint_loss(x, y):
    """(total, base CE, [head CEs]) of Medusa-2's weighted loss on one batch."""
    T = x.shape[1]
    h = hidden(base, x)
    base_ce = F.cross_entropy((h @ base["transformer.wte.weight"].t()).reshape(-1, V), y.reshape(-1))
    total, per = base_ce, []
    for k in range(1, K + 1):
        pre = f"medusa.{k - 1}."
        u = h + F.silu(h @ heads[pre + "res.weight"].t() + heads[pre + "res.bias"])
        logits = (u @ heads[pre + "head.weight"].t())[:, : T - k]  # position t predicts y[t + k]
        ce = F.cross_entropy(logits.reshape(-1, V), y[:, k:].reshape(-1))
        total = total + heads_w * decay_w ** k * ce
        per.append(ce)
    return total, base_ce, per


toks_t = read_shard(shard)
B, T = hp["batch"], hp["seq"]
ok = len(ours) == hp["steps"]


def batch(step):
    # llm.c's sequential order: B*T+1 consecutive tokens, advancing by B*T (no wrap in 8 steps of 4000 tokens).
    buf = toks_t[step * B * T: step * B * T + B * T + 1]
    return buf[:-1].view(B, T), buf[1:].view(B, T)


# 1. The first batch: loss terms and every gradient.
x, y = batch(0)
total, base_ce, per = joint_loss(x, y)
total.backward()
m = ours[0]
d = max([abs(m["loss"] - total.item()), abs(m["base_loss"] - base_ce.item())] +
        [abs(m[f"medusa_loss_{k + 1}"] - per[k].item()) for k in range(K)])
print(f"step 1 loss: kiln {m['loss']:.6f} torch {total.item():.6f}; worst |diff| over total, base and heads {d:.2e}")
ok &= d <= 1e-5
ref_grads = {n.removeprefix("transformer."): p.grad for n, p in list(base.items()) + list(heads.items())}
kiln_grads = {n.removeprefix("transformer."): t for n, t in kg.items()}
missing = sorted(set(ref_grads) ^ set(kiln_grads))
if missing:
    print("gradient tensors on one side only:", missing)
    ok = False
worst = 0.0
for n in sorted(set(ref_grads) & set(kiln_grads)):
    r, k_ = ref_grads[n].reshape(-1), kiln_grads[n].reshape(-1).to(torch.float32)
    err, scale = float((r - k_).abs().max()), float(r.abs().max())
    good = r.shape == k_.shape and err <= 1e-5 + 2e-4 * scale
    worst = max(worst, err / (scale + 1e-12))
    if not good:
        print(f"  gradient {n}: max |diff| {err:.3e}, max |torch| {scale:.3e}  MISMATCH")
    ok &= good
print(f"{len(ref_grads)} gradient tensors (base and heads); worst max|diff| / max|grad| {worst:.2e}")

# 2. Eight steps: AdamW on the base and on the heads (decay on matrices), each clipped by its own norm.
def adamw(params):
    dec = [p for p in params if p.dim() >= 2]
    nodec = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": dec, "weight_decay": hp["weight_decay"]},
                              {"params": nodec, "weight_decay": 0.0}], lr=hp["lr"], betas=(0.9, 0.95), eps=1e-8)


def lr_at(step):
    if hp["warmup"] > 0 and step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    ratio = min(1.0, (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"]))
    return hp["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (hp["lr"] - hp["min_lr"])


opt_b, opt_h = adamw(list(base.values())), adamw(list(heads.values()))
for step in range(hp["steps"]):
    for o in (opt_b, opt_h):
        o.zero_grad()
    x, y = batch(step)
    total, _, _ = joint_loss(x, y)
    total.backward()
    for o, ps in ((opt_b, base.values()), (opt_h, heads.values())):
        torch.nn.utils.clip_grad_norm_(list(ps), hp["grad_clip"])
        for gr in o.param_groups:
            gr["lr"] = lr_at(step)
        o.step()
    if step < len(ours):
        diff = abs(ours[step]["loss"] - total.item())
        print(f"step {step + 1:3d}  kiln {ours[step]['loss']:.6f}  torch {total.item():.6f}  |diff| {diff:.2e}")
        ok &= diff <= 1e-4
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
