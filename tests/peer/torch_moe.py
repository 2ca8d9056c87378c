"""Mixture-of-experts feed-forwards in PyTorch as Hugging Face defines them, the reference for kiln's MoE
tests. Written from the modeling files' math (Qwen3MoeSparseMoeBlock, DeepseekV3MoE / DeepseekV3TopkRouter),
not from kiln's code:

Qwen3-MoE (h: [N, C] rows):
  p = softmax(h @ gate.T) in fp32;  w, i = topk(p, K);  w /= sum(w) if norm_topk_prob
  y = sum_k w_k * down_{i_k}(silu(gate_proj_{i_k}(h)) * up_proj_{i_k}(h))
DeepSeek-V3:
  s = sigmoid(h.float() @ gate.float().T);  c = s + e_score_correction_bias
  group score = sum of the top 2 of c within each of n_group groups; keep the topk_group best groups;
  c outside the kept groups is set to 0.0; i = topk(c, K);  w = s[i];  w /= sum(w) + 1e-20 if norm_topk_prob;
  w *= routed_scaling_factor
  y = sum_k w_k * expert_{i_k}(h) + shared_experts(h)      (shared: one SwiGLU of n_shared_experts * moe width)
The experts run as Hugging Face runs them: a loop over experts, each on the rows that chose it, the weighted
outputs index_add_-ed back. Also the per-expert token counts (the load the balancing update reads).
"""
import torch
import torch.nn.functional as F


def swiglu(x, P, p):
    return (F.silu(x @ P[p + "gate_proj.weight"].t()) * (x @ P[p + "up_proj.weight"].t())) @ P[p + "down_proj.weight"].t()


def run_experts(h, P, prefix, E, idx, w):
    """sum_k w[:, k] * expert_{idx[:, k]}(h), one expert at a time over the rows that chose it."""
    out = torch.zeros_like(h)
    for e in range(E):
        rows, k = torch.where(idx == e)
        if rows.numel() == 0:
            continue
        y = swiglu(h[rows], P, f"{prefix}experts.{e}.")
        out.index_add_(0, rows, y * w[rows, k, None].to(h.dtype))
    return out


def qwen3_moe_route(logits, K, norm_topk_prob):
    p = F.softmax(logits, dim=1, dtype=torch.float)
    w, idx = torch.topk(p, K, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


def deepseek_v3_route(logits, bias, K, n_group, topk_group, norm_topk_prob, scale):
    s = logits.sigmoid()
    c = s + bias
    N, E = c.shape
    group_scores = c.view(N, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(N, n_group, E // n_group).reshape(N, E)
    choice = c.masked_fill(~score_mask.bool(), 0.0)
    idx = torch.topk(choice, k=K, dim=-1, sorted=False)[1]
    w = s.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * scale


def qwen3_moe_block(h, P, prefix, E, K, norm_topk_prob, load=None):
    """Qwen3MoeSparseMoeBlock on h [..., C]; prefix "model.layers.L.mlp."; load (a list) gets the counts."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    idx, w = qwen3_moe_route(x @ P[prefix + "gate.weight"].t(), K, norm_topk_prob)
    if load is not None:
        load.append(torch.bincount(idx.reshape(-1), minlength=E))
    return run_experts(x, P, prefix, E, idx, w).reshape(shape)


def deepseek_v3_moe(h, P, prefix, E, K, n_group, topk_group, norm_topk_prob, scale, n_shared, bias=None, load=None):
    """DeepseekV3MoE on h [..., C]. bias: the selection bias (default P[prefix + "gate.e_score_correction_bias"])."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    if bias is None:
        bias = P[prefix + "gate.e_score_correction_bias"]
    logits = F.linear(x.float(), P[prefix + "gate.weight"].float())
    idx, w = deepseek_v3_route(logits, bias.detach(), K, n_group, topk_group, norm_topk_prob, scale)
    if load is not None:
        load.append(torch.bincount(idx.reshape(-1), minlength=E))
    y = run_experts(x, P, prefix, E, idx, w)
    if n_shared:
        y = y + swiglu(x, P, prefix + "shared_experts.")
    return y.reshape(shape)


def bias_update(bias, load, gamma):
    """Loss-free balancing (DeepSeek-V3 paper section 2.1.2): b_i += gamma * sign(mean load - load_i)."""
    load = load.to(torch.float64)
    return bias + gamma * torch.sign(load.mean() - load).to(bias.dtype)


# ---- self-test ---------------------------------------------------------------------------------------------------

def self_test():
    """The vectorised routing against a per-token loop written from the paper's description, the experts against
    a dense per-token sum, the balancing update against a hand count. /usr/bin/python3 tests/peer/torch_moe.py"""
    ok = True

    def check(cond, what):
        nonlocal ok
        print(("ok    " if cond else "FAIL  ") + what)
        ok &= bool(cond)

    g = torch.Generator().manual_seed(5)
    N, E, K, G, TG, C, MF = 37, 16, 3, 4, 2, 8, 6
    logits = torch.randn(N, E, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(E, generator=g, dtype=torch.float64)
    idx, w = deepseek_v3_route(logits, bias, K, G, TG, True, 2.5)
    same = True
    for t in range(N):
        s = torch.sigmoid(logits[t])
        c = s + bias
        per = E // G
        gscore = [sorted(c[k * per:(k + 1) * per].tolist())[-2:] for k in range(G)]
        gscore = [a + b for a, b in gscore]
        kept = sorted(range(G), key=lambda k: -gscore[k])[:TG]
        allowed = [e for e in range(E) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -float(c[e]))[:K]
        ww = s[chosen] / s[chosen].sum() * 2.5
        got = dict(zip(idx[t].tolist(), w[t].tolist()))
        same &= set(got) == set(chosen) and all(abs(got[e] - float(x)) < 1e-12 for e, x in zip(chosen, ww))
    check(same, f"DeepSeek-V3 routing ({G} groups, top {TG}, top-{K} of {E}, bias, scale 2.5) == a per-token loop")
    idx, w = qwen3_moe_route(logits, K, True)
    p = torch.softmax(logits, -1)
    ref = [sorted(range(E), key=lambda e: -float(p[t, e]))[:K] for t in range(N)]
    check(all(sorted(idx[t].tolist()) == sorted(ref[t]) for t in range(N)) and
          torch.allclose(w.sum(-1).double(), torch.ones(N, dtype=torch.float64), atol=1e-6), "Qwen3-MoE routing: top-k of the softmax, renormalised")
    P = {f"experts.{e}.{m}_proj.weight": torch.randn((C, MF) if m == "down" else (MF, C), generator=g, dtype=torch.float64)
         for e in range(E) for m in ("gate", "up", "down")}
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    idx, w = deepseek_v3_route(logits, bias, K, G, TG, True, 2.5)
    y = run_experts(x, P, "", E, idx, w)
    dense = torch.stack([sum(w[t, k] * swiglu(x[t:t + 1], P, f"experts.{int(idx[t, k])}.")[0] for k in range(K))
                         for t in range(N)])
    check(float((y - dense).abs().max()) < 1e-12, "experts by index_add_ == the per-token weighted sum")
    b = bias_update(torch.zeros(4, dtype=torch.float64), torch.tensor([5, 1, 3, 3]), 0.1)
    check(b.tolist() == [-0.1, 0.1, 0.0, 0.0], "bias update: loads 5 1 3 3 (mean 3) -> -g +g 0 0")
    print("PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    import sys
    sys.exit(0 if self_test() else 1)
