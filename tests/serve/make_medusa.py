"""Copies a GPT-2 checkpoint and gives it K Medusa heads (medusa.safetensors, models/medusa_checkpoint.h) as
`kiln train --medusa-heads` starts them (each head's matrix the LM head, the tied token embedding) with a small
seeded random residual block, so the heads guess roughly what the LM head does: for the server tests.
usage: make_medusa.py SRC_DIR OUT_DIR K"""
import json
import os
import shutil
import struct
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "peer"))
from torch_gpt2 import write_safetensors  # noqa: E402

src, out, K = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(out, exist_ok=True)
for f in os.listdir(src):
    if os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), os.path.join(out, f))
raw = open(os.path.join(src, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
name = next(k for k in header if k.endswith("wte.weight"))
a, b = header[name]["data_offsets"]
wte = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=torch.float32).reshape(header[name]["shape"])
C = wte.shape[1]
g = torch.Generator().manual_seed(3)
heads = {}
for k in range(K):
    heads[f"medusa.{k}.res.weight"] = torch.randn(C, C, generator=g) * 0.01
    heads[f"medusa.{k}.res.bias"] = torch.zeros(C)
    heads[f"medusa.{k}.head.weight"] = wte.clone()
write_safetensors(os.path.join(out, "medusa.safetensors"), heads)
print(out)
