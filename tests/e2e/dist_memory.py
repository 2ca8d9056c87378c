"""Per-rank model-state memory under ZeRO against `kiln memory`'s plan (DeepSpeed's accounting).

Each rank measures its resident-memory growth while it builds the model and its part of the optimizer
(`kiln train` prints the largest rank's figure); `kiln memory --zero-stage S --ranks N` plans weights +
gradients + optimizer bytes from the paper's formulas (stage 1 optimizer states / N, stage 2 also gradients
/ N, stage 3 also parameters / N), plus at stages 2 and 3 the sharded model's working buffers (one unit's
gradient at a time, and at stage 3 its parameters: the embeddings, the head, two layers). Every stage must
agree within 10% on 2 and 3 ranks. The model is deep and narrow with a small vocabulary, so the buffers are a
small part of the plan and the measured memory falls as the formulas say (their ratio is printed too).

usage: dist_memory.py KILN_BINARY MPIRUN WORK_DIR
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys

kiln, mpirun, work = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
cfg = os.path.join(work, "config.json")
# About 3.2M parameters in 16 layers: 52 MB of fp32 state, large beside the process's own few MB.
json.dump({"n_layer": 16, "n_head": 4, "n_embd": 128, "vocab_size": 512, "n_positions": 64}, open(cfg, "w"))
n = 20000
shard = os.path.join(work, "data.bin")
with open(shard, "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    f.write(struct.pack(f"<{n}H", *[(i * i + 3 * i) % 512 for i in range(n)]))
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")

ok = True
for ranks in (2, 3):
    for stage in (0, 1, 2, 3):
        r = subprocess.run([mpirun, "-q", "--oversubscribe", "-np", str(ranks), kiln, "train", "--model", cfg, "--data",
                            shard, "--batch", "6", "--seq", "16", "--steps", "1", "--threads", "1", "--no-progress",
                            "--zero-stage", str(stage)], env=env, capture_output=True, text=True, timeout=120)
        m = re.search(r"state per rank measured ([0-9.]+) MB", r.stderr)
        assert r.returncode == 0 and m, r.stderr
        measured = float(m.group(1))
        p = subprocess.run([kiln, "memory", "--model", cfg, "--zero-stage", str(stage), "--ranks", str(ranks), "--json"],
                           capture_output=True, text=True)
        z = json.loads(p.stdout)[f"zero{stage}"]
        formula = (z["weights_bytes"] + z["gradients_bytes"] + z["optimizer_bytes"]) / 2**20
        plan = formula + z["buffers_bytes"] / 2**20
        ratio = measured / plan
        good = abs(ratio - 1) <= 0.10
        print(f"{'ok  ' if good else 'FAIL'} {ranks} ranks, ZeRO {stage}: measured {measured:.1f} MB per rank, plan "
              f"{plan:.1f} MB (formulas {formula:.1f} + buffers {z['buffers_bytes'] / 2**20:.1f}), ratio {ratio:.3f} "
              f"(to the formulas alone {measured / formula:.3f})")
        ok &= good
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
