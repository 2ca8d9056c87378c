"""PyTorch peer of bench/dist_train.sh: the same GPT-2 training step (tests/peer/torch_gpt2.py; forward,
backward, clipping, AdamW) under DistributedDataParallel with the gloo backend on N processes of one thread
each, every process a share of the same global batch; DDP all-reduces gradient buckets during the backward.
Timed per step on rank 0 (median after warm-up); prints one JSON line.

usage: torch_ddp_bench.py CONFIG_JSON --batch B (global) --seq T --steps K [--ranks 2]
Run with LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp so torch uses OpenBLAS.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "peer"))
from torch_gpt2 import forward, param_names, param_shape  # noqa: E402


class GPT2(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.names = cfg, param_names(cfg)
        self.ps = torch.nn.ParameterList()
        for n in self.names:
            s = param_shape(cfg, n)
            self.ps.append(torch.nn.Parameter(torch.randn(s) * 0.02 if len(s) > 1 else torch.ones(s)))

    def forward(self, x):
        return forward(dict(zip(self.names, self.ps)), self.cfg, x)


def worker(rank, a, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.ranks)
    cfg = json.load(open(a.config))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT2(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    V, b = cfg["vocab_size"], a.batch // a.ranks
    g = torch.Generator().manual_seed(rank)
    times = []
    for s in range(a.warmup + a.steps):
        x = torch.randint(0, V, (b, a.seq), generator=g)
        y = torch.randint(0, V, (b, a.seq), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    if rank == 0:
        times.sort()
        med = times[len(times) // 2]
        print(json.dumps({"bench": "ddp", "peer": "pytorch " + torch.__version__ + " DDP gloo", "ranks": a.ranks,
                          "ms_per_step": med, "tokens_per_s": a.batch * a.seq / (med / 1e3)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args()
    assert a.batch % a.ranks == 0, "--batch (global) must divide over --ranks"
    mp.spawn(worker, args=(a, 29500 + os.getpid() % 1000), nprocs=a.ranks)
