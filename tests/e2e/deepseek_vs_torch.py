"""End-to-end check of the deepseek_v3 family (DeepseekV3ForCausalLM) in kiln against the independent PyTorch
reference (tests/peer/torch_deepseek.py, torch_train_ref.py --model deepseek).

Configurations (hidden 64, 2 layers, vocab 211, dense feed-forward layers):
  lora_yarn   the query bottleneck (q_lora_rank), yarn rope scaling with mscale (softmax scale and cos/sin
              factor), interleaved rotary pairs, q/k heads 16 + 16, v heads 32, untied head
  (rms_norm_eps 1e-5: the latent norms keep Hugging Face's 1e-6)
  direct_mtp  queries straight from x, rotary pairs not interleaved, v heads wider than q/k heads, one
              multi-token-prediction layer (num_nextn_predict_layers 1, layer index num_hidden_layers)
For each: a random checkpoint with Hugging Face names and a shard with structure to learn;
  1. `kiln train --init` (10 AdamW steps with decay, warmup + cosine, accumulation, clipping; --mtp-lambda 0.3)
     against the reference: per-step total, main and MTP losses within 1e-4; final weights within 1e-4 relative;
  moe_mtp     DeepSeekMoE layers (the MTP layer too), group-limited sigmoid routing with the selection bias
              (held still: --bias-update-speed 0), a shared expert
  2. `kiln generate --temperature 0`: 40 greedy tokens equal the reference's (KV cache) from kiln's trained weights.

usage: deepseek_vs_torch.py KILN_BINARY WORK_DIR
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
peer = os.path.join(here, "..", "peer")
sys.path.insert(0, peer)
from torch_deepseek import greedy, param_names, random_checkpoint, read_safetensors  # noqa: E402

kiln, work = sys.argv[1], sys.argv[2]
only = sys.argv[3:]  # optional: names of the configurations to run
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
ok = True


def check(cond, what):
    global ok
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    ok &= bool(cond)


def kiln_run(args):
    r = subprocess.run([kiln] + args, capture_output=True)
    if r.returncode != 0:
        print(r.stderr.decode(errors="replace"))
        raise SystemExit(f"kiln {' '.join(args[:1])} failed (exit {r.returncode})")
    return r


BASE = {"model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 211, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1}
CONFIGS = {
    "lora_yarn": dict(BASE, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                      v_head_dim=32, head_dim=16, rope_interleave=True,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "direct_mtp": dict(BASE, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
                       v_head_dim=48, head_dim=16, rope_interleave=False, num_nextn_predict_layers=1),
    # DeepSeekMoE from layer 1 on, the MTP layer (index 2) included: 8 routed experts in 4 groups (2 kept), top 2,
    # one shared expert, sigmoid affinities with the selection bias, routed_scaling_factor 2.5.
    "moe_mtp": dict(BASE, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                    head_dim=16, rope_interleave=True, num_nextn_predict_layers=1, first_k_dense_replace=1,
                    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, n_shared_experts=1,
                    moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=True,
                    topk_method="noaux_tc", scoring_func="sigmoid"),
}
INIT_SEED = {"lora_yarn": 4021, "direct_mtp": 4022, "moe_mtp": 4023}
hp = dict(batch=4, seq=32, grad_accum=2, steps=10, lr=3e-3, min_lr=3e-4, warmup=3, weight_decay=0.1, grad_clip=0.5)
flags = ["--" + k.replace("_", "-") + "=" + str(v) for k, v in hp.items()]
LAMBDA = 0.3
PROMPT = [3, 17, 42]

for seed, (name, cfg) in enumerate(CONFIGS.items(), start=31):
    if only and name not in only:
        continue
    print(f"==== {name}", flush=True)
    d = os.path.join(work, name)
    os.makedirs(d)
    init = os.path.join(d, "init")
    random_checkpoint(init, cfg, INIT_SEED[name])
    V = cfg["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    n_tok = 6000
    toks = [(7 * i + (i // 13) * 3 + int(torch.randint(0, 4, (1,), generator=g))) % V for i in range(n_tok)]
    shard = os.path.join(d, "data.bin")
    with open(shard, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, n_tok, *([0] * 253)))
        f.write(struct.pack(f"<{n_tok}H", *toks))

    out, metrics = os.path.join(d, "kiln_out"), os.path.join(d, "metrics.jsonl")
    kiln_run(["train", "--init", init, "--data", shard, "--data-order", "sequential", "--threads", "2",
              "--lr-schedule", "cosine", "--out", out, "--metrics", metrics, "--no-progress",
              f"--mtp-lambda={LAMBDA}", "--bias-update-speed=0"] + flags)  # torch_train_ref: no bias update
    ours = [json.loads(l) for l in open(metrics) if l.strip()]
    ref_json, ref_w = os.path.join(d, "ref.json"), os.path.join(d, "ref.safetensors")
    subprocess.run([sys.executable, os.path.join(peer, "torch_train_ref.py"), init, shard, ref_json, ref_w,
                    "--model", "deepseek", "--schedule", "cosine", f"--mtp-lambda={LAMBDA}"] + flags,
                   check=True, stdout=subprocess.DEVNULL)
    ref = json.load(open(ref_json))
    mtp = cfg.get("num_nextn_predict_layers", 0) > 0
    worst = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0}
    for m, rl, rm, rt in zip(ours, ref["losses"], ref["main_losses"], ref["mtp_losses"]):
        for key, rv in (("loss", rl), ("main_loss", rm), ("mtp_loss", rt)):
            if key == "mtp_loss" and not mtp:
                continue
            worst[key] = max(worst[key], abs(m.get(key, m["loss"] if key == "main_loss" else float("inf")) - rv))
        print(f"step {m['step']:3d}  kiln {m['loss']:.6f} main {m.get('main_loss', float('nan')):.6f} "
              f"mtp {m.get('mtp_loss', float('nan')):.6f}   torch {rl:.6f} main {rm:.6f} mtp {rt:.6f}")
    check(len(ours) == hp["steps"] and all(v <= 1e-4 for v in worst.values()),
          f"{name}: {len(ours)} steps, per-step losses within 1e-4 of torch (worst total {worst['loss']:.2e}, "
          f"main {worst['main_loss']:.2e}, mtp {worst['mtp_loss']:.2e})")
    latest = os.path.join(out, "latest")
    kw, rw = read_safetensors(os.path.join(latest, "model.safetensors")), read_safetensors(ref_w)
    names = param_names(cfg)
    bad, rel_worst = [], 0.0
    for n in names:
        if n not in kw:
            bad.append(f"{n} missing")
            continue
        rel = float((kw[n] - rw[n]).norm() / rw[n].norm().clamp_min(1e-12))
        rel_worst = max(rel_worst, rel)
        if rel > 1e-4:
            bad.append(f"{n} rel {rel:.2e}")
    check(not bad, f"{name}: final weights (Hugging Face names) within 1e-4 relative of torch (worst {rel_worst:.2e})"
          + (f": {bad[:4]}" if bad else ""))

    if mtp:  # the saved checkpoint carries the MTP layer's embedding/head copies Hugging Face's loader expects
        L = cfg["num_hidden_layers"]
        same = all(f"model.layers.{L}.{c}" in kw and torch.equal(kw[f"model.layers.{L}.{c}"], kw[m])
                   for c, m in (("embed_tokens.weight", "model.embed_tokens.weight"),
                                ("shared_head.head.weight", "lm_head.weight")))
        check(same, f"{name}: saved model.layers.{L}.embed_tokens / shared_head.head equal the main embedding / head")

    P = {n: kw[n] for n in names if n in kw}
    if len(P) == len(names):
        ref_tokens, gap, _ = greedy(P, cfg, PROMPT, 40)
        full_tokens, _, _ = greedy(P, cfg, PROMPT, 40, use_cache=False)
        assert ref_tokens == full_tokens, "reference: KV-cache greedy differs from full recompute"
        r = kiln_run(["generate", "--model", latest, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new", "40",
                      "--temperature", "0", "--eot-id", "-1", "--json", "--threads", "2"])
        toks_k = json.loads(r.stdout)["tokens"]
        if toks_k != ref_tokens:
            print("kiln ", toks_k)
            print("torch", ref_tokens)
        check(toks_k == ref_tokens, f"{name}: greedy 40 tokens equal torch's (smallest top-2 gap {gap:.2e})")

# A config that declares an MTP layer its checkpoint lacks: one line naming the missing tensor, non-zero exit.
if not only or "lora_yarn" in only:
    src = os.path.join(work, "lora_yarn", "init")
    bad = os.path.join(work, "missing_mtp")
    shutil.copytree(src, bad)
    c = json.load(open(os.path.join(bad, "config.json")))
    c["num_nextn_predict_layers"] = 1
    json.dump(c, open(os.path.join(bad, "config.json"), "w"))
    r = subprocess.run([kiln, "train", "--init", bad, "--data", os.path.join(work, "lora_yarn", "data.bin"),
                        "--steps", "1", "--no-progress"], capture_output=True)
    err = r.stderr.decode(errors="replace").strip()
    check(r.returncode != 0 and len(err.splitlines()) == 1 and "model.layers.2." in err and "missing" in err,
          f"MTP layer declared but absent: one-line error ({err})")

# The released checkpoints give each MTP layer its own copy of the embedding and the head; kiln shares the main
# model's (the paper's definition): the same greedy tokens with and without the copies, no warning when they
# equal the main tensors, and one warning line naming the copy when one differs.
if not only or "direct_mtp" in only:
    from torch_gpt2 import write_safetensors  # noqa: E402
    src = os.path.join(work, "direct_mtp", "init")
    copies = os.path.join(work, "mtp_copies")
    shutil.copytree(src, copies)
    st = os.path.join(copies, "model.safetensors")
    T = read_safetensors(st)
    L = CONFIGS["direct_mtp"]["num_hidden_layers"]
    T[f"model.layers.{L}.embed_tokens.weight"] = T["model.embed_tokens.weight"].clone()
    T[f"model.layers.{L}.shared_head.head.weight"] = T["lm_head.weight"].clone()
    write_safetensors(st, T)
    differ = os.path.join(work, "mtp_copies_differ")
    shutil.copytree(copies, differ)
    T[f"model.layers.{L}.shared_head.head.weight"] = T["lm_head.weight"] + 0.01
    write_safetensors(os.path.join(differ, "model.safetensors"), T)
    runs, warns = [], []
    for d in (src, copies, differ):
        r = kiln_run(["generate", "--model", d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new", "12",
                      "--temperature", "0", "--eot-id", "-1", "--json", "--threads", "2"])
        runs.append(json.loads(r.stdout)["tokens"])
        warns.append([l for l in r.stderr.decode(errors="replace").splitlines() if "warning" in l])
    check(runs[0] == runs[1] == runs[2], "MTP layers' own embedding/head copies in the checkpoint are not used")
    check(not warns[1] and len(warns[2]) == 1 and f"model.layers.{L}.shared_head.head.weight" in warns[2][0]
          and "lm_head.weight" in warns[2][0], f"a differing copy is one warning line ({warns[2]})")

print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
