"""An independent Llama-family decoder in PyTorch (Debian's python3-torch), the reference for kiln's tests of the
Hugging Face families llama, mistral, qwen2, qwen3 and qwen3_moe (LlamaForCausalLM and its relatives; Qwen3-MoE's
mixture-of-experts feed-forward is tests/peer/torch_moe.py).

Written from the Hugging Face modeling files as a specification of the math, not from kiln's code:
  x = embed[ids]
  per layer:  h = x + o_proj(Attn(rope(qk_norm(q_proj(n1(x)))), rope(qk_norm(k_proj(n1(x)))), v_proj(n1(x))))
              x = h + down_proj(act(gate_proj(n2(h))) * up_proj(n2(h)))          n1, n2: RMSNorm
  logits = lm_head(norm(x))   (lm_head is embed when tie_word_embeddings)
RMSNorm computes its variance in fp32 (w * x / sqrt(mean(x^2) + eps)); the rotary embedding is the
rotate_half form (dimension i pairs with i + head_dim/2) with inv_freq from rope_theta and rope_scaling
("linear": inv_freq / factor; "llama3": frequency bands); attention is grouped-query (kv head g serves query
heads g*rep .. g*rep+rep-1), scaled by head_dim^-0.5, causal, optionally windowed (key j visible to query i iff
i - window < j <= i). Linear weights are nn.Linear's [out, in]: y = x @ W.T + b.

Also: safetensors loading (single file or sharded with model.safetensors.index.json), random test checkpoints
with Hugging Face names, greedy decoding with and without a KV cache, and a self-test:
    /usr/bin/python3 tests/peer/torch_llama.py --self-test
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import read_safetensors, read_shard, write_safetensors  # noqa: E402,F401
from torch_moe import qwen3_moe_block  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


# ---- configuration ---------------------------------------------------------------------------------------------

def resolve(cfg):
    """The Hugging Face config.json as the plain numbers and switches the forward needs."""
    mt = cfg.get("model_type", "llama")
    if mt not in FAMILIES:
        raise ValueError(f"model_type {mt!r} is not one of {FAMILIES}")
    C, H, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    KV = cfg.get("num_key_value_heads") or H
    D = cfg.get("head_dim") or C // H
    assert H % KV == 0, "num_key_value_heads must divide num_attention_heads"
    assert D % 2 == 0, "head_dim must be even for the rotary embedding"
    attn_bias = bool(cfg.get("attention_bias", False))
    r = dict(model_type=mt, C=C, H=H, KV=KV, D=D, L=L, V=cfg["vocab_size"], F=cfg["intermediate_size"],
             eps=cfg.get("rms_norm_eps", 1e-6), act=cfg.get("hidden_act", "silu"),
             tie=bool(cfg.get("tie_word_embeddings", False)),
             max_pos=cfg.get("max_position_embeddings", 2048))
    # Biases: Llama's attention_bias covers q, k, v and o, mlp_bias the three MLP matrices; Qwen2 always has
    # q, k, v biases and never an o bias; Qwen3's attention_bias covers q, k, v, o; Mistral has none.
    if mt == "qwen2":
        r["qkv_bias"], r["o_bias"] = True, False
    elif mt == "mistral":
        r["qkv_bias"], r["o_bias"] = False, False
    else:
        r["qkv_bias"], r["o_bias"] = attn_bias, attn_bias
    r["mlp_bias"] = bool(cfg.get("mlp_bias", False)) if mt == "llama" else False
    r["qk_norm"] = mt in ("qwen3", "qwen3_moe")
    # Qwen3-MoE: layer l is sparse unless in mlp_only_layers, when (l + 1) % decoder_sparse_step == 0.
    E = cfg.get("num_experts", 0) if mt == "qwen3_moe" else 0
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
    r["moe"] = [E > 0 and l not in dense and (l + 1) % step == 0 for l in range(L)]
    r["E"], r["K"], r["MF"] = E, cfg.get("num_experts_per_tok", 0), cfg.get("moe_intermediate_size", 0)
    r["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    # Sliding window per layer: Mistral on every layer when sliding_window is set; Qwen2/3 through layer_types,
    # or else use_sliding_window on the layers from max_window_layers on.
    w = cfg.get("sliding_window")
    windows = [None] * L
    if mt == "mistral" and w:
        windows = [int(w)] * L
    elif mt in ("qwen2", "qwen3", "qwen3_moe") and w:
        if cfg.get("layer_types"):
            windows = [int(w) if t == "sliding_attention" else None for t in cfg["layer_types"]]
        elif cfg.get("use_sliding_window", False):
            mwl = cfg.get("max_window_layers", L)
            windows = [int(w) if i >= mwl else None for i in range(L)]
    r["windows"] = windows
    # Rotary: rope_theta and rope_scaling (older files) or rope_parameters (newer files).
    rp = cfg.get("rope_parameters") or {}
    r["theta"] = float(cfg.get("rope_theta", rp.get("rope_theta", 10000.0)))
    rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    r["rope_scaling"] = rs
    return r


def rope_inv_freq(cfg):
    """inv_freq [head_dim/2], in float64: theta^(-2i/d), then the rope_scaling rule."""
    r = resolve(cfg)
    D = r["D"]
    inv = 1.0 / (r["theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rs = r["rope_scaling"]
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    factor = float(rs["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        long_wl, short_wl = old / lo, old / hi  # wavelengths above long_wl are scaled, below short_wl kept
        scaled = torch.where(wavelen > long_wl, inv / factor, inv)
        s = (old / wavelen - lo) / (hi - lo)
        blend = (1 - s) * scaled / factor + s * scaled
        middle = (wavelen >= short_wl) & (wavelen <= long_wl)
        return torch.where(middle, blend, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported by this reference")


def param_names(cfg):
    r = resolve(cfg)
    names = ["model.embed_tokens.weight"]
    for l in range(r["L"]):
        p = f"model.layers.{l}."
        names.append(p + "input_layernorm.weight")
        for m in "qkv":
            names.append(p + f"self_attn.{m}_proj.weight")
            if r["qkv_bias"]:
                names.append(p + f"self_attn.{m}_proj.bias")
        names.append(p + "self_attn.o_proj.weight")
        if r["o_bias"]:
            names.append(p + "self_attn.o_proj.bias")
        if r["qk_norm"]:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names.append(p + "post_attention_layernorm.weight")
        if r["moe"][l]:
            names.append(p + "mlp.gate.weight")
            names += [p + f"mlp.experts.{e}.{m}_proj.weight" for e in range(r["E"]) for m in ("gate", "up", "down")]
            continue
        for m in ("gate", "up", "down"):
            names.append(p + f"mlp.{m}_proj.weight")
            if r["mlp_bias"]:
                names.append(p + f"mlp.{m}_proj.bias")
    names.append("model.norm.weight")
    if not r["tie"]:
        names.append("lm_head.weight")
    return names


def param_shape(cfg, name):
    r = resolve(cfg)
    C, D, F_, V = r["C"], r["D"], r["F"], r["V"]
    q, kv = r["H"] * D, r["KV"] * D
    if ".mlp.gate.weight" in name:
        return (r["E"], C)
    if ".mlp.experts." in name:
        return (C, r["MF"]) if name.endswith("down_proj.weight") else (r["MF"], C)
    table = {"embed_tokens.weight": (V, C), "lm_head.weight": (V, C), "q_proj.weight": (q, C), "q_proj.bias": (q,),
             "k_proj.weight": (kv, C), "k_proj.bias": (kv,), "v_proj.weight": (kv, C), "v_proj.bias": (kv,),
             "o_proj.weight": (C, q), "o_proj.bias": (C,), "q_norm.weight": (D,), "k_norm.weight": (D,),
             "gate_proj.weight": (F_, C), "gate_proj.bias": (F_,), "up_proj.weight": (F_, C),
             "up_proj.bias": (F_,), "down_proj.weight": (C, F_), "down_proj.bias": (C,)}
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    return (C,)  # input_layernorm, post_attention_layernorm, model.norm


# ---- checkpoints -----------------------------------------------------------------------------------------------

def read_checkpoint_tensors(d):
    """All tensors of a checkpoint directory: model.safetensors, or the shards its index names."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        wm = json.load(open(index))["weight_map"]
        raw = {}
        for f in sorted(set(wm.values())):
            part = read_safetensors(os.path.join(d, f))
            raw.update(part)
        missing = [n for n in wm if n not in raw]
        assert not missing, f"index names tensors its shards lack: {missing[:3]}"
        return raw
    return read_safetensors(os.path.join(d, "model.safetensors"))


def load_checkpoint(d, dtype=torch.float32):
    """(cfg, P): the config.json dict and the parameters by Hugging Face name, leaf tensors needing grad."""
    cfg = json.load(open(os.path.join(d, "config.json")))
    raw = read_checkpoint_tensors(d)
    P = {}
    for n in param_names(cfg):
        if n not in raw:
            raise KeyError(f"{d}: tensor {n} missing")
        assert tuple(raw[n].shape) == param_shape(cfg, n), f"{n}: shape {tuple(raw[n].shape)}"
        P[n] = raw[n].to(dtype).requires_grad_(True)
    return cfg, P


def random_weights(cfg, seed):
    """Random test weights: norm gains 1 +- 0.1 (so their gradients matter), biases N(0, 0.05), embedding and
    head N(0, 0.1), other matrices N(0, 0.06). Independent of sharding."""
    g = torch.Generator().manual_seed(seed)
    W = {}
    for n in param_names(cfg):
        s = param_shape(cfg, n)
        if n.endswith("norm.weight"):
            W[n] = 1.0 + 0.1 * torch.randn(s, generator=g)
        elif len(s) == 1:
            W[n] = 0.05 * torch.randn(s, generator=g)
        elif n in ("model.embed_tokens.weight", "lm_head.weight"):
            W[n] = 0.1 * torch.randn(s, generator=g)
        else:
            W[n] = 0.06 * torch.randn(s, generator=g)
    return W


def random_checkpoint(d, cfg, seed, shards=1):
    """Write config.json (cfg, Hugging Face keys) and random weights with Hugging Face names: model.safetensors,
    or with shards > 1, model-0000k-of-0000n.safetensors and model.safetensors.index.json. Returns the weights."""
    os.makedirs(d, exist_ok=True)
    full = dict(cfg)
    full.setdefault("architectures", [ARCH[cfg.get("model_type", "llama")]])
    full.setdefault("torch_dtype", "float32")
    json.dump(full, open(os.path.join(d, "config.json"), "w"), indent=1)
    W = random_weights(cfg, seed)
    if shards <= 1:
        write_safetensors(os.path.join(d, "model.safetensors"), W)
        return W
    names = list(W)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        f = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(d, f), {n: W[n] for n in part})
        for n in part:
            weight_map[n] = f
            total += W[n].numel() * 4
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(d, "model.safetensors.index.json"), "w"), indent=1)
    return W


# ---- the forward -----------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def activation(name, x):
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"hidden_act {name!r} is not supported by this reference")


def half_turn(x):
    """rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary(x, cos, sin):
    return x * cos + half_turn(x) * sin


def linear(x, P, name):
    y = x @ P[name + ".weight"].t()
    b = P.get(name + ".bias")
    return y if b is None else y + b


def forward(P, cfg, idx, position_ids=None, segment_ids=None, cache=None):
    """idx [B, T] token ids -> logits [B, T, V].
    position_ids [B, T] (default: past length + 0..T-1) drive the rotary angles; segment_ids [B, T] (optional)
    restrict attention to keys of the same segment (packed documents). cache: a list (empty at first) of per-layer
    (k, v) after the rotation, [B, KV, T_past, D]; the new keys and values are appended in place."""
    r = resolve(cfg)
    B, T = idx.shape
    H, KV, D = r["H"], r["KV"], r["D"]
    x = P["model.embed_tokens.weight"][idx]
    dt = x.dtype
    past = cache[0][0].shape[2] if cache else 0
    if position_ids is None:
        position_ids = torch.arange(past, past + T).expand(B, T)
    ang = position_ids.to(torch.float64)[..., None] * rope_inv_freq(cfg)  # [B, T, D/2]
    ang = torch.cat((ang, ang), dim=-1)
    cos, sin = ang.cos().to(dt)[:, None], ang.sin().to(dt)[:, None]  # [B, 1, T, D]
    qi = torch.arange(past, past + T)[:, None]
    kj = torch.arange(past + T)[None, :]
    for l in range(r["L"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, P[p + "input_layernorm.weight"], r["eps"])
        q = linear(h, P, p + "self_attn.q_proj").view(B, T, H, D)
        k = linear(h, P, p + "self_attn.k_proj").view(B, T, KV, D)
        v = linear(h, P, p + "self_attn.v_proj").view(B, T, KV, D)
        if r["qk_norm"]:
            q = rms_norm(q, P[p + "self_attn.q_norm.weight"], r["eps"])
            k = rms_norm(k, P[p + "self_attn.k_norm.weight"], r["eps"])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        if cache is not None:
            if len(cache) > l:
                k = torch.cat((cache[l][0], k), dim=2)
                v = torch.cat((cache[l][1], v), dim=2)
                cache[l] = (k, v)
            else:
                cache.append((k, v))
        rep = H // KV
        kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        allowed = kj <= qi
        w = r["windows"][l]
        if w:
            allowed = allowed & (kj > qi - w)
        allowed = allowed[None, None]
        if segment_ids is not None:
            assert cache is None or past == 0, "segments with a cache are not supported"
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        att = (q @ kr.transpose(-2, -1)) * (D ** -0.5)
        att = att.masked_fill(~allowed, float("-inf"))
        att = att.float().softmax(dim=-1).to(dt) if dt in (torch.bfloat16, torch.float16) else att.softmax(-1)
        y = (att @ vr).transpose(1, 2).reshape(B, T, H * D)
        x = x + linear(y, P, p + "self_attn.o_proj")
        h = rms_norm(x, P[p + "post_attention_layernorm.weight"], r["eps"])
        if r["moe"][l]:
            x = x + qwen3_moe_block(h, P, p + "mlp.", r["E"], r["K"], r["norm_topk_prob"])
            continue
        g = activation(r["act"], linear(h, P, p + "mlp.gate_proj")) * linear(h, P, p + "mlp.up_proj")
        x = x + linear(g, P, p + "mlp.down_proj")
    x = rms_norm(x, P["model.norm.weight"], r["eps"])
    head = P["model.embed_tokens.weight"] if r["tie"] else P["lm_head.weight"]
    return x @ head.t()


def greedy(P, cfg, prompt, max_new, eot=None, use_cache=True):
    """Greedy continuation (the prompt included) and the smallest top-1/top-2 logit gap seen.
    use_cache: one forward of the prompt, then one token at a time through the KV cache; otherwise the whole
    prefix is recomputed each step. Stops at max_position_embeddings tokens."""
    seq, gap = list(prompt), math.inf
    gaps = []
    max_pos = resolve(cfg)["max_pos"]
    cache = [] if use_cache else None
    with torch.no_grad():
        for step in range(max_new):
            if len(seq) >= max_pos:
                break
            if use_cache:
                inp = seq if step == 0 else seq[-1:]
                logits = forward(P, cfg, torch.tensor([inp]), cache=cache)[0, -1]
            else:
                logits = forward(P, cfg, torch.tensor([seq]))[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            gap = min(gap, gaps[-1])
            seq.append(int(logits.argmax()))
            if eot is not None and seq[-1] == eot:
                break
    return seq, gap, gaps


# ---- self-test -------------------------------------------------------------------------------------------------

def test_configs():
    """The small configurations the end-to-end test uses (tests/e2e/families_vs_torch.py)."""
    return {
        "llama": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 211,
                  "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
                  "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
        "mistral": {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 199,
                    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                    "sliding_window": 8, "hidden_act": "silu", "tie_word_embeddings": False},
        "qwen2": {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "num_hidden_layers": 2, "intermediate_size": 144, "vocab_size": 203,
                  "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "rope_scaling": {"type": "linear", "factor": 2.0}, "hidden_act": "silu",
                  "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 16,
                  "max_window_layers": 2},
        "qwen3": {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 24, "num_hidden_layers": 2, "intermediate_size": 160, "vocab_size": 197,
                  "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                  "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
                  "use_sliding_window": False, "sliding_window": None},
        "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 3, "intermediate_size": 96,
                      "vocab_size": 193, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
                      "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                      "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                      "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                      "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1]},
    }


def self_test():
    import tempfile
    torch.set_num_threads(1)
    ok = True

    def check(cond, what):
        nonlocal ok
        print(("ok    " if cond else "FAIL  ") + what)
        ok &= bool(cond)

    tmp = tempfile.mkdtemp(prefix="torch_llama_")
    cfgs = test_configs()
    for name, cfg in cfgs.items():
        d = os.path.join(tmp, name)
        W = random_checkpoint(d, cfg, 100 + len(name))
        _, P = load_checkpoint(d, torch.float64)
        names = param_names(cfg)
        check(set(W) == set(P) == set(names) and ("lm_head.weight" in W) != cfg["tie_word_embeddings"],
              f"{name}: {len(names)} tensors with Hugging Face names, lm_head {'absent (tied)' if cfg['tie_word_embeddings'] else 'present'}")
        # Sharded copy loads the same tensors.
        ds = os.path.join(tmp, name + "_sharded")
        random_checkpoint(ds, cfg, 100 + len(name), shards=3)
        files = sorted(f for f in os.listdir(ds) if f.endswith(".safetensors"))
        _, PS = load_checkpoint(ds, torch.float64)
        check(files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] and
              all(torch.equal(P[n], PS[n]) for n in names), f"{name}: 3-shard copy loads the same tensors")
        # KV-cache greedy == full recompute, and cached logits equal full logits.
        prompt = [3, 17, 42]
        a, gap, _ = greedy(P, cfg, prompt, 40, use_cache=True)
        b, _, _ = greedy(P, cfg, prompt, 40, use_cache=False)
        check(a == b and len(a) == 43, f"{name}: greedy 40 tokens with a KV cache == full recompute "
                                       f"(smallest top-2 gap {gap:.2e})")
        with torch.no_grad():
            ids = torch.tensor([a[:30]])
            full = forward(P, cfg, ids)
            cache = []
            parts = [forward(P, cfg, ids[:, :7], cache=cache)]
            for t in range(7, 30):
                parts.append(forward(P, cfg, ids[:, t:t + 1], cache=cache))
            inc = torch.cat(parts, dim=1)
        check(float((full - inc).abs().max()) < 1e-10, f"{name}: incremental logits equal full logits "
                                                        f"({float((full - inc).abs().max()):.1e})")
        # Causality: changing later tokens does not change earlier logits.
        with torch.no_grad():
            ids2 = ids.clone()
            ids2[0, 20:] = (ids2[0, 20:] + 5) % cfg["vocab_size"]
            d2 = float((forward(P, cfg, ids2)[0, :20] - full[0, :20]).abs().max())
        # (MoE: an expert's batch of rows changes with the later tokens, so its products round differently.)
        moe = any(resolve(cfg)["moe"])
        check(d2 == 0.0 or (moe and d2 < 1e-12), f"{name}: causal (later tokens leave earlier logits unchanged, {d2:.1e})")
        # Gradients reach every tensor.
        _, P32 = load_checkpoint(d, torch.float32)
        x = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
        logits = forward(P32, cfg, x[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).backward()
        dead = [n for n, t in P32.items() if t.grad is None or float(t.grad.abs().max()) == 0.0]
        # An expert no token chose has no gradient; most must have one.
        idle = [n for n in dead if ".mlp.experts." in n]
        if len(idle) * 4 <= sum(".mlp.experts." in n for n in P32):
            dead = [n for n in dead if n not in idle]
        check(not dead, f"{name}: nonzero gradient on all {len(P32)} tensors" + (f" (dead: {dead})" if dead else ""))
        # Packed documents (segments, positions restarting) equal separate forwards.
        with torch.no_grad():
            seg = torch.tensor([[0] * 11 + [1] * 13])
            pos = torch.tensor([list(range(11)) + list(range(13))])
            packed = forward(P, cfg, ids[:, :24], position_ids=pos, segment_ids=seg)
            sep = torch.cat([forward(P, cfg, ids[:, :11]), forward(P, cfg, ids[:, 11:24])], dim=1)
        check(float((packed - sep).abs().max()) < 1e-10, f"{name}: packed documents == separate forwards")

    # GQA equals MHA with the kv heads repeated (kv head g serves query heads g*rep .. g*rep+rep-1).
    cfg = cfgs["llama"]
    _, P = load_checkpoint(os.path.join(tmp, "llama"), torch.float64)
    r = resolve(cfg)
    rep, D = r["H"] // r["KV"], r["D"]
    mha = dict(cfg, num_key_value_heads=cfg["num_attention_heads"])
    PM = dict(P)
    for l in range(cfg["num_hidden_layers"]):
        for m in "kv":
            n = f"model.layers.{l}.self_attn.{m}_proj.weight"
            PM[n] = P[n].view(r["KV"], D, -1).repeat_interleave(rep, dim=0).reshape(r["H"] * D, -1)
    ids = torch.randint(0, cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dg = float((forward(P, cfg, ids) - forward(PM, mha, ids)).abs().max())
    check(dg < 1e-10, f"GQA (4 heads / 2 kv heads) == MHA with repeated kv heads ({dg:.1e})")

    # llama3 rope scaling against the formula worked out by hand, one frequency at a time.
    rs = cfg["rope_scaling"]
    got = rope_inv_freq(cfg)
    want, bands = [], []
    for i in range(D // 2):
        f = 10000.0 ** (-2 * i / D)
        wl = 2 * math.pi / f
        if wl < rs["original_max_position_embeddings"] / rs["high_freq_factor"]:
            want.append(f), bands.append("h")
        elif wl > rs["original_max_position_embeddings"] / rs["low_freq_factor"]:
            want.append(f / rs["factor"]), bands.append("l")
        else:
            s = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            want.append((1 - s) * f / rs["factor"] + s * f), bands.append("m")
    err = max(abs(a - b) / b for a, b in zip(got.tolist(), want))
    check(err < 1e-14 and {"h", "m", "l"} <= set(bands),
          f"llama3 rope scaling == hand formula over bands {''.join(bands)} (rel err {err:.1e})")
    lin = rope_inv_freq(cfgs["qwen2"])
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    check(torch.allclose(lin, base / 2.0, rtol=1e-15, atol=0), "linear rope scaling ('type' key): inv_freq / factor")

    # rotate_half rotation == explicit 2x2 rotation of the pairs (i, i + D/2) by angle pos * inv_freq[i].
    q = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    pos = 37
    ang = pos * got
    cs = torch.cat((ang, ang)).cos()
    sn = torch.cat((ang, ang)).sin()
    rot = rotary(q, cs, sn)
    h = D // 2
    exp = torch.empty(D, dtype=torch.float64)
    for i in range(h):
        c, s = math.cos(float(ang[i])), math.sin(float(ang[i]))
        exp[i] = c * q[i] - s * q[i + h]
        exp[i + h] = s * q[i] + c * q[i + h]
    check(float((rot - exp).abs().max()) < 1e-12, "rotary (rotate_half) == pairwise rotation of (i, i + d/2)")

    # Sliding window: with one layer, the logit at i ignores tokens j <= i - window, and sees j = i - window + 1.
    cfg1 = dict(cfgs["mistral"], num_hidden_layers=1)
    d1 = os.path.join(tmp, "mistral1")
    random_checkpoint(d1, cfg1, 9)
    _, P1 = load_checkpoint(d1, torch.float64)
    w = cfg1["sliding_window"]
    ids = torch.randint(0, cfg1["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = forward(P1, cfg1, ids)[0, 25]
        far, near = ids.clone(), ids.clone()
        far[0, 25 - w] = (far[0, 25 - w] + 1) % cfg1["vocab_size"]
        near[0, 25 - w + 1] = (near[0, 25 - w + 1] + 1) % cfg1["vocab_size"]
        df = float((forward(P1, cfg1, far)[0, 25] - base).abs().max())
        dn = float((forward(P1, cfg1, near)[0, 25] - base).abs().max())
        full_cfg = dict(cfg1, sliding_window=None)
        dw = float((forward(P1, full_cfg, ids)[0, 25] - base).abs().max())
    check(df == 0.0 and dn > 1e-6 and dw > 1e-6,
          f"sliding window {w}: key i-{w} invisible, key i-{w - 1} visible, differs from full attention")

    # RMSNorm as Hugging Face: fp32 variance for bf16 input.
    xb = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    wb = (1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(7))).to(torch.bfloat16)
    xf = xb.float()
    ref = wb * (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    check(torch.equal(rms_norm(xb, wb, 1e-6), ref), "RMSNorm (bf16 input): fp32 variance, gain after the cast")

    # bf16 forward tracks fp32.
    _, Pb = load_checkpoint(os.path.join(tmp, "qwen3"), torch.bfloat16)
    _, Pf = load_checkpoint(os.path.join(tmp, "qwen3"), torch.float32)
    ids = torch.randint(0, 197, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        lb = F.cross_entropy(forward(Pb, cfgs["qwen3"], ids[:, :-1]).float().reshape(-1, 197), ids[:, 1:].reshape(-1))
        lf = F.cross_entropy(forward(Pf, cfgs["qwen3"], ids[:, :-1]).reshape(-1, 197), ids[:, 1:].reshape(-1))
    check(abs(float(lb - lf)) / float(lf) < 0.01, f"bf16 loss {float(lb):.4f} within 1% of fp32 {float(lf):.4f}")

    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    if "--self-test" in sys.argv:
        sys.exit(0 if self_test() else 1)
    print(__doc__)
