"""Reference training run in PyTorch, for GPT-2 (tests/peer/torch_gpt2.py) or the Llama family (llama, mistral,
qwen2, qwen3; tests/peer/torch_llama.py) as --model says: the same shard and batches (llm.c's sequential order: B*T+1
consecutive tokens per micro-batch, advancing by B*T, back to the start when the shard runs out), AdamW with decay
on tensors of two or more dimensions only, global-norm clipping, warmup + cosine, gradient accumulation, and the
loss of a step the mean over all of its targets. Uses torch's own AdamW and clip_grad_norm_. Writes
{"losses": [...], "grad_norms": [...]} (norms before clipping) and the final weights with Hugging Face names.

usage: torch_train_ref.py INIT_DIR SHARD OUT_JSON OUT_SAFETENSORS --batch B --seq T --grad-accum A --steps K
       --lr LR --min-lr M --warmup W --weight-decay WD --grad-clip G [--model gpt2|llama] [--schedule cosine|constant] [--float64]
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ap = argparse.ArgumentParser()
for a in ["init", "shard", "out_json", "out_weights"]:
    ap.add_argument(a)
for a, t in [("--batch", int), ("--seq", int), ("--grad-accum", int), ("--steps", int), ("--lr", float),
             ("--min-lr", float), ("--warmup", int), ("--weight-decay", float), ("--grad-clip", float)]:
    ap.add_argument(a, type=t, required=True)
ap.add_argument("--schedule", default="cosine")
ap.add_argument("--beta2", type=float, default=0.95)
ap.add_argument("--float64", action="store_true")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--model", choices=["gpt2", "llama", "deepseek"], default="gpt2")
ap.add_argument("--mtp-lambda", type=float, default=0.3)
args = ap.parse_args()
if args.model == "gpt2":
    from torch_gpt2 import forward, load_checkpoint, read_shard, write_safetensors  # noqa: E402
elif args.model == "llama":
    from torch_llama import forward, load_checkpoint, read_shard, write_safetensors  # noqa: E402
else:
    from torch_deepseek import forward, load_checkpoint, losses as ds_losses, read_shard, write_safetensors  # noqa

torch.set_num_threads(args.threads)
dtype = torch.float64 if args.float64 else torch.float32
cfg, P = load_checkpoint(args.init, dtype)
toks = read_shard(args.shard)
assert int(toks.max()) < cfg["vocab_size"], "shard has ids outside the vocabulary"
decay = [p for p in P.values() if p.dim() >= 2]
no_decay = [p for p in P.values() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, args.beta2), eps=1e-8)


def lr_at(step):
    if args.warmup > 0 and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    ratio = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


B, T, A = args.batch, args.seq, args.grad_accum
n_targets = A * B * T
pos = 0
losses, norms, main_losses, mtp_losses = [], [], [], []
for step in range(args.steps):
    opt.zero_grad()
    total = main_total = mtp_total = 0.0
    for micro in range(A):
        if pos + B * T + 1 > len(toks):
            pos = 0
        buf = toks[pos: pos + B * T + 1]
        pos += B * T
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        if args.model == "deepseek":
            # DeepSeek-V3's objective: main + lambda/D * sum of the D MTP depths' losses (each over n_targets).
            main, mtp = ds_losses(P, cfg, x, y)
            loss_sum = main + (args.mtp_lambda / len(mtp)) * sum(mtp) if mtp else main
            main_total += main.item() / n_targets
            if mtp:
                mtp_total += float(sum(m.item() for m in mtp)) / len(mtp) / n_targets
        else:
            logits = forward(P, cfg, x)
            loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        (loss_sum / n_targets).backward()
        total += loss_sum.item() / n_targets
    params = [p for p in P.values() if p.requires_grad]
    if args.grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
    else:
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    opt.step()
    losses.append(total)
    main_losses.append(main_total)
    mtp_losses.append(mtp_total)
    norms.append(norm)
    print(f"step {step:3d}  loss {total:.6f}  grad_norm {norm:.4f}  lr {lr_at(step):.3e}", flush=True)

json.dump({"losses": losses, "grad_norms": norms, "main_losses": main_losses, "mtp_losses": mtp_losses},
          open(args.out_json, "w"))
write_safetensors(args.out_weights, P)
