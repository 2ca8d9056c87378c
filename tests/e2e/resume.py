"""Resume test: an uninterrupted 20-step run against runs killed (SIGKILL) mid-way and resumed.

Run A trains 20 steps. Run B is killed after step 13 (its last checkpoint is step 10) and resumed.
Run C is killed while writing the step-15 checkpoint (after the weights, before the state file) and
resumed: `latest` must still name the whole step-10 checkpoint. Losses and final weights must be identical.

usage: resume.py KILN_BINARY WORK_DIR
"""
import json
import os
import shutil
import struct
import subprocess
import sys

kiln, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
cfg = os.path.join(work, "config.json")
json.dump({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 97, "n_positions": 32}, open(cfg, "w"))
n = 5000
toks = [(i * i + 3 * i) % 97 for i in range(n)]
shard = os.path.join(work, "data.bin")
with open(shard, "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    f.write(struct.pack(f"<{n}H", *toks))


def train(name, extra_env=None, resume=False, expect_kill=False):
    out = os.path.join(work, name)
    cmd = [kiln, "train", "--model", cfg, "--data", shard, "--batch", "4", "--seq", "16", "--steps", "20",
           "--save-every", "5", "--warmup", "3", "--lr", "3e-3", "--out", out, "--metrics", out + ".jsonl",
           "--threads", "2", "--no-progress"] + (["--resume"] if resume else [])
    env = dict(os.environ, **(extra_env or {}))
    r = subprocess.run(cmd, env=env)
    if expect_kill:
        assert r.returncode == -9, f"{name}: expected SIGKILL, got {r.returncode}"
    else:
        assert r.returncode == 0, f"{name}: exit {r.returncode}"
    return out


def losses(out):
    return [json.loads(l)["loss"] for l in open(out + ".jsonl")]


a = train("A")
b = train("B", {"KILN_TEST_KILL_AT_STEP": "13"}, expect_kill=True)
assert os.path.realpath(os.path.join(b, "latest")).endswith("step_00000010"), "B: latest should be step 10"
train("B", resume=True)
c = train("C", {"KILN_TEST_KILL_IN_SAVE": "15"}, expect_kill=True)
assert os.path.realpath(os.path.join(c, "latest")).endswith("step_00000010"), "C: latest moved before the save ended"
train("C", resume=True)

ok = True
la = losses(a)
for name, out in [("B", b), ("C", c)]:
    lb = losses(out)
    same_losses = la == lb
    wa = open(os.path.join(a, "latest", "model.safetensors"), "rb").read()
    wb = open(os.path.join(out, "latest", "model.safetensors"), "rb").read()
    sa = open(os.path.join(a, "latest", "train_state.safetensors"), "rb").read()
    sb = open(os.path.join(out, "latest", "train_state.safetensors"), "rb").read()
    print(f"{name}: {len(lb)} metric lines, losses identical: {same_losses}, weights identical: {wa == wb}, "
          f"state identical: {sa == sb}")
    ok &= same_losses and wa == wb and sa == sb and len(lb) == 20
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
