"""A RealNVP flow in PyTorch, written from the papers (Dinh et al. 2017 RealNVP; NICE 2015; Glow's actnorm) and the
layer list of kiln's models/realnvp.h, as the peer of models/realnvp.cpp. Float64 throughout. The log-determinant
is computed two ways: by the layers (the sum of their log-scales) and from autograd's full Jacobian dz/dx of each
image (torch.autograd.functional.jacobian, then slogdet), so the layers' bookkeeping is checked against the map.

usage: torch_realnvp.py CONFIG_JSON IN_SAFETENSORS OUT_SAFETENSORS
  IN holds the parameters (layers.L.* names), x [B,C,H,W] and w [B] (the weights of sum_b w_b log p(x_b));
  OUT gets z [B,P], logdet [B], logdet_jacobian [B], logp [B], loss = sum_b w_b log p(x_b), inverse = f^-1(z),
  dx = d loss/dx, grad.<name> = d loss/d<name>.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import read_safetensors, write_safetensors  # noqa: E402

dt = torch.float64


def build(cfg):
    """The layer list: ("actnorm", C, H, W), ("coupling", A, T), ("squeeze", C, H, W), ("factor", n)."""
    C, H, W = cfg["channels"], cfg["image_size"], cfg["image_size"]
    layers = []

    def coupling(mask):  # mask [C, H, W] bool: True conditions
        layers.append(("actnorm", C, H, W))
        flat = mask.reshape(-1)
        layers.append(("coupling", torch.nonzero(flat).reshape(-1), torch.nonzero(~flat).reshape(-1)))

    def checker(parity):
        i = torch.arange(H).reshape(H, 1)
        j = torch.arange(W).reshape(1, W)
        coupling((((i + j) % 2) == parity).expand(C, H, W))

    def channel(first):
        c = torch.arange(C).reshape(C, 1, 1)
        coupling(((c < C // 2) if first else (c >= C // 2)).expand(C, H, W))

    for _ in range(cfg["scales"]):
        for k in range(cfg["couplings"]):
            checker(k % 2)
        layers.append(("squeeze", C, H, W))
        C, H, W = 4 * C, H // 2, W // 2
        for k in range(cfg["couplings"]):
            channel(k % 2 == 0)
        layers.append(("factor", C * H * W))
        C //= 2
    for k in range(cfg["final_couplings"]):
        checker(k % 2)
    return layers


def squeeze(x, C, H, W):  # [B, C*H*W] -> [B, 4C * H/2 * W/2], channel c*4 + 2*di + dj
    B = x.shape[0]
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(B, -1)


def unsqueeze(y, C, H, W):
    B = y.shape[0]
    y = y.reshape(B, C, 2, 2, H // 2, W // 2).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(B, -1)


def mlp(p, name, h, depth):
    for k in range(depth + 1):
        h = F.linear(h, p[f"{name}.mlp.{k}.weight"], p[f"{name}.mlp.{k}.bias"])
        if k < depth:
            h = F.gelu(h, approximate="tanh")
    return h


def forward(cfg, layers, p, x):
    """x [B, P] -> z [B, P], logdet [B]."""
    B = x.shape[0]
    logdet = torch.zeros(B, dtype=dt)
    zs = []
    for li, layer in enumerate(layers):
        name = f"layers.{li}"
        kind = layer[0]
        if kind == "actnorm":
            _, C, H, W = layer
            logs, bias = p[name + ".logs"], p[name + ".bias"]
            x = (x.reshape(B, C, H * W) * torch.exp(logs)[None, :, None] + bias[None, :, None]).reshape(B, -1)
            logdet = logdet + H * W * logs.sum()
        elif kind == "coupling":
            _, A, T = layer
            o = mlp(p, name, x[:, A], cfg["depth"])
            y = x.clone()
            if cfg["additive"]:
                y[:, T] = x[:, T] + o
            else:
                nT = T.numel()
                s = torch.exp(p[name + ".scale"]) * torch.tanh(o[:, :nT])
                y[:, T] = x[:, T] * torch.exp(s) + o[:, nT:]
                logdet = logdet + s.sum(1)
            x = y
        elif kind == "squeeze":
            x = squeeze(x, *layer[1:])
        else:
            h = layer[1] // 2
            zs.append(x[:, :h])
            x = x[:, h:]
    zs.append(x)
    return torch.cat(zs, 1), logdet


def inverse(cfg, layers, p, z):
    B, P = z.shape
    sizes = [l[1] // 2 for l in layers if l[0] == "factor"]
    offs, o = [], 0
    for s in sizes:
        offs.append(o)
        o += s
    y = z[:, o:]
    fi = len(sizes)
    for li in reversed(range(len(layers))):
        layer, name = layers[li], f"layers.{li}"
        kind = layer[0]
        if kind == "actnorm":
            _, C, H, W = layer
            logs, bias = p[name + ".logs"], p[name + ".bias"]
            y = ((y.reshape(B, C, H * W) - bias[None, :, None]) * torch.exp(-logs)[None, :, None]).reshape(B, -1)
        elif kind == "coupling":
            _, A, T = layer
            o_ = mlp(p, name, y[:, A], cfg["depth"])
            x = y.clone()
            if cfg["additive"]:
                x[:, T] = y[:, T] - o_
            else:
                nT = T.numel()
                s = torch.exp(p[name + ".scale"]) * torch.tanh(o_[:, :nT])
                x[:, T] = (y[:, T] - o_[:, nT:]) * torch.exp(-s)
            y = x
        elif kind == "squeeze":
            y = unsqueeze(y, *layer[1:])
        else:
            fi -= 1
            y = torch.cat([z[:, offs[fi]:offs[fi] + sizes[fi]], y], 1)
    return y


def main():
    cfg = json.load(open(sys.argv[1]))
    t = read_safetensors(sys.argv[2])
    x = t.pop("x").to(dt)
    w = t.pop("w").to(dt)
    t.pop("actnorm_initialized", None)  # a flag, not a parameter of the map
    B = x.shape[0]
    x = x.reshape(B, -1).requires_grad_(True)
    p = {k: v.to(dt).requires_grad_(True) for k, v in t.items()}
    layers = build(cfg)
    z, logdet = forward(cfg, layers, p, x)
    P = z.shape[1]
    logp = -0.5 * (z * z).sum(1) - 0.5 * P * math.log(2 * math.pi) + logdet
    loss = (w * logp).sum()
    grads = torch.autograd.grad(loss, [x] + list(p.values()))
    out = {"z": z, "logdet": logdet, "logp": logp, "loss": loss.reshape(1), "dx": grads[0]}
    for (k, _), g in zip(p.items(), grads[1:]):
        out["grad." + k] = g
    pd = {k: v.detach() for k, v in p.items()}
    out["inverse"] = inverse(cfg, layers, pd, z.detach())
    # The full Jacobian of each image's map.
    ldj = []
    for b in range(B):
        J = torch.autograd.functional.jacobian(lambda v: forward(cfg, layers, pd, v.reshape(1, -1))[0][0],
                                               x[b].detach(), vectorize=True)
        ldj.append(torch.linalg.slogdet(J)[1])
    out["logdet_jacobian"] = torch.stack(ldj)
    write_safetensors(sys.argv[3], out)


if __name__ == "__main__":
    main()
