#!/usr/bin/env python3
"""GGUF export against llama.cpp (node-llama-cpp 3.21.1 via tests/peer/llama_cpp_greedy.mjs).

For a tiny random model of each family (kiln_gguf_tiny: gpt2, llama with Llama 3 rope scaling, mistral with an
untied head, qwen2, qwen3), exports F32/F16/Q8_0 GGUFs, loads each in llama.cpp on the CPU and generates greedily.
Checks: every file loads and yields K valid tokens; the F32 file's tokens equal an independent float64 numpy
forward pass of the Hugging Face definition over the raw parameter block (which checks the transposes, the q/k
permutation and the rope factors), wherever that reference's top-2 margin is wide enough to decide.

Hook: kiln_greedy() below is where kiln's own decoder joins (llama.cpp's tokens must equal kiln's); it returns
None until the model restructure provides a decoder for every family.

usage: gguf_llama_cpp.py KILN_GGUF_TINY WORK_DIR      (exit 77: node-llama-cpp not installed)
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER = os.path.join(ROOT, "tests", "peer", "llama_cpp_greedy.mjs")
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
TYPES = ["f32", "f16", "q8_0"]
PROMPT = [5, 80, 200, 7, 300, 42]
K = 10
MARGIN = 0.02  # llama.cpp's and the reference's arithmetic differ by far less than this


def llama_cpp_greedy(gguf, prompt, k):
    out = subprocess.run(["node", PEER, gguf, "--prompt", ",".join(map(str, prompt)), "--k", str(k)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {gguf}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens"]


def kiln_greedy(model_dir, family, prompt, k):
    """kiln's decoder on the same model (params.bin + table.json + config.json in model_dir): wire here."""
    return None


# --- reference forward pass (Hugging Face semantics, float64) ---

def load(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    table = json.load(open(os.path.join(model_dir, "table.json")))
    block = np.fromfile(os.path.join(model_dir, "params.bin"), dtype=np.float32).astype(np.float64)
    p = {t["name"]: block[t["offset"]:t["offset"] + int(np.prod(t["shape"]))].reshape(t["shape"]) for t in table}
    return cfg, p


def layer_norm(x, w, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def attention(q, k, v):  # [H, T, d], k/v already repeated for GQA
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    s = s + np.triu(np.full(s.shape[-2:], -np.inf), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s / s.sum(-1, keepdims=True)) @ v


def inv_freq(cfg):
    hd = cfg["head_dim"]
    f = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    if cfg["rope_scaling"] == "llama3":
        fac, lo, hi, old = cfg["rope_factor"], cfg["low_freq_factor"], cfg["high_freq_factor"], cfg["original_max_positions"]
        wl = 2 * np.pi / f
        smooth = (old / wl - lo) / (hi - lo)
        scaled = np.where(wl > old / lo, f / fac, f)
        medium = (wl >= old / hi) & (wl <= old / lo)
        f = np.where(medium, (1 - smooth) * f / fac + smooth * f, scaled)
    return f


def rope(x, f):  # x [H, T, d], rotate-half
    t = np.arange(x.shape[1])[:, None] * f[None, :]
    cos, sin = np.cos(np.concatenate([t, t], -1)), np.sin(np.concatenate([t, t], -1))
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def logits_gpt2(cfg, p, ids):
    C, H = cfg["d_model"], cfg["n_head"]
    x = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][: len(ids)]
    for l in range(cfg["n_layer"]):
        g = lambda n: p[f"transformer.h.{l}.{n}"]
        h = layer_norm(x, g("ln_1.weight"), g("ln_1.bias"), cfg["norm_eps"])
        q, k, v = np.split(h @ g("attn.c_attn.weight") + g("attn.c_attn.bias"), 3, -1)
        heads = lambda t: t.reshape(len(ids), H, C // H).transpose(1, 0, 2)
        o = attention(heads(q), heads(k), heads(v)).transpose(1, 0, 2).reshape(len(ids), C)
        x = x + o @ g("attn.c_proj.weight") + g("attn.c_proj.bias")
        h = layer_norm(x, g("ln_2.weight"), g("ln_2.bias"), cfg["norm_eps"])
        u = h @ g("mlp.c_fc.weight") + g("mlp.c_fc.bias")
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + u @ g("mlp.c_proj.weight") + g("mlp.c_proj.bias")
    x = layer_norm(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], cfg["norm_eps"])
    return x @ p["transformer.wte.weight"].T


def logits_rotary(cfg, p, ids):
    T, H, KV, hd, eps = len(ids), cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"], cfg["norm_eps"]
    f = inv_freq(cfg)
    x = p["model.embed_tokens.weight"][ids]
    for l in range(cfg["n_layer"]):
        pre = f"model.layers.{l}."
        g = lambda n: p[pre + n]
        lin = lambda h, n: h @ g(n + ".weight").T + (g(n + ".bias") if pre + n + ".bias" in p else 0)
        h = rms_norm(x, g("input_layernorm.weight"), eps)
        q = lin(h, "self_attn.q_proj").reshape(T, H, hd).transpose(1, 0, 2)
        k = lin(h, "self_attn.k_proj").reshape(T, KV, hd).transpose(1, 0, 2)
        v = lin(h, "self_attn.v_proj").reshape(T, KV, hd).transpose(1, 0, 2)
        if pre + "self_attn.q_norm.weight" in p:
            q, k = rms_norm(q, g("self_attn.q_norm.weight"), eps), rms_norm(k, g("self_attn.k_norm.weight"), eps)
        q, k = rope(q, f), rope(k, f)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        o = attention(q, k, v).transpose(1, 0, 2).reshape(T, H * hd)
        x = x + o @ g("self_attn.o_proj.weight").T
        h = rms_norm(x, g("post_attention_layernorm.weight"), eps)
        gate, up = h @ g("mlp.gate_proj.weight").T, h @ g("mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g("mlp.down_proj.weight").T
    x = rms_norm(x, p["model.norm.weight"], eps)
    head = p["lm_head.weight"] if "lm_head.weight" in p else p["model.embed_tokens.weight"]
    return x @ head.T


def reference_greedy(model_dir, prompt, k):
    """Greedy tokens and, per step, whether the top-2 margin decides the choice."""
    cfg, p = load(model_dir)
    fwd = logits_gpt2 if cfg["family"] == "gpt2" else logits_rotary
    ids, out, sure = list(prompt), [], []
    for _ in range(k):
        z = fwd(cfg, p, np.array(ids))[-1]
        top = np.argsort(z)[::-1]
        out.append(int(top[0]))
        sure.append(bool(z[top[0]] - z[top[1]] > MARGIN))
        ids.append(int(top[0]))
    return out, sure


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tiny, work = sys.argv[1], sys.argv[2]
    if not os.path.isfile(os.path.join(ROOT, "third_party/npm/node_modules/node-llama-cpp/package.json")):
        print("node-llama-cpp not installed (scripts/setup.sh): skipped")
        sys.exit(77)
    failures = []
    for fam in FAMILIES:
        d = os.path.join(work, fam)
        subprocess.run([tiny, fam, d], check=True)
        ref, sure = reference_greedy(d, PROMPT, K)
        kiln = kiln_greedy(d, fam, PROMPT, K)
        for ty in TYPES:
            toks = llama_cpp_greedy(os.path.join(d, f"model-{ty}.gguf"), PROMPT, K)
            line = f"{fam:8s} {ty:5s} llama.cpp {toks}"
            if len(toks) != K or not all(0 <= t < 320 for t in toks):
                failures.append(f"{fam} {ty}: {toks} is not {K} tokens of the vocabulary")
            if ty == "f32":
                # Compare up to the first step whose reference margin is too narrow to decide.
                n = next((i for i, s in enumerate(sure) if not s), K)
                if toks[:n] != ref[:n]:
                    failures.append(f"{fam} f32: llama.cpp {toks[:n]} != reference {ref[:n]}")
                line += f"  reference {ref} (decided for {n})"
            else:
                line += f"  agrees with the reference for {next((i for i in range(K) if toks[i] != ref[i]), K)}"
            if kiln is not None and ty == "f32" and toks != kiln:
                failures.append(f"{fam} f32: llama.cpp {toks} != kiln {kiln}")
            print(line, flush=True)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
