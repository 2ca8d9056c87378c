#!/usr/bin/env python3
"""`kiln export --format gguf` of deepseek_v3 as llama.cpp's deepseek2 (absorbed MLA: attn_k_b / attn_v_b split
from kv_b_proj, one shared key head of kv_lora_rank + rope dims), against llama.cpp (node-llama-cpp 3.21.1).

Tiny random checkpoints (width 64, 4 heads, kv_lora_rank 32, q/k heads 16 + 16, v heads 32, vocab 512 with a
tokenizer from `kiln tokenizer train`): 2 layers with q_lora_rank 32, rope_interleave true (DeepSeek's released
layout, written as it is) and false (rotate-half, the rotary rows permuted to adjacent pairs), the second with
one MTP layer (left out of the file); DeepSeekMoE from layer 1 on (ffn_gate_inp, exp_probs_b for the correction
bias, stacked ffn_*_exps, shared ffn_*_shexp; sigmoid gating, top-2 of 8 experts in 4 groups of which 2 are kept,
routed_scaling_factor 2.5) with yarn rope scaling (factor 4 over 64 original positions, mscale = mscale_all_dim
= 1: rope.scaling.* keys, yarn_log_multiplier 0.1); and the lite variant (no q_lora_rank, 27 layers: llama.cpp
3.21.1 recognises it by the layer count), with MoE from layer 3 on. llama.cpp's greedy tokens on the F32 file == `kiln generate`'s == the
PyTorch reference's (tests/peer/torch_deepseek.py), whose top-2 margin along the path exceeds 0.02 (seeds
chosen by the reference alone). Configurations llama.cpp's deepseek2 cannot hold are one-line errors.

usage: gguf_deepseek_llama_cpp.py KILN WORK_DIR      (exit 77: node-llama-cpp not installed)
"""
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", "peer")
sys.path.insert(0, PEER)
sys.path.insert(0, HERE)
import gguf_llama_cpp as G  # noqa: E402  (its tokenizer helper)
from torch_deepseek import greedy, load_checkpoint, random_checkpoint  # noqa: E402

kiln, work = sys.argv[1], sys.argv[2]
if not os.path.exists(os.path.join(G.ROOT, "third_party", "npm", "node_modules", "node-llama-cpp")):
    print("node-llama-cpp is not installed: skipped")
    sys.exit(77)
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
ok = True


def check(cond, what):
    global ok
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    ok &= bool(cond)


BASE = {"model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "head_dim": 16, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 510, "eos_token_id": 510}
MOE = dict(first_k_dense_replace=1, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
           n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=True,
           topk_method="noaux_tc", scoring_func="sigmoid")
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {"interleaved": dict(BASE, rope_interleave=True),
         "rotate_half_mtp": dict(BASE, rope_interleave=False, num_nextn_predict_layers=1),
         "moe_yarn": dict(BASE, rope_interleave=True, rope_scaling=YARN, **MOE),
         "lite_moe": dict(BASE, rope_interleave=True, q_lora_rank=None, num_hidden_layers=27,
                          **dict(MOE, first_k_dense_replace=3))}
PROMPT = [5, 80, 200, 7, 300, 42]
K, MARGIN = 10, 0.02


def pick_seed(d, cfg):
    """The first seed whose reference greedy path keeps a top-2 margin above MARGIN with 4+ distinct tokens."""
    for seed in range(1, 60):
        random_checkpoint(d, cfg, seed)
        _, P = load_checkpoint(d)
        toks, gap, _ = greedy(P, cfg, PROMPT, K)
        if gap > MARGIN and len(set(toks[len(PROMPT):])) >= 4:
            return seed, toks[len(PROMPT):], gap
    raise SystemExit("no seed with a clear greedy path")


tok = G.make_tokenizer(kiln, work, "gpt2")
for name, cfg in CASES.items():
    d = os.path.join(work, name)
    seed, ref, gap = pick_seed(d, cfg)
    shutil.copy(os.path.join(tok, "tokenizer.json"), d)
    json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
              open(os.path.join(d, "tokenizer_config.json"), "w"))
    G.run([kiln, "export", "--model", d, "--format", "gguf", "--out", os.path.join(d, "m.gguf")])
    out = G.run(["node", os.path.join(PEER, "llama_cpp_greedy.mjs"), os.path.join(d, "m.gguf"), "--prompt",
                 ",".join(map(str, PROMPT)), "--k", str(K)])
    lc = json.loads(out)["tokens"]
    kg = json.loads(G.run([kiln, "generate", "--model", d, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new",
                           str(K), "--temperature", "0", "--eot-id", "-1", "--json"]))["tokens"][len(PROMPT):]
    print(f"{name} (seed {seed}, margin {gap:.3f}): llama.cpp {lc}\n  kiln {kg}\n  torch {ref}")
    check(lc == kg == ref, f"{name}: llama.cpp's greedy tokens on the deepseek2 GGUF == kiln generate == torch")
    if name == "moe_yarn":
        # The match covers the expert groups and the correction bias only if they change the path: the
        # reference without groups, and with the bias zeroed, must choose other tokens.
        _, P = load_checkpoint(d)
        flat = greedy(P, dict(cfg, n_group=1, topk_group=1), PROMPT, K)[0][len(PROMPT):]
        for k in P:
            if k.endswith("e_score_correction_bias"):
                P[k] = P[k] * 0
        nobias = greedy(P, cfg, PROMPT, K)[0][len(PROMPT):]
        check(flat != ref and nobias != ref, f"{name}: groups and correction bias change the path (without groups "
              f"{flat}, without bias {nobias})")

# What deepseek2 cannot hold: queries without q_lora_rank outside the 26/27-layer lite variant, q_lora_rank at
# 26/27 layers, yarn whose Hugging Face cos/sin scale is not 1 (mscale != mscale_all_dim).
for what, extra in (("q_lora_rank", {"q_lora_rank": None}),
                    ("q_lora_rank", {"num_hidden_layers": 26}),
                    ("mscale", {"rope_scaling": dict(YARN, mscale=0.707)})):
    d = os.path.join(work, "bad_" + what)
    random_checkpoint(d, dict(BASE, **extra), 1)
    shutil.copy(os.path.join(tok, "tokenizer.json"), d)
    r = subprocess.run([kiln, "export", "--model", d, "--format", "gguf", "--out", os.path.join(d, "m.gguf")],
                       capture_output=True, text=True)
    err = r.stderr.strip()
    check(r.returncode != 0 and len(err.splitlines()) == 1 and what in err and not os.path.exists(d + "/m.gguf"),
          f"export refuses {what}: {err}")

print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
