"""The PyTorch peer of bench/moe_bench.cpp: tests/peer/torch_moe.py's Qwen3-MoE block (Hugging Face's
formulation) forward + backward over N tokens, parameters requiring gradients; prints {"ms": median}."""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "peer"))
from torch_moe import qwen3_moe_block  # noqa: E402

ap = argparse.ArgumentParser()
for a in ("threads", "N", "C", "F", "E", "K", "reps"):
    ap.add_argument("--" + a, type=int, required=True)
a = ap.parse_args()
torch.set_num_threads(a.threads)
g = torch.Generator().manual_seed(1)
P, pre = {}, "mlp."
P[pre + "gate.weight"] = 0.02 * torch.randn(a.E, a.C, generator=g)
for e in range(a.E):
    P[f"{pre}experts.{e}.gate_proj.weight"] = 0.02 * torch.randn(a.F, a.C, generator=g)
    P[f"{pre}experts.{e}.up_proj.weight"] = 0.02 * torch.randn(a.F, a.C, generator=g)
    P[f"{pre}experts.{e}.down_proj.weight"] = 0.02 * torch.randn(a.C, a.F, generator=g)
for t in P.values():
    t.requires_grad_(True)
x = torch.randn(a.N, a.C, generator=g, requires_grad=True)
dy = torch.randn(a.N, a.C, generator=g)


def step():
    y = x + qwen3_moe_block(x, P, pre, a.E, a.K, True)
    y.backward(dy)


step()
ms = []
for _ in range(a.reps):
    t0 = time.perf_counter()
    step()
    ms.append(1e3 * (time.perf_counter() - t0))
ms.sort()
print(json.dumps({"ms": ms[len(ms) // 2]}))
