"""Reference training run in PyTorch: the same model, shard, batches (llm.c's sequential order),
AdamW with decay on matrices only, global-norm clipping and the warmup + cosine schedule, written with
torch's own AdamW and clip_grad_norm_. Prints per-step losses and writes the final weights.

usage: torch_train_ref.py INIT_DIR SHARD OUT_JSON OUT_SAFETENSORS --batch B --seq T --grad-accum A --steps K
       --lr LR --min-lr M --warmup W --weight-decay WD --grad-clip G [--schedule cosine|constant] [--float64]
"""
import argparse
import json
import math
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from torch_gpt2 import forward, load_checkpoint, read_shard, write_safetensors  # noqa: E402

ap = argparse.ArgumentParser()
for a in ["init", "shard", "out_json", "out_weights"]:
    ap.add_argument(a)
for a, t in [("--batch", int), ("--seq", int), ("--grad-accum", int), ("--steps", int), ("--lr", float),
             ("--min-lr", float), ("--warmup", int), ("--weight-decay", float), ("--grad-clip", float)]:
    ap.add_argument(a, type=t, required=True)
ap.add_argument("--schedule", default="cosine")
ap.add_argument("--beta2", type=float, default=0.95)
ap.add_argument("--float64", action="store_true")
args = ap.parse_args()

torch.set_num_threads(2)
dtype = torch.float64 if args.float64 else torch.float32
cfg, P = load_checkpoint(args.init, dtype)
toks = read_shard(args.shard)
decay = [p for n, p in P.items() if p.dim() >= 2]
no_decay = [p for n, p in P.items() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, args.beta2), eps=1e-8)


def lr_at(step):
    if args.warmup > 0 and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    ratio = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


B, T = args.batch, args.seq
pos = 0
losses, norms = [], []
for step in range(args.steps):
    opt.zero_grad()
    total = 0.0
    for micro in range(args.grad_accum):
        if pos + B * T + 1 > len(toks):
            pos = 0
        buf = toks[pos : pos + B * T + 1]
        pos += B * T
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        logits = forward(P, cfg, x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        (loss / args.grad_accum).backward()
        total += loss.item() / args.grad_accum
    norm = torch.nn.utils.clip_grad_norm_(list(P.values()), args.grad_clip) if args.grad_clip > 0 else None
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.step()
    losses.append(total)
    norms.append(float(norm) if norm is not None else None)

json.dump({"losses": losses, "grad_norms": norms}, open(args.out_json, "w"))
write_safetensors(args.out_weights, P)
