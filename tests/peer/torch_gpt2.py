"""An independent GPT-2 in PyTorch (Debian's python3-torch), used as the reference for kiln's tests.

Written from the GPT-2 description, not from kiln's code: Conv1D-layout linears (x @ W + b), pre-LayerNorm
blocks, causal softmax attention, tanh GELU, final LayerNorm, LM head tied to the token embedding.
Weights are read from and written to safetensors with a small standard-library reader/writer.
"""
import json
import math
import struct

import torch
import torch.nn.functional as F

DTYPES = {"F32": (torch.float32, 4), "F64": (torch.float64, 8), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2)}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, size = DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + b : base + e]), dtype=dt) if e > b else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"]).to(torch.float32).clone()
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    magic, version, count = struct.unpack("<3i", data[:12])
    assert magic == 20240520, "bad magic"
    dt = torch.int16 if version == 1 else torch.int32
    toks = torch.frombuffer(bytearray(data[1024:]), dtype=dt)[:count].to(torch.int64)
    if version == 1:
        toks = toks & 0xFFFF
    return toks


def param_names(cfg):
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for l in range(cfg["n_layer"]):
        p = f"transformer.h.{l}."
        names += [p + s for s in ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                                   "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                   "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def param_shape(cfg, name):
    """Hugging Face GPT-2 shape of a parameter (Conv1D weights are [in, out])."""
    C, V = cfg["n_embd"], cfg["vocab_size"]
    for suffix, shape in [("wte.weight", (V, C)), ("wpe.weight", (cfg["n_positions"], C)),
                          ("c_attn.weight", (C, 3 * C)), ("c_attn.bias", (3 * C,)), ("c_fc.weight", (C, 4 * C)),
                          ("c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (4 * C, C)), ("attn.c_proj.weight", (C, C))]:
        if name.endswith(suffix):
            return shape
    return (C,)


def random_weights(cfg, seed, bias_std, weight_std):
    """Random test weights: LayerNorm gains 1 ± 0.1, biases N(0, bias_std), matrices N(0, weight_std)."""
    g = torch.Generator().manual_seed(seed)
    W = {}
    for n in param_names(cfg):
        s = param_shape(cfg, n)
        if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith("ln_f.weight"):
            W[n] = 1.0 + 0.1 * torch.randn(s, generator=g)
        else:
            W[n] = (bias_std if len(s) == 1 else weight_std) * torch.randn(s, generator=g)
    return W, g


def hidden(P, cfg, idx):
    """idx: [B, T] token ids -> the final LayerNorm's output [B, T, C]."""
    B, T = idx.shape
    C, H = cfg["n_embd"], cfg["n_head"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][torch.arange(T)]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(cfg["n_layer"]):
        p = f"transformer.h.{l}."
        h = F.layer_norm(x, (C,), P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps)
        qkv = h @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps)
        h = F.gelu(h @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"]
    return F.layer_norm(x, (C,), P["transformer.ln_f.weight"], P["transformer.ln_f.bias"], eps)


def forward(P, cfg, idx):
    """idx: [B, T] token ids -> logits [B, T, V] (the tied LM head)."""
    return hidden(P, cfg, idx) @ P["transformer.wte.weight"].t()


def load_checkpoint(d, dtype=torch.float32):
    cfg = json.load(open(f"{d}/config.json"))
    raw = read_safetensors(f"{d}/model.safetensors")
    P = {}
    for n in param_names(cfg):
        key = n if n in raw else n[len("transformer."):]
        P[n] = raw[key].to(dtype).requires_grad_(True)
    return cfg, P
