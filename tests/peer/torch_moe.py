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
