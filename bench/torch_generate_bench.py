"""PyTorch peer for kiln's greedy generation: a GPT-2 with random weights (fp32, CPU, torch.no_grad) decoding
at batch 1 with a preallocated KV cache, timed as kiln is (prefill of the prompt in one pass, then one token
at a time; tokens/s of each phase). Prints one JSON line.

usage: torch_generate_bench.py CONFIG_JSON [--prompt-len P] [--max-new N] [--threads T] [--repeats R]
Run with LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp so torch uses OpenBLAS.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--prompt-len", type=int, default=16)
ap.add_argument("--max-new", type=int, default=128)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the best is reported")
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = json.load(open(a.config))
C, V, L, H, NP = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"]
D = C // H
eps = cfg.get("layer_norm_epsilon", 1e-5)
assert a.prompt_len + a.max_new <= NP, "prompt + new tokens exceed n_positions"

# Random GPT-2 weights in Hugging Face's Conv1D layout (x @ W + b).
wte, wpe = torch.randn(V, C) * 0.02, torch.randn(NP, C) * 0.01
layers = []
for _ in range(L):
    layers.append(dict(ln1_w=torch.ones(C), ln1_b=torch.zeros(C), attn_w=torch.randn(C, 3 * C) * 0.02,
                       attn_b=torch.zeros(3 * C), proj_w=torch.randn(C, C) * 0.02, proj_b=torch.zeros(C),
                       ln2_w=torch.ones(C), ln2_b=torch.zeros(C), fc_w=torch.randn(C, 4 * C) * 0.02,
                       fc_b=torch.zeros(4 * C), fcp_w=torch.randn(4 * C, C) * 0.02, fcp_b=torch.zeros(C)))
lnf_w, lnf_b = torch.ones(C), torch.zeros(C)


def step(idx, start, kc, vc):
    """Runs tokens idx [1, T] at positions start.. through the model, appending K/V to the caches
    (kc/vc[l]: [1, H, NP, D]); returns the logits of the last position [V]."""
    T = idx.shape[1]
    x = wte[idx] + wpe[start:start + T]
    end = start + T
    for l, p in enumerate(layers):
        h = F.layer_norm(x, (C,), p["ln1_w"], p["ln1_b"], eps)
        qkv = torch.addmm(p["attn_b"], h.view(T, C), p["attn_w"]).view(1, T, 3 * C)
        q, k, v = qkv.split(C, dim=2)
        q = q.view(1, T, H, D).transpose(1, 2)
        kc[l][:, :, start:end] = k.view(1, T, H, D).transpose(1, 2)
        vc[l][:, :, start:end] = v.view(1, T, H, D).transpose(1, 2)
        K, Vv = kc[l][:, :, :end], vc[l][:, :, :end]
        att = (q @ K.transpose(-2, -1)) / math.sqrt(D)
        if T > 1:  # causal within the new block; every cached position is visible
            mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start)
            att = att.masked_fill(~mask, float("-inf"))
        y = (att.softmax(dim=-1) @ Vv).transpose(1, 2).reshape(T, C)
        x = x + torch.addmm(p["proj_b"], y, p["proj_w"]).view(1, T, C)
        h = F.layer_norm(x, (C,), p["ln2_w"], p["ln2_b"], eps)
        h = F.gelu(torch.addmm(p["fc_b"], h.view(T, C), p["fc_w"]), approximate="tanh")
        x = x + torch.addmm(p["fcp_b"], h, p["fcp_w"]).view(1, T, C)
    x = F.layer_norm(x[:, -1], (C,), lnf_w, lnf_b, eps)
    return (x @ wte.t())[0]


def generate(prompt):
    kc = [torch.zeros(1, H, NP, D) for _ in range(L)]
    vc = [torch.zeros(1, H, NP, D) for _ in range(L)]
    t0 = time.perf_counter()
    logits = step(prompt, 0, kc, vc)
    t1 = time.perf_counter()
    out = [int(logits.argmax())]
    pos = prompt.shape[1]
    for _ in range(a.max_new - 1):
        logits = step(torch.tensor([[out[-1]]]), pos, kc, vc)
        pos += 1
        out.append(int(logits.argmax()))
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


prompt = torch.randint(0, V, (1, a.prompt_len))
with torch.no_grad():
    generate(prompt)  # warm-up
    runs = [generate(prompt) for _ in range(a.repeats)]
prefill = min(r[1] for r in runs)
decode = min(r[2] for r in runs)
print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "prompt_tokens": a.prompt_len, "new_tokens": a.max_new,
                  "prefill_tokens_per_s": a.prompt_len / prefill,
                  "decode_tokens_per_s": (a.max_new - 1) / decode}))
