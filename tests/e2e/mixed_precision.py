"""bf16 and fp16 (with dynamic loss scaling) training track the fp32 run: 50 steps from the same
initial weights on the same data, per-step loss within 1% relative of fp32's, and the final loss within
0.5%. The runs must also differ (16-bit rounding really happens).

usage: mixed_precision.py KILN_BINARY WORK_DIR
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
json.dump({"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 251, "n_positions": 64}, open(cfg, "w"))
n = 30000
toks = [(i * 11 + (i // 7) * 5 + (i * i) % 13) % 251 for i in range(n)]
with open(os.path.join(work, "d.bin"), "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    f.write(struct.pack(f"<{n}H", *toks))

runs = {}
for dtype in ["fp32", "bf16", "fp16"]:
    m = os.path.join(work, dtype + ".jsonl")
    subprocess.run([kiln, "train", "--model", cfg, "--data", os.path.join(work, "d.bin"), "--batch", "4", "--seq", "32",
                    "--steps", "50", "--lr", "3e-3", "--warmup", "5", "--dtype", dtype, "--seed", "7", "--threads", "2",
                    "--metrics", m, "--no-progress"], check=True)
    runs[dtype] = [json.loads(l) for l in open(m)]

ok = True
f32 = [r["loss"] for r in runs["fp32"]]
for dtype in ["bf16", "fp16"]:
    lo = [r["loss"] for r in runs[dtype]]
    worst = max(abs(a - b) / b for a, b in zip(lo, f32))
    final = abs(lo[-1] - f32[-1]) / f32[-1]
    skipped = runs[dtype][-1].get("skipped_steps", 0)
    print(f"{dtype}: worst per-step relative loss difference {worst:.2e}, final {final:.2e} "
          f"(fp32 {f32[0]:.4f} -> {f32[-1]:.4f}, {dtype} -> {lo[-1]:.4f}), skipped steps {skipped}")
    ok &= worst < 0.01 and final < 0.005 and lo != f32 and len(lo) == 50
    ok &= f32[-1] < f32[0] - 0.5  # it learned something
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
