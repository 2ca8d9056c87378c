#!/usr/bin/env python3
"""Bad input to `kiln export`: every case must exit non-zero with exactly one line on stderr that names the
family / flag / tensor / file, and leave no output file (nor a temporary one) behind.

usage: export_errors.py KILN WORK_DIR
"""
import json
import os
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_llama_cpp as g  # noqa: E402  (the tiny checkpoints)

kiln, work = os.path.abspath(sys.argv[1]), sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
tok = g.make_tokenizer(kiln, work, "gpt2")


def model_dir(name, fam="gpt2", edit_config=None, drop=None, tokenizer=True):
    d, _, _ = g.make_model_dir(work, fam, tok)
    if edit_config:
        path = os.path.join(d, "config.json")
        c = json.load(open(path))
        edit_config(c)
        json.dump(c, open(path, "w"))
    if drop:
        p = g.random_params(g.config(fam)[0], 1)
        del p[drop]
        g.write_safetensors(os.path.join(d, "model.safetensors"), p)
    if not tokenizer:
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            os.remove(os.path.join(d, f))
    os.rename(d, os.path.join(work, name))
    return os.path.join(work, name)


good = model_dir("good")
phi = model_dir("phi3", edit_config=lambda c: c.update(model_type="phi3"))
window = model_dir("window", fam="mistral", edit_config=lambda c: c.update(sliding_window=8))
relu = model_dir("relu", edit_config=lambda c: c.update(activation_function="relu"))
missing = model_dir("missing", drop="transformer.h.1.mlp.c_fc.bias")
no_tok = model_dir("no_tok", tokenizer=False)
small = model_dir("small_vocab", edit_config=lambda c: c.update(vocab_size=300))
not_a_dir = os.path.join(work, "plain_file")
open(not_a_dir, "w").write("x")
a_dir = os.path.join(work, "a_dir")
os.makedirs(a_dir)


def export(model=good, out=None, dtype=None, fmt="gguf"):
    cmd = [kiln, "export", "--model", model, "--format", fmt, "--out", out or os.path.join(work, "out.gguf")]
    return cmd + (["--dtype", dtype] if dtype else [])


cases = [  # (command, output path that must not appear, what the message must name)
    (export(model=phi), os.path.join(work, "out.gguf"), "phi3"),
    (export(model=window), os.path.join(work, "out.gguf"), "window: export_gguf: sliding window 8"),
    (export(model=relu), os.path.join(work, "out.gguf"), "relu: export_gguf: gpt2 needs an ungated tanh-GELU"),
    (export(dtype="q4_k"), os.path.join(work, "out.gguf"), "--dtype"),
    (export(fmt="onnx"), os.path.join(work, "out.gguf"), "--format"),
    (export(model=missing), os.path.join(work, "out.gguf"), "transformer.h.1.mlp.c_fc.bias"),
    (export(model=no_tok), os.path.join(work, "out.gguf"), "tokenizer"),
    (export(model=small), os.path.join(work, "out.gguf"), f"{g.VOCAB} tokens but the model's vocab_size is 300"),
    (export(out=os.path.join(not_a_dir, "out.gguf")), os.path.join(not_a_dir, "out.gguf"), "plain_file"),
    (export(out=a_dir), None, "a_dir"),
]

failures = []
for cmd, out_path, needle in cases:
    before = sorted(os.listdir(work)) + sorted(os.listdir(a_dir))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    after = sorted(os.listdir(work)) + sorted(os.listdir(a_dir))
    what = " ".join(cmd[2:])
    print(f"rc {r.returncode}: {r.stderr.strip()}")
    if r.returncode == 0:
        failures.append(f"{what}: exit 0")
    if len(lines) != 1 or needle not in lines[0]:
        failures.append(f"{what}: stderr is not one line naming {needle!r}: {r.stderr!r}")
    if out_path and os.path.exists(out_path):
        failures.append(f"{what}: left {out_path}")
    if before != after:
        failures.append(f"{what}: files changed: {sorted(set(after) ^ set(before))}")

# The good directory exports, so the cases above fail for their own reason.
r = subprocess.run(export(), capture_output=True, text=True, timeout=60)
if r.returncode != 0 or not os.path.isfile(os.path.join(work, "out.gguf")):
    failures.append(f"the good checkpoint does not export: {r.stderr.strip()}")
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"ok: {len(cases)} cases")
