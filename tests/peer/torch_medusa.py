"""Reference Medusa-1 head training in PyTorch, the peer of kiln train --medusa-heads (train/medusa_trainer.h).

Written from the Medusa paper and its repository's ResBlock as a specification, not from kiln's code:
  h = the frozen GPT-2 base's final LayerNorm output (tests/peer/torch_gpt2.py's forward without the LM head)
  head k (k = 1..K):  u = h + SiLU(W_k h + b_k),  logits_k = H_k u;  W_k = 0, b_k = 0, H_k = the LM head (wte)
  head k at position t predicts token t+k+1 (within the row); loss = Σ_k 0.8^k · mean CE_k
  torch's AdamW (decay on W_k and H_k only) with global-norm clipping over the heads, warmup + cosine.
Batches: llm.c's sequential order (B*T+1 consecutive tokens, advancing by B*T), as tests/peer/torch_train_ref.py.
Writes {"losses": [...], "head_losses": [[...] per step], "grad_norms": [...]}.

usage: torch_medusa.py INIT_DIR SHARD OUT_JSON --heads K --batch B --seq T --steps S --lr LR --min-lr M
       --warmup W --weight-decay WD --grad-clip G [--decay 0.8]
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_gpt2  # noqa: E402
from torch_gpt2 import load_checkpoint, read_shard  # noqa: E402

ap = argparse.ArgumentParser()
for a in ["init", "shard", "out_json"]:
    ap.add_argument(a)
for a, t in [("--heads", int), ("--batch", int), ("--seq", int), ("--steps", int), ("--lr", float),
             ("--min-lr", float), ("--warmup", int), ("--weight-decay", float), ("--grad-clip", float)]:
    ap.add_argument(a, type=t, required=True)
ap.add_argument("--decay", type=float, default=0.8)
args = ap.parse_args()
torch.set_num_threads(2)

cfg, P = load_checkpoint(args.init)
for p in P.values():
    p.requires_grad_(False)
C, V, K = cfg["n_embd"], cfg["vocab_size"], args.heads
eps = cfg.get("layer_norm_epsilon", 1e-5)


def hidden(idx):
    """The base's last hidden state (after ln_f), [B, T, C]."""
    return torch_gpt2.hidden(P, cfg, idx)


class ResBlock(torch.nn.Module):  # Medusa's: x + SiLU(Linear(x)), the linear zero-initialised
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(C, C)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)  # kiln starts the bias at 0 too

    def forward(self, x):
        return x + F.silu(self.linear(x))


blocks = [ResBlock() for _ in range(K)]
heads = [torch.nn.Linear(C, V, bias=False) for _ in range(K)]
with torch.no_grad():
    for hd in heads:
        hd.weight.copy_(P["transformer.wte.weight"])  # tied GPT-2: the LM head is the token embedding
decay = [b.linear.weight for b in blocks] + [h.weight for h in heads]
no_decay = [b.linear.bias for b in blocks]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step):
    if args.warmup > 0 and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    ratio = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


toks = read_shard(args.shard)
B, T = args.batch, args.seq
pos = 0
losses, head_losses, norms = [], [], []
for step in range(args.steps):
    opt.zero_grad()
    if pos + B * T + 1 > len(toks):
        pos = 0
    buf = toks[pos: pos + B * T + 1]
    pos += B * T
    x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
    with torch.no_grad():
        h = hidden(x)
    total, per = 0.0, []
    loss = 0
    for k in range(1, K + 1):
        logits = heads[k - 1](blocks[k - 1](h))[:, : T - k]  # position t predicts y[t + k] = token t+k+1
        ce = F.cross_entropy(logits.reshape(-1, V), y[:, k:].reshape(-1))
        loss = loss + args.decay ** k * ce
        per.append(ce.item())
    loss.backward()
    params = decay + no_decay
    norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.step()
    losses.append(loss.item())
    head_losses.append(per)
    norms.append(norm)
    print(f"step {step:3d}  loss {loss.item():.6f}  grad_norm {norm:.4f}", flush=True)
json.dump({"losses": losses, "head_losses": head_losses, "grad_norms": norms}, open(args.out_json, "w"))
