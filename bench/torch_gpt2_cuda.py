"""PyTorch peers for kiln's GPU benchmarks (run on the GPU machine with its PyTorch 2.x):

  train:    GPT-2 training step as people run it: bf16 autocast, fp32 master weights, fused AdamW,
            scaled_dot_product_attention (flash), optionally torch.compile. Prints tokens/s.
  generate: batch-1 greedy decoding with a bf16 KV cache (static cache, one token per step),
            eager or with CUDA graphs via torch.compile(mode="reduce-overhead"). Prints tokens/s.

usage: torch_gpt2_cuda.py train CONFIG --batch 32 --seq 1024 [--steps 10] [--compile]
       torch_gpt2_cuda.py generate CONFIG --prompt-len 16 --new 256 [--compile]
One JSON line on stdout.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def attn_qkv(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        return [t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v)]

    def finish(self, x, y):
        B, NH, T, HD = y.shape
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, NH * HD))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    def forward(self, x):
        q, k, v = self.attn_qkv(x)
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, V, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(P, C)
        self.h = nn.ModuleList(Block(C, cfg["n_head"]) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(C)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.h:
            x = b(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def train(a, cfg):
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    step_fn = torch.compile(model) if a.compile else model
    V = cfg["vocab_size"]
    idx = torch.randint(0, V, (a.batch, a.seq), device="cuda")
    tgt = torch.randint(0, V, (a.batch, a.seq), device="cuda")
    times = []
    for s in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "compile": a.compile, "batch": a.batch,
                      "seq": a.seq, "ms_per_step": med * 1e3, "tokens_per_s": a.batch * a.seq / med}))


@torch.no_grad()
def generate(a, cfg):
    torch.manual_seed(0)
    model = GPT(cfg).cuda().to(torch.bfloat16).eval()
    L, NH, C = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
    HD, P = C // NH, cfg["n_positions"]
    kc = torch.zeros(L, 1, NH, P, HD, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)

    def step(tok, pos):  # one token at position pos (a 0-d tensor), static shapes throughout
        x = model.wte(tok.view(1, 1)) + model.wpe(pos.view(1))
        mask = (torch.arange(P, device="cuda") <= pos).view(1, 1, 1, P)
        for l, b in enumerate(model.h):
            q, k, v = b.attn_qkv(x)
            kc[l].index_copy_(2, pos.view(1), k)
            vc[l].index_copy_(2, pos.view(1), v)
            y = F.scaled_dot_product_attention(q, kc[l], vc[l], attn_mask=mask)
            x = b.finish(x, y)
        return (model.ln_f(x) @ model.wte.weight.t()).argmax(-1).view(())

    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True) if a.compile else step
    tok = torch.zeros((), dtype=torch.long, device="cuda")
    for i in range(a.prompt_len):  # prompt through the same step (prefill cost is not what is measured)
        tok = fn(torch.tensor(i % 100, device="cuda"), torch.tensor(i, device="cuda"))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(a.prompt_len, a.prompt_len + a.new):
        tok = fn(tok.clone(), torch.tensor(i, device="cuda"))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "compile": a.compile, "new_tokens": a.new,
                      "tokens_per_s": a.new / dt}))


ap = argparse.ArgumentParser()
ap.add_argument("what", choices=["train", "generate"])
ap.add_argument("config")
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--seq", type=int, default=1024)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--prompt-len", type=int, default=16)
ap.add_argument("--new", type=int, default=256)
ap.add_argument("--compile", action="store_true")
a = ap.parse_args()
cfg = json.load(open(a.config))
train(a, cfg) if a.what == "train" else generate(a, cfg)
