"""The PyTorch peer of `kiln sample --sampler edm-heun` (bench/dit_sample_vs_torch.sh): a kiln DiT checkpoint's
weights (model.safetensors or ema.safetensors, the reference's tensor names) in tests/peer/torch_dit.py's DiT, in
float32 under torch.inference_mode() with torch's fused attention (F.scaled_dot_product_attention, where this torch
has it; the reference's softmax(q·kᵀ/√d)·v before 2.0) and the fixed positions computed once, driven by EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 2 without churn:
σ_i = (σmax^(1/ρ) + i/(N−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, then 0; 2N − 1 evaluations). Classifier-free guidance
F = F(∅) + w·(F(c) − F(∅)) runs the conditional and unconditional halves as one batch of 2K. Labels k mod classes
(kiln sample's default). Prints the sampling time (network and sampler, not the loading) and writes the samples.
usage: torch_dit_sample_bench.py --model CKPT_DIR --noise NOISE.safetensors --out OUT.safetensors
       [--weights model|ema] [--steps 18] [--guidance 1] [--threads 2]
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "peer"))
from torch_dit import modulate, param_names, pos_embed_2d, timestep_embedding  # noqa: E402
from torch_gpt2 import read_safetensors, write_safetensors  # noqa: E402


def make_net(P, cfg):
    """F(x; c_noise, y) of tests/peer/torch_dit.py's dit_forward, float32, attention by SDPA."""
    D, p, C, H, nh = cfg["hidden"], cfg["patch"], cfg["channels"], cfg["image_size"], cfg["heads"]
    G = H // p
    pos = torch.from_numpy(pos_embed_2d(D, G)).to(torch.float32)[None]
    sdpa = hasattr(F, "scaled_dot_product_attention")  # torch >= 2.0; before it, the reference's explicit softmax
    ada = [(P[f"blocks.{l}.adaLN_modulation.1.weight"], P[f"blocks.{l}.adaLN_modulation.1.bias"])
           for l in range(cfg["depth"])]

    def net(x, t, y):
        B = x.shape[0]
        h = F.conv2d(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], stride=p)
        h = h.flatten(2).transpose(1, 2) + pos
        te = timestep_embedding(t, cfg["freq_dim"]).to(torch.float32)
        te = F.linear(F.silu(F.linear(te, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])),
                      P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
        c = te + P["y_embedder.embedding_table.weight"][y]
        sc = F.silu(c)
        for l in range(cfg["depth"]):
            b = f"blocks.{l}."
            sh1, sc1, g1, sh2, sc2, g2 = F.linear(sc, *ada[l]).chunk(6, dim=1)
            a = modulate(F.layer_norm(h, (D,), eps=1e-6), sh1, sc1)
            qkv = F.linear(a, P[b + "attn.qkv.weight"], P[b + "attn.qkv.bias"])
            T = qkv.shape[1]
            q, k, v = qkv.reshape(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
            if sdpa:
                att = F.scaled_dot_product_attention(q, k, v)
            else:
                att = torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(D // nh)), dim=-1) @ v
            att = att.transpose(1, 2).reshape(B, T, D)
            h = h + g1.unsqueeze(1) * F.linear(att, P[b + "attn.proj.weight"], P[b + "attn.proj.bias"])
            m = modulate(F.layer_norm(h, (D,), eps=1e-6), sh2, sc2)
            m = F.linear(F.gelu(F.linear(m, P[b + "mlp.fc1.weight"], P[b + "mlp.fc1.bias"]), approximate="tanh"),
                         P[b + "mlp.fc2.weight"], P[b + "mlp.fc2.bias"])
            h = h + g2.unsqueeze(1) * m
        sh, scf = F.linear(sc, P["final_layer.adaLN_modulation.1.weight"],
                           P["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
        h = F.linear(modulate(F.layer_norm(h, (D,), eps=1e-6), sh, scf), P["final_layer.linear.weight"],
                     P["final_layer.linear.bias"])
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(B, G, G, p, p, C))
        return h.reshape(B, C, G * p, G * p)

    return net


def edm_heun(net, noise, y, null, w, N, smin=0.002, smax=80.0, rho=7.0, sd=0.5):
    sig = [(smax ** (1 / rho) + (i / (N - 1) if N > 1 else 0.0) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
           for i in range(N)] + [0.0]
    B = noise.shape[0]
    yy = torch.cat([y, torch.full_like(y, null)]) if w != 1 else y
    nfe = [0]

    def denoise(x, s):  # D(x; σ) = c_skip·x + c_out·F(c_in·x; ln(σ)/4), guided
        v = s * s + sd * sd
        xin = x / math.sqrt(v)
        t = torch.full((yy.shape[0],), 0.25 * math.log(s), dtype=torch.float64)
        Fo = net(torch.cat([xin, xin]) if w != 1 else xin, t, yy)
        if w != 1:
            Fo = Fo[B:] + w * (Fo[:B] - Fo[B:])
        nfe[0] += 1
        return sd * sd / v * x + s * sd / math.sqrt(v) * Fo

    x = noise * sig[0]
    for i in range(N):
        si, sn = sig[i], sig[i + 1]
        d = (x - denoise(x, si)) / si
        xn = x + (sn - si) * d
        if sn > 0:
            d2 = (xn - denoise(xn, sn)) / sn
            xn = x + (sn - si) * 0.5 * (d + d2)
        x = xn
    return x, nfe[0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--noise", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default="model", choices=["model", "ema"])
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    raw = read_safetensors(os.path.join(a.model, f"{a.weights}.safetensors"))
    P = {n: raw[n].contiguous() for n in param_names(cfg)}
    noise = read_safetensors(a.noise)["noise"]
    K = noise.shape[0]
    y = torch.arange(K) % cfg["classes"]
    net = make_net(P, cfg)
    with torch.inference_mode():
        t0 = time.perf_counter()
        x, nfe = edm_heun(net, noise, y, cfg["classes"], a.guidance, a.steps)
        secs = time.perf_counter() - t0
    write_safetensors(a.out, {"images": x})
    print(json.dumps({"seconds": secs, "images_per_second": K / secs, "nfe": nfe, "count": K,
                      "torch": torch.__version__, "sdpa": hasattr(F, "scaled_dot_product_attention")}))
