"""Dynamic loss scaling: an injected overflow skips exactly that step and halves the scale, training then
goes on with finite losses; overflow at every step stops with a clear message after --max-skipped-steps,
leaving the last checkpoint whole.

usage: loss_scale.py KILN_BINARY WORK_DIR
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
n = 4000
with open(os.path.join(work, "d.bin"), "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    f.write(struct.pack(f"<{n}H", *[(i * 7 + i // 5) % 97 for i in range(n)]))
base = [kiln, "train", "--model", cfg, "--data", os.path.join(work, "d.bin"), "--batch", "2", "--seq", "16",
        "--loss-scale", "dynamic", "--initial-loss-scale", "1024", "--loss-scale-window", "4",
        "--threads", "2", "--no-progress"]

ok = True
m = os.path.join(work, "m.jsonl")
r = subprocess.run(base + ["--steps", "12", "--metrics", m], env=dict(os.environ, KILN_TEST_OVERFLOW_AT_STEP="3"))
rows = [json.loads(l) for l in open(m)]
scales = [x["loss_scale"] for x in rows]
skipped = [x["step"] for x in rows if x.get("skipped")]
print("scales:", scales, "skipped:", skipped)
ok &= r.returncode == 0 and skipped == [3]
ok &= scales[:3] == [1024, 1024, 1024] and scales[3] == 512  # halved after the overflow
ok &= scales[7] == 1024  # doubled again after 4 clean steps (4, 5, 6, 7)
ok &= all(x["loss"] == x["loss"] for x in rows)

out = os.path.join(work, "ck")
subprocess.run(base + ["--out", out, "--steps", "3"], check=True)
before = open(os.path.join(out, "latest", "model.safetensors"), "rb").read()
r = subprocess.run(base + ["--out", out, "--steps", "40", "--resume", "--max-skipped-steps", "5"],
                   env=dict(os.environ, KILN_TEST_OVERFLOW_AT_STEP="every"), capture_output=True, text=True)
msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
print("every-step overflow:", r.returncode, msg)
ok &= r.returncode != 0 and "overflowed" in msg
ok &= open(os.path.join(out, "latest", "model.safetensors"), "rb").read() == before
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
