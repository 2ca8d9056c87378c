"""A DiT in PyTorch, written from the paper (Peebles & Xie 2023, facebookresearch/DiT models.py's structure) as the
peer of kiln's models/dit.cpp: patch embedding as a strided Conv2d, MAE's 2-D sin-cos positions, the sinusoidal
noise-level embedding with its MLP, the class table with a null row, adaLN-Zero blocks (LayerNorm without affine,
eps 1e-6; timm-style attention; GELU-tanh MLP), the final adaptive norm and linear layer, and the unpatchify einsum.
Float64 throughout. Importable (dit_forward) and runnable:

usage: torch_dit.py CONFIG_JSON IN_SAFETENSORS OUT_SAFETENSORS
  IN holds the parameters (DiT names) and x [B,C,H,W], c_noise [B], labels [B] (as floats), dout [B,C,H,W];
  OUT gets out = D(x; c_noise, labels) and grad.<name> = d<out, dout>/d<name> for every parameter.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import read_safetensors, write_safetensors  # noqa: E402


def pos_embed_2d(D, G):
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(G, dtype=np.float64)
    gw = np.arange(G, dtype=np.float64)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, G, G)
    return np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None].to(torch.float64) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def dit_forward(P, cfg, x, t, y):
    """x [B,C,H,W], t [B] (the network's noise conditioning), y [B] long -> [B,C,H,W]."""
    D, p, C, H = cfg["hidden"], cfg["patch"], cfg["channels"], cfg["image_size"]
    nh = cfg["heads"]
    G = H // p
    B = x.shape[0]
    h = F.conv2d(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], stride=p)  # [B, D, G, G]
    h = h.flatten(2).transpose(1, 2)  # [B, T, D]
    h = h + torch.from_numpy(pos_embed_2d(D, G)).to(h.dtype)[None]
    te = timestep_embedding(t, cfg["freq_dim"]).to(h.dtype)
    te = F.linear(F.silu(F.linear(te, P["t_embedder.mlp.0.weight"], P["t_embedder.mlp.0.bias"])),
                  P["t_embedder.mlp.2.weight"], P["t_embedder.mlp.2.bias"])
    c = te + P["y_embedder.embedding_table.weight"][y]
    for l in range(cfg["depth"]):
        b = f"blocks.{l}."
        mod = F.linear(F.silu(c), P[b + "adaLN_modulation.1.weight"], P[b + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), sh1, sc1)
        qkv = F.linear(a, P[b + "attn.qkv.weight"], P[b + "attn.qkv.bias"])
        T = qkv.shape[1]
        q, k, v = qkv.reshape(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // nh), dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, T, D)
        h = h + g1.unsqueeze(1) * F.linear(att, P[b + "attn.proj.weight"], P[b + "attn.proj.bias"])
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), sh2, sc2)
        m = F.linear(F.gelu(F.linear(m, P[b + "mlp.fc1.weight"], P[b + "mlp.fc1.bias"]), approximate="tanh"),
                     P[b + "mlp.fc2.weight"], P[b + "mlp.fc2.bias"])
        h = h + g2.unsqueeze(1) * m
    sh, sc = F.linear(F.silu(c), P["final_layer.adaLN_modulation.1.weight"],
                      P["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.linear(modulate(F.layer_norm(h, (D,), eps=1e-6), sh, sc), P["final_layer.linear.weight"],
                 P["final_layer.linear.bias"])
    h = h.reshape(B, G, G, p, p, C)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(B, C, G * p, G * p)


def param_names(cfg):
    n = ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
         "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight"]
    for l in range(cfg["depth"]):
        b = f"blocks.{l}."
        n += [b + s for s in ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                              "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]]
    n += ["final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
          "final_layer.adaLN_modulation.1.bias"]
    return n


def load_params(raw, cfg):
    return {n: raw[n].to(torch.float64).requires_grad_(True) for n in param_names(cfg)}


if __name__ == "__main__":
    torch.set_num_threads(2)
    cfg = json.load(open(sys.argv[1]))
    raw = read_safetensors(sys.argv[2])
    P = load_params(raw, cfg)
    x = raw["x"].to(torch.float64)
    out = dit_forward(P, cfg, x, raw["c_noise"].to(torch.float64), raw["labels"].long())
    (out * raw["dout"].to(torch.float64)).sum().backward()
    res = {"out": out.detach()}
    for n, t in P.items():
        res["grad." + n] = t.grad
    write_safetensors(sys.argv[3], res)
