"""An independent DeepSeek-V3 decoder in PyTorch (DeepseekV3ForCausalLM), the reference for kiln's deepseek_v3 tests.

Written from Hugging Face's modeling_deepseek_v3.py and the DeepSeek-V3 report as a specification of the math,
not from kiln's code:
  x = embed[ids]
  per layer:  h = x + o_proj(MLA(n1(x)))           x = h + FFN(n2(h))           n1, n2: RMSNorm
  MLA (DeepseekV3Attention):
    q = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))        [B, T, H, nope + rope]
    (q_a_layernorm and kv_a_layernorm: DeepseekV3RMSNorm's default eps 1e-6, whatever rms_norm_eps says)
    c, k_rot = split(kv_a_proj_with_mqa(x), [kv_lora_rank, rope])
    k_pass, v = split(kv_b_proj(kv_a_layernorm(c)) per head, [nope, v_head_dim])
    q_rot, k_rot rotated: rope_interleave -> apply_rotary_pos_emb_interleave (view (d/2, 2), transpose, then
    rotate_half), else rotate_half; k_rot shared by every head
    softmax((q·kᵀ)·scaling) v, scaling = qk_head_dim^-0.5 · yarn_get_mscale(factor, mscale_all_dim)² under yarn
  FFN: layers < first_k_dense_replace (or no experts): SwiGLU MLP; else DeepseekV3MoE:
    s = sigmoid(x·W_gateᵀ) in fp32; choice = s + e_score_correction_bias; group score = sum of a group's top-2
    choices, top topk_group groups kept (others masked to 0), top num_experts_per_tok experts of the masked
    choices; weights = s of the chosen (/ their sum + 1e-20 when norm_topk_prob) · routed_scaling_factor;
    out = Σ weight · expert(x) + shared_experts(x)
  logits = lm_head(norm(x))
  MTP (the report's multi-token prediction; layer num_hidden_layers + k - 1 of the checkpoint holds module k):
    h_k = block_k(eh_proj(cat(enorm(embed[t_{i+k}]), hnorm(h_{k-1})))) with h_0 the main model's last block
    output (before the final norm); logits_k = lm_head(shared_head.norm(h_k)) predicts t_{i+k+1}; embedding
    and head shared with the main model.
Rotary inverse frequencies over qk_rope_head_dim: default, or yarn (_compute_yarn_parameters) with its
attention_factor on cos and sin.

Also random test checkpoints with Hugging Face names, the loss of a batch (main and MTP), greedy decoding.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import read_safetensors, read_shard, write_safetensors  # noqa: E402,F401
from torch_llama import read_checkpoint_tensors, rms_norm, activation, half_turn  # noqa: E402


def resolve(cfg):
    g = lambda k, d=None: cfg.get(k) if cfg.get(k) is not None else d  # noqa: E731
    r = dict(L=cfg["num_hidden_layers"], C=cfg["hidden_size"], H=cfg["num_attention_heads"], V=cfg["vocab_size"],
             I=cfg["intermediate_size"], qL=g("q_lora_rank", 0), R=cfg["kv_lora_rank"], nope=cfg["qk_nope_head_dim"],
             rope=cfg["qk_rope_head_dim"], vd=cfg["v_head_dim"], eps=g("rms_norm_eps", 1e-6),
             act=g("hidden_act", "silu"), tie=g("tie_word_embeddings", False), interleave=g("rope_interleave", True),
             theta=g("rope_theta", 10000.0), max_pos=cfg["max_position_embeddings"], E=g("n_routed_experts", 0),
             dense=g("first_k_dense_replace", 0), moe_I=g("moe_intermediate_size", 0), shared=g("n_shared_experts", 0),
             groups=g("n_group", 1), topk_group=g("topk_group", 1), top_k=g("num_experts_per_tok", 1),
             norm_topk=g("norm_topk_prob", True), rsf=g("routed_scaling_factor", 1.0),
             mtp=g("num_nextn_predict_layers", 0))
    r["qk"] = r["nope"] + r["rope"]
    return r


def is_moe(r, l):
    return r["E"] > 0 and l >= r["dense"]


def param_shapes(cfg):
    """Hugging Face name -> shape, in checkpoint order (MTP layers after the main ones)."""
    r = resolve(cfg)
    C, H = r["C"], r["H"]
    S = {"model.embed_tokens.weight": (r["V"], C)}

    def mlp(p, inter):
        S[p + "gate_proj.weight"] = (inter, C)
        S[p + "up_proj.weight"] = (inter, C)
        S[p + "down_proj.weight"] = (C, inter)

    for l in range(r["L"] + r["mtp"]):
        p = f"model.layers.{l}."
        if l >= r["L"]:
            S[p + "enorm.weight"] = (C,)
            S[p + "hnorm.weight"] = (C,)
            S[p + "eh_proj.weight"] = (C, 2 * C)
            S[p + "shared_head.norm.weight"] = (C,)
        S[p + "input_layernorm.weight"] = (C,)
        a = p + "self_attn."
        if r["qL"]:
            S[a + "q_a_proj.weight"] = (r["qL"], C)
            S[a + "q_a_layernorm.weight"] = (r["qL"],)
            S[a + "q_b_proj.weight"] = (H * r["qk"], r["qL"])
        else:
            S[a + "q_proj.weight"] = (H * r["qk"], C)
        S[a + "kv_a_proj_with_mqa.weight"] = (r["R"] + r["rope"], C)
        S[a + "kv_a_layernorm.weight"] = (r["R"],)
        S[a + "kv_b_proj.weight"] = (H * (r["nope"] + r["vd"]), r["R"])
        S[a + "o_proj.weight"] = (C, H * r["vd"])
        S[p + "post_attention_layernorm.weight"] = (C,)
        if is_moe(r, l):
            S[p + "mlp.gate.weight"] = (r["E"], C)
            S[p + "mlp.gate.e_score_correction_bias"] = (r["E"],)
            for e in range(r["E"]):
                mlp(p + f"mlp.experts.{e}.", r["moe_I"])
            if r["shared"]:
                mlp(p + "mlp.shared_experts.", r["moe_I"] * r["shared"])
        else:
            mlp(p + "mlp.", r["I"])
    S["model.norm.weight"] = (C,)
    if not r["tie"]:
        S["lm_head.weight"] = (r["V"], C)
    return S


def param_names(cfg):
    return list(param_shapes(cfg))


def load_checkpoint(d, dtype=torch.float32):
    cfg = json.load(open(os.path.join(d, "config.json")))
    raw = read_checkpoint_tensors(d)
    P = {}
    for n, s in param_shapes(cfg).items():
        if n not in raw:
            raise KeyError(f"{d}: tensor {n} missing")
        assert tuple(raw[n].shape) == s, f"{n}: shape {tuple(raw[n].shape)} vs {s}"
        P[n] = raw[n].to(dtype).requires_grad_(not n.endswith("e_score_correction_bias"))
    return cfg, P


def random_checkpoint(d, cfg, seed):
    """config.json and random weights (norm gains 1 +- 0.1, embedding/head N(0, 0.1), matrices N(0, 0.08),
    correction biases N(0, 0.05)) with Hugging Face names."""
    os.makedirs(d, exist_ok=True)
    full = dict(cfg)
    full.setdefault("architectures", ["DeepseekV3ForCausalLM"])
    full.setdefault("torch_dtype", "float32")
    json.dump(full, open(os.path.join(d, "config.json"), "w"), indent=1)
    g = torch.Generator().manual_seed(seed)
    W = {}
    for n, s in param_shapes(cfg).items():
        if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
            W[n] = 1.0 + 0.1 * torch.randn(s, generator=g)
        elif n.endswith("e_score_correction_bias"):
            W[n] = 0.05 * torch.randn(s, generator=g)
        elif n in ("model.embed_tokens.weight", "lm_head.weight"):
            W[n] = 0.1 * torch.randn(s, generator=g)
        else:
            W[n] = 0.08 * torch.randn(s, generator=g)
    write_safetensors(os.path.join(d, "model.safetensors"), W)
    return W


# ---- rotary ----------------------------------------------------------------------------------------------------

def yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_params(cfg):
    """(inv_freq [rope/2] float32, attention_factor) as Hugging Face's default / yarn rope init computes them."""
    r = resolve(cfg)
    dim, base = r["rope"], r["theta"]
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if kind in ("default", None):
        return 1.0 / pos_freqs, 1.0
    assert kind == "yarn", f"rope_scaling {kind} is not supported by this reference"
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings") or r["max_pos"]
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    inv = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv, float(attention_factor)


def softmax_scale(cfg):
    r = resolve(cfg)
    s = r["qk"] ** -0.5
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "yarn" and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
        s = s * m * m
    return s


def rotate(x, cos, sin, interleave):
    if interleave:
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return x * cos + half_turn(x) * sin


# ---- the forward -----------------------------------------------------------------------------------------------

def lin(x, P, name):
    return x @ P[name + ".weight"].t()


def mlp(x, P, p, act):
    return lin(activation(act, lin(x, P, p + "gate_proj")) * lin(x, P, p + "up_proj"), P, p + "down_proj")


def moe(x, P, p, r):
    """DeepseekV3MoE: the sigmoid router with group-limited top-k on biased scores, experts, shared experts."""
    shape = x.shape
    h = x.reshape(-1, shape[-1])
    E, G = r["E"], r["groups"]
    scores = (h.float() @ P[p + "gate.weight"].float().t()).sigmoid()
    choice = scores + P[p + "gate.e_score_correction_bias"].detach().float()[None]
    group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=r["topk_group"], dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
    choice = choice.masked_fill(~score_mask.bool(), 0.0)
    idx = torch.topk(choice, k=r["top_k"], dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if r["norm_topk"]:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = (w * r["rsf"]).to(h.dtype)
    out = torch.zeros_like(h)
    for e in range(E):
        rows, slot = torch.where(idx == e)
        if len(rows):
            out = out.index_add(0, rows, mlp(h[rows], P, p + f"experts.{e}.", r["act"]) * w[rows, slot, None])
    if r["shared"]:
        out = out + mlp(h, P, p + "shared_experts.", r["act"])
    return out.view(shape)


def block(x, P, l, r, cos, sin, scale, allowed, cache):
    B, T, _ = x.shape
    H, nope, rope, vd = r["H"], r["nope"], r["rope"], r["vd"]
    p = f"model.layers.{l}."
    a = p + "self_attn."
    h = rms_norm(x, P[p + "input_layernorm.weight"], r["eps"])
    if r["qL"]:
        q = lin(rms_norm(lin(h, P, a + "q_a_proj"), P[a + "q_a_layernorm.weight"], 1e-6), P, a + "q_b_proj")
    else:
        q = lin(h, P, a + "q_proj")
    q = q.view(B, T, H, r["qk"]).transpose(1, 2)
    q_pass, q_rot = q.split([nope, rope], dim=-1)
    ckv = lin(h, P, a + "kv_a_proj_with_mqa")
    k_pass, k_rot = ckv.split([r["R"], rope], dim=-1)
    kv = lin(rms_norm(k_pass, P[a + "kv_a_layernorm.weight"], 1e-6), P, a + "kv_b_proj")
    kv = kv.view(B, T, H, nope + vd).transpose(1, 2)
    k_pass, v = kv.split([nope, vd], dim=-1)
    k_rot = k_rot.view(B, 1, T, rope)
    q_rot, k_rot = rotate(q_rot, cos, sin, r["interleave"]), rotate(k_rot, cos, sin, r["interleave"])
    k_rot = k_rot.expand(*k_pass.shape[:-1], -1)
    q = torch.cat((q_pass, q_rot), dim=-1)
    k = torch.cat((k_pass, k_rot), dim=-1)
    if cache is not None:
        if len(cache) > l:
            k = torch.cat((cache[l][0], k), dim=2)
            v = torch.cat((cache[l][1], v), dim=2)
            cache[l] = (k, v)
        else:
            cache.append((k, v))
    att = (q @ k.transpose(-2, -1)) * scale
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, H * vd)
    x = x + lin(y, P, a + "o_proj")
    h = rms_norm(x, P[p + "post_attention_layernorm.weight"], r["eps"])
    return x + (moe(h, P, p + "mlp.", r) if is_moe(r, l) else mlp(h, P, p + "mlp.", r["act"]))


def head(x, P, r, norm_name):
    w = P["model.embed_tokens.weight"] if r["tie"] else P["lm_head.weight"]
    return rms_norm(x, P[norm_name], r["eps"]) @ w.t()


def forward(P, cfg, idx, cache=None, mtp_tokens=None):
    """idx [B, T] -> main logits [B, T, V]; with mtp_tokens (a list over depths k = 1..D of [B, T] ids, the token
    t_{i+k} at each position) also the MTP modules' logits, [logits_1, ..., logits_D]."""
    r = resolve(cfg)
    B, T = idx.shape
    x = P["model.embed_tokens.weight"][idx]
    past = cache[0][0].shape[2] if cache else 0
    pos = torch.arange(past, past + T)
    inv, af = rope_params(cfg)
    freqs = pos.float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * af)[None, None], (emb.sin() * af)[None, None]
    allowed = (torch.arange(past + T)[None, :] <= pos[:, None])[None, None]
    scale = softmax_scale(cfg)
    for l in range(r["L"]):
        x = block(x, P, l, r, cos, sin, scale, allowed, cache)
    logits = head(x, P, r, "model.norm.weight")
    if mtp_tokens is None:
        return logits
    outs, prev = [], x
    for k, tok in enumerate(mtp_tokens):
        l = r["L"] + k
        p = f"model.layers.{l}."
        e = rms_norm(P["model.embed_tokens.weight"][tok], P[p + "enorm.weight"], r["eps"])
        hprev = rms_norm(prev, P[p + "hnorm.weight"], r["eps"])
        h = lin(torch.cat((e, hprev), dim=-1), P, p + "eh_proj")
        h = block(h, P, l, r, cos, sin, scale, allowed, None)
        outs.append(head(h, P, r, p + "shared_head.norm.weight"))
        prev = h
    return logits, outs


def losses(P, cfg, x, y):
    """Sums of the main and each MTP depth's cross-entropy over a batch of rows x [B, T] with targets y [B, T]:
    depth k at position i reads token y[i + k - 1] and predicts y[i + k] (positions without one: ignored)."""
    r = resolve(cfg)
    B, T = x.shape
    if r["mtp"] == 0:
        logits = forward(P, cfg, x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"), []
    toks, tgts = [], []
    for k in range(1, r["mtp"] + 1):
        t = torch.zeros_like(x)
        t[:, :T - k + 1] = y[:, k - 1:]
        g = torch.full_like(y, -100)
        g[:, :T - k] = y[:, k:]
        toks.append(t)
        tgts.append(g)
    logits, outs = forward(P, cfg, x, mtp_tokens=toks)
    main = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
    mtp = [F.cross_entropy(o.reshape(-1, o.size(-1)), g.reshape(-1), reduction="sum", ignore_index=-100)
           for o, g in zip(outs, tgts)]
    return main, mtp


def greedy(P, cfg, prompt, max_new, use_cache=True):
    seq, gaps = list(prompt), []
    cache = [] if use_cache else None
    with torch.no_grad():
        for step in range(max_new):
            if use_cache:
                inp = seq if step == 0 else seq[-1:]
                logits = forward(P, cfg, torch.tensor([inp]), cache=cache)[0, -1]
            else:
                logits = forward(P, cfg, torch.tensor([seq]))[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
    return seq, min(gaps), gaps
