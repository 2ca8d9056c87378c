"""PyTorch peer for `kiln bench train`: the same training step (forward, backward, AdamW with clipping) of a GPT-2
(tests/peer/torch_gpt2.py) or a Llama-family model (tests/peer/torch_llama.py, by the config's model_type) on the
CPU, in fp32 or under bf16 autocast, timed the same way (median over steps after warm-up). Prints one JSON line.

usage: torch_train_bench.py CONFIG_JSON --batch B --seq T --steps K [--threads N] [--dtype fp32|bf16]
Run with LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp so torch uses OpenBLAS.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "peer"))

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=64)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
a = ap.parse_args()
torch.set_num_threads(a.threads)
cfg = json.load(open(a.config))
if cfg.get("model_type", "gpt2") == "gpt2":
    from torch_gpt2 import forward, param_names, param_shape  # noqa: E402
    C, V, L, learned, q_dim = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"], cfg["n_positions"], cfg["n_embd"]
else:
    from torch_llama import forward, param_names, param_shape, resolve  # noqa: E402
    r = resolve(cfg)
    C, V, L, learned = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], 0
    q_dim = r["H"] * r["D"]
P = {}
for n in param_names(cfg):
    s = param_shape(cfg, n)
    P[n] = (torch.randn(s) * 0.02 if len(s) > 1 else torch.ones(s)).requires_grad_(True)
opt = torch.optim.AdamW(list(P.values()), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
x = torch.randint(0, V, (a.batch, a.seq))
y = torch.randint(0, V, (a.batch, a.seq))
times = []
for s in range(a.warmup + a.steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
        logits = forward(P, cfg, x)
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, V), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(P.values()), 1.0)
    opt.step()
    dt = (time.perf_counter() - t0) * 1e3
    if s >= a.warmup:
        times.append(dt)
times.sort()
med = times[len(times) // 2]
n_params = sum(p.numel() for p in P.values())
n_matmul = n_params - learned * C
flops = (6 * n_matmul + 12 * L * a.seq * q_dim) * a.batch * a.seq
print(json.dumps({"bench": "train", "peer": "pytorch " + torch.__version__, "dtype": a.dtype, "ms_per_step": med,
                  "tokens_per_s": a.batch * a.seq / (med / 1e3), "gflops": flops / (med / 1e3) / 1e9,
                  "blas": sorted({l.split()[-1] for l in open("/proc/self/maps") if "blas" in l})}))
