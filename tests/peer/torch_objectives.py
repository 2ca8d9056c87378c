"""Each objective's training loss on one batch in PyTorch (float64), in the papers' own forms, as the peer of
models/diffusion.cpp's single (F − T)² form:
  ddpm  ‖ε̂(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t) − ε‖²          linear β 1e-4..0.02 over 1000 steps (Ho et al.)
  ve    λ‖D − x₀‖², λ = 1/σ², D = x + σ·F(x, ln(σ/2))  (EDM's VE preconditioning)
  edm   λ‖D − x₀‖², λ = (σ² + σd²)/(σ·σd)², D = c_skip·x + c_out·F(c_in·x, ln(σ)/4)
  flow  ‖F((1−t)x₀ + tε, t) − (ε − x₀)‖²
  gvp   ‖F(cos(πt/2)x₀ + sin(πt/2)ε, t) − (−(π/2)sin(πt/2)x₀ + (π/2)cos(πt/2)ε)‖²
each the mean over the batch's elements, with the network of torch_dit.py.
usage: torch_objectives.py CONFIG_JSON IN_SAFETENSORS OUT_JSON
  IN: the DiT parameters, x0 [B,C,H,W], eps [B,C,H,W], labels [B], and levels.<objective> [B] for each objective.
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_dit import dit_forward, load_params  # noqa: E402
from torch_gpt2 import read_safetensors  # noqa: E402


def loss(name, P, cfg, x0, eps, y, lv):
    b = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    if name == "ddpm":
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)[lv.long()]
        xt = b(abar.sqrt()) * x0 + b((1 - abar).sqrt()) * eps
        return ((dit_forward(P, cfg, xt, lv, y) - eps) ** 2).mean()
    if name == "ve":
        x = x0 + b(lv) * eps
        D = x + b(lv) * dit_forward(P, cfg, x, torch.log(0.5 * lv), y)
        return (b(1 / lv ** 2) * (D - x0) ** 2).mean()
    if name == "edm":
        sd = 0.5
        x = x0 + b(lv) * eps
        c_skip = sd ** 2 / (lv ** 2 + sd ** 2)
        c_out = lv * sd / (lv ** 2 + sd ** 2).sqrt()
        c_in = 1 / (lv ** 2 + sd ** 2).sqrt()
        D = b(c_skip) * x + b(c_out) * dit_forward(P, cfg, b(c_in) * x, torch.log(lv) / 4, y)
        lam = (lv ** 2 + sd ** 2) / (lv * sd) ** 2
        return (b(lam) * (D - x0) ** 2).mean()
    if name == "flow":
        xt = b(1 - lv) * x0 + b(lv) * eps
        return ((dit_forward(P, cfg, xt, lv, y) - (eps - x0)) ** 2).mean()
    if name == "gvp":
        h = math.pi / 2
        xt = b(torch.cos(h * lv)) * x0 + b(torch.sin(h * lv)) * eps
        v = b(-h * torch.sin(h * lv)) * x0 + b(h * torch.cos(h * lv)) * eps
        return ((dit_forward(P, cfg, xt, lv, y) - v) ** 2).mean()
    raise ValueError(name)


if __name__ == "__main__":
    torch.set_num_threads(2)
    cfg = json.load(open(sys.argv[1]))
    raw = read_safetensors(sys.argv[2])
    P = load_params(raw, cfg)
    x0, eps, y = raw["x0"].double(), raw["eps"].double(), raw["labels"].long()
    out = {}
    for n in ["ddpm", "ve", "edm", "flow", "gvp"]:
        with torch.no_grad():
            out[n] = float(loss(n, P, cfg, x0, eps, y, raw["levels." + n].double()))
    json.dump(out, open(sys.argv[3], "w"))
