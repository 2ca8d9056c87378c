"""Data-parallel training under mpirun against one process with the same global batch.

The peer is kiln itself on one process (the single-process trainer is checked against PyTorch by
train_vs_torch.py); what this test shows is that splitting the global batch over 2 and 3 ranks, summing the
gradients over them (ZeRO stages 0-3: stage 2 with sharded gradients, stage 3 also with parameters gathered
layer by layer) and resuming across different rank counts and stages changes nothing but the order of
floating-point sums: per-step losses within 1e-6 (stages 0, 1; 1e-5 at stages 2 and 3, where each
micro-batch's gradient is summed over the ranks before it is added to the step's, where one process adds the
micro-batches inside the products), final weights within 1e-5 relative.
Then the faults: a rank killed mid-step ends the job in bounded time naming the rank, the last checkpoint
is intact and --resume continues the curve; a rank that cannot open its data, ranks that disagree about the
data, --zero-stage 4 and a global batch the ranks do not divide each give one line from rank 0 and a non-zero
exit.

usage: dist_train.py KILN_BINARY MPIRUN WORK_DIR
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import time

kiln, mpirun, work = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
cfg = os.path.join(work, "config.json")
json.dump({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 97, "n_positions": 32}, open(cfg, "w"))


def write_shard(path, n, mult):
    toks = [(i * i + mult * i) % 97 for i in range(n)]
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
        f.write(struct.pack(f"<{n}H", *toks))


shard = os.path.join(work, "data.bin")
write_shard(shard, 6000, 3)
# The same tokens as documents (a .idx of start offsets, train/doc_index.h) for packed batches.
packed = os.path.join(work, "packed.bin")
write_shard(packed, 6000, 3)
starts, at = [], 0
while at < 6000:
    starts.append(at)
    at += 3 + (at * 7919) % 38
with open(packed + ".idx", "wb") as f:
    f.write(struct.pack("<IIq", 0x434F444B, 1, len(starts)) + struct.pack(f"<{len(starts)}q", *starts))
other = os.path.join(work, "other.bin")
write_shard(other, 5000, 5)
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
STEPS = 8


def args(out, extra=(), data=shard, model=None):
    return ["train", "--model", model or cfg, "--data", data, "--batch", "6", "--seq", "16", "--grad-accum", "2",
            "--steps", str(STEPS), "--warmup", "2", "--lr", "3e-3", "--save-every", "4", "--out", out,
            "--metrics", out + ".jsonl", "--threads", "1", "--no-progress"] + list(extra)


def run(ranks, name, extra=(), resume=False, hook=None, timeout=120, quiet=True, data=shard, model=None):
    out = os.path.join(work, name)
    a = args(out, list(extra) + (["--resume"] if resume else []), data=data, model=model)
    cmd = [kiln] + a if ranks == 1 else [mpirun] + (["-q"] if quiet else []) + ["--oversubscribe", "-np", str(ranks), kiln] + a
    t0 = time.time()
    r = subprocess.run(cmd, env=dict(env, **(hook or {})), capture_output=True, text=True, timeout=timeout)
    return out, r, time.time() - t0


def losses(out):
    return [json.loads(l)["loss"] for l in open(out + ".jsonl")]


def weights(out):
    raw = open(os.path.join(out, "latest", "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    vals = []
    for name in sorted(k for k in head if k != "__metadata__"):
        a, b = head[name]["data_offsets"]
        vals += struct.unpack(f"<{(b - a) // 4}f", raw[8 + n + a:8 + n + b])
    return vals


def rel_diff(wa, wb):
    num = sum((x - y) ** 2 for x, y in zip(wa, wb)) ** 0.5
    return num / sum(x * x for x in wa) ** 0.5


ok = True


def check(cond, what):
    global ok
    print(("ok   " if cond else "FAIL ") + what)
    ok &= bool(cond)


ref, r, _ = run(1, "ref")
assert r.returncode == 0, r.stderr
la, wa = losses(ref), weights(ref)
check(len(la) == STEPS, f"reference: {len(la)} steps, final loss {la[-1]:.6f}")

for ranks in (2, 3):
    for stage in (0, 1, 2, 3):
        out, r, _ = run(ranks, f"r{ranks}z{stage}", ["--zero-stage", str(stage)])
        if r.returncode != 0:
            check(False, f"{ranks} ranks stage {stage}: exit {r.returncode}: {r.stderr[-500:]}")
            continue
        lb = losses(out)
        tol = 1e-6 if stage < 2 else 1e-5
        dl = max(abs(x - y) for x, y in zip(la, lb))
        dw = rel_diff(wa, weights(out))
        check(len(lb) == STEPS and dl <= tol and dw <= 1e-5,
              f"{ranks} ranks, ZeRO {stage}: max loss diff {dl:.2e} (<= {tol:g}), weights rel diff {dw:.2e}")
        lines = [l for l in r.stderr.splitlines() if l.startswith("step ")]
        check(len(lines) == len(set(lines)), f"{ranks} ranks, ZeRO {stage}: progress lines from one rank only")

# The reduction overlapped with the backward (a communication thread fed layer by layer; forced on: this
# machine has no core to spare for it, so it is off by default), and fp16 loss scaling with an overflow on
# rank 0 only: every rank skips that step (weights within 1e-4 here: a master weight that differs in its
# last bits can round to another fp16 copy, and the products then differ by an fp16 step).
# With recomputation (the layers' gradients then complete inside the recomputed segments).
# Stage 3 gathers each layer's parameters on that thread too, the next layer's while the current one computes.
for ranks, stage, rc in ((2, 0, "block"), (3, 1, "every:2"), (2, 2, "none"), (2, 3, "every:2"), (3, 3, "block")):
    out, r, _ = run(ranks, f"overlap_r{ranks}z{stage}", ["--zero-stage", str(stage), "--recompute", rc],
                    hook={"KILN_DIST_OVERLAP": "1"})
    lb = losses(out) if r.returncode == 0 else []
    dl = max(abs(x - y) for x, y in zip(la, lb)) if len(lb) == STEPS else 1
    dw = rel_diff(wa, weights(out)) if r.returncode == 0 else 1
    check(dl <= (1e-6 if stage < 2 else 1e-5) and dw <= 1e-5 and "overlapped with the backward" in r.stderr,
          f"overlapped reduction, {ranks} ranks, ZeRO {stage}, --recompute {rc}: max loss diff {dl:.2e}, "
          f"weights {dw:.2e}")
fp16 = ["--dtype", "fp16", "--initial-loss-scale", "1024"]
f_ref, r, _ = run(1, "fp16_ref", fp16, hook={"KILN_TEST_OVERFLOW_AT_STEP": "3"})
assert r.returncode == 0, r.stderr
for ranks, stage in ((2, 0), (2, 1), (2, 3)):
    out, r, _ = run(ranks, f"fp16_r{ranks}z{stage}", fp16 + ["--zero-stage", str(stage)],
                    hook={"KILN_TEST_OVERFLOW_AT_STEP": "3"})
    m = [json.loads(l) for l in open(out + ".jsonl")] if r.returncode == 0 else []
    skipped = [x["step"] for x in m if x.get("skipped")]
    lb, lr_ = [x["loss"] for x in m], losses(f_ref)
    dl = max(abs(x - y) for x, y in zip(lr_, lb)) if len(lb) == STEPS else 1
    dw = rel_diff(weights(f_ref), weights(out)) if r.returncode == 0 else 1
    check(skipped == [3] and dl <= 1e-5 and dw <= 1e-4,
          f"fp16, overflow on rank 0 at step 3, {ranks} ranks, ZeRO {stage}: skipped {skipped}, "
          f"loss diff {dl:.2e}, weights {dw:.2e}")

# Other families (grouped-query attention, an untied head, a mixture of experts): 2 ranks, the reduction
# overlapped layer by layer, against one process.
fam_cfgs = {
    "llama": {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "intermediate_size": 48, "vocab_size": 97, "max_position_embeddings": 32,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 8, "num_hidden_layers": 3, "intermediate_size": 40, "vocab_size": 97,
                  "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
                  "tie_word_embeddings": False, "num_experts": 8, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 12, "norm_topk_prob": True, "decoder_sparse_step": 1,
                  "mlp_only_layers": [1]},
}
# DeepSeek-V3: latent attention, DeepSeekMoE with the selection bias from layer 1 on, a multi-token-prediction
# module (sharded storage keeps it with the final norm and head).
fam_cfgs["deepseek_v3"] = {
    "model_type": "deepseek_v3", "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
    "num_hidden_layers": 3, "intermediate_size": 48, "vocab_size": 97, "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "head_dim": 8, "rope_interleave": True, "num_nextn_predict_layers": 1, "first_k_dense_replace": 1,
    "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "moe_intermediate_size": 8, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid"}
# The MoE runs also have the sequence-wise balance loss on and the selection bias following the expert load,
# which must be the load summed over the ranks for every rank's bias to stay the single process's (at stage 3
# each rank moves its segment of the bias).
for fam, fc in fam_cfgs.items():
    path = os.path.join(work, fam + ".json")
    json.dump(fc, open(path, "w"))
    fx = ["--seq-aux-alpha", "0.01", "--bias-update-speed", "0.01"] if fam != "llama" else []
    fref, r, _ = run(1, f"{fam}_ref", fx, model=path)
    assert r.returncode == 0, r.stderr
    for ranks, stage in ((2, 1), (2, 3), (3, 2)) if fam != "deepseek_v3" else ((2, 3), (3, 3)):
        out, r, _ = run(ranks, f"{fam}_r{ranks}z{stage}", fx + ["--zero-stage", str(stage)],
                        hook={"KILN_DIST_OVERLAP": "1"}, model=path)
        lb = losses(out) if r.returncode == 0 else []
        dl = max(abs(x - y) for x, y in zip(losses(fref), lb)) if len(lb) == STEPS else 1
        dw = rel_diff(weights(fref), weights(out)) if r.returncode == 0 else 1
        tol = 1e-6 if stage < 2 else 1e-5
        check(dl <= tol and dw <= 1e-5,
              f"{fam}, {ranks} ranks, ZeRO {stage}, overlapped: max loss diff {dl:.2e}, weights {dw:.2e}")

# Evaluation: each rank takes its share of every validation batch.
val = ["--val-data", other, "--eval-every", "4", "--val-batches", "3"]
vref, r, _ = run(1, "val_ref", val)
assert r.returncode == 0, r.stderr
vals = lambda out: [json.loads(l)["val_loss"] for l in open(out + ".jsonl") if "val_loss" in l]
for ranks, stage in ((2, 1), (3, 1), (3, 3)):
    out, r, _ = run(ranks, f"val_r{ranks}z{stage}", val + ["--zero-stage", str(stage)])
    va, vb = vals(vref), vals(out) if r.returncode == 0 else []
    dv = max(abs(x - y) for x, y in zip(va, vb)) if len(vb) == len(va) == 2 else 1
    check(dv <= (1e-6 if stage < 2 else 1e-5), f"evaluation on {ranks} ranks, ZeRO {stage}: val losses {vb}, max diff {dv:.2e}")

# Packed batches: whole documents, each rank a contiguous run of them (fewer tokens on some ranks).
pref, r, _ = run(1, "packed_ref", ["--batching", "packed"], data=packed)
assert r.returncode == 0, r.stderr
lp, wp = losses(pref), weights(pref)
# At stage 3 with 6 ranks some rank's share of a micro-batch is empty: it makes the collectives of a forward and
# backward without computing (Model::idle_pass).
for ranks, stage in ((2, 1), (3, 0), (3, 3), (6, 3)):
    out, r, _ = run(ranks, f"packed_r{ranks}z{stage}", ["--batching", "packed", "--zero-stage", str(stage)], data=packed)
    lb = losses(out) if r.returncode == 0 else []
    dl = max(abs(x - y) for x, y in zip(lp, lb)) if len(lb) == STEPS else 1
    dw = rel_diff(wp, weights(out)) if r.returncode == 0 else 1
    check(dl <= (1e-6 if stage < 2 else 1e-5) and dw <= 1e-5, f"packed, {ranks} ranks, ZeRO {stage}: max loss diff {dl:.2e}, weights {dw:.2e}")

# Resume across rank counts: all ranks killed after step 6 (last checkpoint: step 4), resumed on the other N.
# Stage 3 too, and across stages (a stage-3 checkpoint resumed at stage 1 and the reverse).
for first, second, stage, stage2 in ((2, 1, 1, 1), (1, 2, 1, 1), (3, 2, 0, 0), (2, 1, 3, 3), (1, 2, 3, 3),
                                     (3, 2, 3, 1), (2, 3, 1, 3)):
    name = f"resume{first}z{stage}to{second}z{stage2}"
    out, r, _ = run(first, name, ["--zero-stage", str(stage)], hook={"KILN_TEST_KILL_AT_STEP": "6"})
    check(r.returncode != 0 and os.path.realpath(os.path.join(out, "latest")).endswith("step_00000004"),
          f"{name}: killed after step 6, latest is step 4")
    out, r, _ = run(second, name, ["--zero-stage", str(stage2)], resume=True)
    lb = losses(out)
    dl = max(abs(x - y) for x, y in zip(la, lb)) if len(lb) == STEPS else 1
    dw = rel_diff(wa, weights(out)) if r.returncode == 0 else 1
    check(r.returncode == 0 and dl <= (1e-6 if max(stage, stage2) < 2 else 1e-5) and dw <= 1e-5,
          f"{name}: {first} ranks resumed on {second}: {len(lb)} steps, max loss diff {dl:.2e}, weights {dw:.2e}")

# A rank killed mid-step (after its backward, before the reduction): mpirun ends the job, naming the rank
# ("mpirun noticed that process rank 1 ... exited on signal 9"; -q would hide it).
out, r, secs = run(2, "fault", ["--zero-stage", "1"], hook={"KILN_TEST_KILL_RANK": "1", "KILN_TEST_KILL_AT_STEP": "6"},
                   timeout=60, quiet=False)
latest = os.path.realpath(os.path.join(out, "latest"))
check(r.returncode != 0 and "rank 1" in r.stderr and latest.endswith("step_00000004") and secs < 30,
      f"fault: rank 1 killed in step 6: exit {r.returncode} after {secs:.1f} s, "
      f"message names rank 1: {'rank 1' in r.stderr}, latest {os.path.basename(latest)}")
out, r, _ = run(2, "fault", ["--zero-stage", "1"], resume=True)
lb = losses(out)
dl = max(abs(x - y) for x, y in zip(la, lb)) if len(lb) == STEPS else 1
check(r.returncode == 0 and dl <= 1e-6, f"fault: --resume continues the curve (max loss diff {dl:.2e})")


def one_line_error(what, cmd, want):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    lines = [l for l in r.stderr.splitlines() if l.startswith("kiln")]
    check(r.returncode != 0 and len(lines) == 1 and want in lines[0],
          f"{what}: exit {r.returncode}, {len(lines)} line(s): {lines[:2]}")


bad = os.path.join(work, "bad")
mp = [mpirun, "-q", "--oversubscribe"]
one_line_error("--zero-stage 4", mp + ["-np", "2", kiln] + args(bad, ["--zero-stage", "4"]), "--zero-stage")
b5 = args(bad)
b5[b5.index("--batch") + 1] = "5"
one_line_error("global batch 5 over 2 ranks", mp + ["-np", "2", kiln] + b5, "does not divide over 2 ranks")
missing = os.path.join(work, "missing.bin")
one_line_error("rank 1 cannot open its data",
               mp + ["-np", "1", kiln] + args(bad) + [":", "-np", "1", kiln] + args(bad, data=missing),
               "rank 1: ")
one_line_error("rank 1 trains on other data",
               mp + ["-np", "1", kiln] + args(bad) + [":", "-np", "1", kiln] + args(bad, data=other),
               "rank 1: the model, data or options differ")

print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
