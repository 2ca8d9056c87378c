"""Upsampling in PyTorch (float64): F.interpolate nearest, bilinear with align_corners False and True, and the
input gradient of <out, dout> by autograd — the peer of kernels/upsample.h.
usage: torch_upsample.py IN OUT  (IN: tensors x [B, C, H, W], dout_S [B, C, S·H, S·W] for each scale S to test,
named "dout_2", "dout_3", ...); OUT gets out_MODE_S and din_MODE_S for MODE in nearest, bilinear, aligned."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import read_safetensors, write_safetensors  # noqa: E402

t = read_safetensors(sys.argv[1])
res = {}
for name, dout in t.items():
    if not name.startswith("dout_"):
        continue
    s = int(name[5:])
    for mode in ("nearest", "bilinear", "aligned"):
        x = t["x"].double().requires_grad_(True)
        if mode == "nearest":
            y = F.interpolate(x, scale_factor=s, mode="nearest")
        else:
            y = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=(mode == "aligned"))
        (y * dout.double()).sum().backward()
        res[f"out_{mode}_{s}"] = y.detach()
        res[f"din_{mode}_{s}"] = x.grad
write_safetensors(sys.argv[2], res)
