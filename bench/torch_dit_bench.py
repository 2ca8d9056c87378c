"""The PyTorch peer of a kiln DiT training step (bench/dit_vs_torch.sh): tests/peer/torch_dit.py's DiT in float32
with autograd, EDM's loss on a batch of 28×28 one-channel images, torch.optim.AdamW. Prints the median step time.
usage: torch_dit_bench.py --preset S|B --patch P --batch B --steps N --threads T"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "peer"))
from torch_dit import dit_forward, param_names  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="S")
ap.add_argument("--patch", type=int, default=2)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
D, depth, heads = (384, 12, 6) if a.preset == "S" else (768, 12, 12)
cfg = {"image_size": 28, "channels": 1, "patch": a.patch, "hidden": D, "depth": depth, "heads": heads,
       "classes": 10, "freq_dim": 256}
shapes = {"x_embedder.proj.weight": (D, 1, a.patch, a.patch), "t_embedder.mlp.0.weight": (D, 256),
          "t_embedder.mlp.2.weight": (D, D), "y_embedder.embedding_table.weight": (11, D),
          "final_layer.linear.weight": (a.patch * a.patch, D), "final_layer.adaLN_modulation.1.weight": (2 * D, D)}
for l in range(depth):
    b = f"blocks.{l}."
    shapes.update({b + "attn.qkv.weight": (3 * D, D), b + "attn.proj.weight": (D, D), b + "mlp.fc1.weight": (4 * D, D),
                   b + "mlp.fc2.weight": (D, 4 * D), b + "adaLN_modulation.1.weight": (6 * D, D)})
P = {}
for n in param_names(cfg):
    if n in shapes:
        P[n] = (torch.randn(shapes[n]) * 0.02).requires_grad_(True)
    else:  # biases: the size of the weight's first dimension
        P[n] = torch.zeros(shapes[n.replace(".bias", ".weight")][0]).requires_grad_(True)
opt = torch.optim.AdamW(P.values(), lr=1e-4, weight_decay=0.0)
B = a.batch
times = []
for s in range(a.steps + 1):
    x0 = torch.rand(B, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 11, (B,))
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(B))
    eps = torch.randn_like(x0)
    t0 = time.perf_counter()
    sd = 0.5
    bv = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x = x0 + bv(sigma) * eps
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
    F = dit_forward(P, cfg, bv(c_in) * x, torch.log(sigma) / 4, y)
    target = (x0 - bv(c_skip) * x) / bv(c_out)
    loss = ((F - target) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(P.values(), 1.0)
    opt.step()
    if s > 0:
        times.append(time.perf_counter() - t0)
print(json.dumps({"torch_step_seconds_median": statistics.median(times), "steps": a.steps, "batch": B}))
