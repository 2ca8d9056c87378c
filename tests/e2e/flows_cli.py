"""Likelihoods and flows through the CLI on a tiny image set (8x8, written here in the documented shard format):
kiln train --objective nll (a small RealNVP and NICE) logs bits/dim and writes eval.json; kiln sample on a flow
writes the grid; kiln likelihood gives a flow's exact bits/dim (equal to eval.json's test_loss, computed by the
trainer on the same test images) and a diffusion model's bits/dim through the probability-flow ODE, exact trace
and Hutchinson's; bad input is one line on stderr and a non-zero exit.

usage: flows_cli.py KILN_BINARY WORK_DIR
"""
import json
import math
import os
import shutil
import struct
import subprocess
import sys

kiln, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
H = 8


def write_split(name, n, seed):
    """n images [n, 1, H, H]: a horizontal or vertical bar (the class) on a noisy dark background, 8-bit values."""
    imgs, labels = [], []
    s = seed

    def draw(m):
        nonlocal s
        s = (s * 1103515245 + 12345) % 2**31
        return (s >> 8) % m

    for k in range(n):
        c, pos = k % 2, draw(H)
        for i in range(H):
            for j in range(H):
                on = (i == pos) if c == 0 else (j == pos)
                p = 160 + draw(90) if on else draw(80)
                imgs.append(p / 127.5 - 1)
        labels.append(c)
    data = struct.pack(f"<{len(imgs)}f", *imgs) + struct.pack(f"<{n}i", *labels)
    hdr = {"__metadata__": {"format": "kiln-images", "version": "1", "classes": "2", "channels": "1",
                            "height": str(H), "width": str(H)},
           "images": {"dtype": "F32", "shape": [n, 1, H, H], "data_offsets": [0, 4 * len(imgs)]},
           "labels": {"dtype": "I32", "shape": [n], "data_offsets": [4 * len(imgs), len(data)]}}
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(work, "data", f"{name}_000000.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


os.makedirs(os.path.join(work, "data"))
write_split("train", 256, 1)
write_split("test", 64, 2)
write_split("val", 32, 3)
json.dump({"format": "kiln-images", "version": 1, "classes": 2, "channels": 1, "height": H, "width": H,
           "class_names": ["h", "v"], "train": 256, "val": 32, "test": 64,
           "shards": {"train": ["train_000000.safetensors"], "val": ["val_000000.safetensors"],
                      "test": ["test_000000.safetensors"]}},
          open(os.path.join(work, "data", "images.json"), "w"))
data = os.path.join(work, "data")


def run(args, want_rc=0):
    r = subprocess.run([kiln] + args, capture_output=True, text=True)
    if r.returncode != want_rc:
        print(f"BAD exit {r.returncode} for {' '.join(args)}\n{r.stderr}")
        sys.exit(1)
    return r


ok = True
for preset, extra in [("realnvp", {}), ("nice", {"additive": True})]:
    cfg = os.path.join(work, f"{preset}.json")
    json.dump({"model_type": "realnvp", "scales": 2, "couplings": 2, "final_couplings": 2, "hidden": 32,
               "depth": 1, **extra}, open(cfg, "w"))
    out = os.path.join(work, preset)
    metrics = os.path.join(work, preset + ".jsonl")
    run(["train", "--objective", "nll", "--model", cfg, "--data", data, "--batch", "32", "--steps", "60", "--lr",
         "3e-3", "--warmup", "5", "--out", out, "--metrics", metrics, "--no-progress", "--threads", "1"])
    steps = [json.loads(l) for l in open(metrics)]
    ev = json.load(open(os.path.join(out, "eval.json")))
    first, last = steps[0]["loss"], steps[-1]["loss"]
    # Test within 1 bit/dim of training (the same distribution; a short run does not overfit 256 images).
    good = ev["objective"] == "nll" and last < first - 0.5 and abs(ev["test_loss"] - last) < 1.0
    print(("ok  " if good else "BAD ") + f"{preset}: train bits/dim {first:.3f} -> {last:.3f}, test {ev['test_loss']:.3f}")
    ok &= good
    grid = os.path.join(work, preset + ".png")
    s = json.loads(run(["sample", "--model", out, "--count", "9", "--out", grid, "--temperature", "0.8"]).stdout)
    good = os.path.getsize(grid) > 0 and os.path.exists(s["samples"]) and s["model"] == "realnvp"
    print(("ok  " if good else "BAD ") + f"{preset}: sample wrote {grid}")
    ok &= good
    l = json.loads(run(["likelihood", "--model", out, "--data", data, "--count", "0", "--batch", "32"]).stdout)
    # The trainer's test_loss: the same images, batch and evaluation noise.
    good = abs(l["bits_per_dim"] - ev["test_loss"]) < 1e-9 and l["images"] == 64 and l["method"] == "exact"
    print(("ok  " if good else "BAD ") + f"{preset}: likelihood {l['bits_per_dim']:.6f} = eval.json {ev['test_loss']:.6f}")
    ok &= good

# A small diffusion model (flow matching), a few steps: the ODE likelihood with the exact trace and Hutchinson's.
dit = os.path.join(work, "dit.json")
json.dump({"model_type": "dit", "patch": 4, "hidden": 32, "depth": 1, "heads": 2, "mlp_ratio": 2, "freq_dim": 32},
          open(dit, "w"))
run(["train", "--objective", "flow", "--model", dit, "--data", data, "--batch", "16", "--steps", "20", "--out",
     os.path.join(work, "dit"), "--no-progress", "--threads", "1"])
common = ["likelihood", "--model", os.path.join(work, "dit"), "--data", data, "--count", "8", "--batch", "8",
          "--steps", "4"]
ex = json.loads(run(common + ["--trace", "exact"]).stdout)  # --jacobian vjp, the default
hu = json.loads(run(common + ["--probes", "4"]).stdout)
fd = json.loads(run(common + ["--trace", "exact", "--jacobian", "fd"]).stdout)
# Same images and dequantisation (seed 1): Hutchinson's mean within 4 standard errors of the exact trace's.
diff = abs(ex["bits_per_dim"] - hu["bits_per_dim"])
good = ex["nfe_per_image"] == 4 * 4 * 64 and ex["backward_passes_per_image"] == 4 * 4 * 64 and \
    hu["nfe_per_image"] == 4 * 4 * 4 and diff < 4 * hu["standard_error"] + 0.01
print(("ok  " if good else "BAD ") + f"dit: exact {ex['bits_per_dim']:.4f}, hutchinson {hu['bits_per_dim']:.4f} "
      f"± {hu['standard_error']:.4f}")
ok &= good
# The exact trace by backward passes and by finite differences: the same density up to the difference
# quotient's error (~1e-4 relative on the trace, infer/likelihood.h).
good = fd["nfe_per_image"] == 4 * 4 * (1 + 2 * 64) and abs(fd["bits_per_dim"] - ex["bits_per_dim"]) < 1e-3
print(("ok  " if good else "BAD ") + f"dit: exact trace vjp {ex['bits_per_dim']:.6f}, fd {fd['bits_per_dim']:.6f}")
ok &= good

# --noise: the starting noise from a file, so a deterministic sampler's samples no longer depend on --seed (and
# differ from the seeded run's).
import struct  # noqa: E402
noise = os.path.join(work, "noise.safetensors")
vals = [((i * 7919) % 1000) / 500.0 - 1.0 for i in range(2 * H * H)]
head = json.dumps({"noise": {"dtype": "F32", "shape": [2, 1, H, H], "data_offsets": [0, 4 * len(vals)]}}).encode()
head += b" " * ((8 - len(head) % 8) % 8)
with open(noise, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + struct.pack(f"<{len(vals)}f", *vals))
sam = ["sample", "--model", os.path.join(work, "dit"), "--sampler", "flow-euler", "--steps", "2", "--count", "2"]
outs = []
for seed, extra in [("1", ["--noise", noise]), ("2", ["--noise", noise]), ("1", [])]:
    png = os.path.join(work, f"noise{len(outs)}.png")
    run(sam + ["--seed", seed, "--out", png] + extra)
    outs.append(open(png[:-4] + ".safetensors", "rb").read())
good = outs[0] == outs[1] and outs[0] != outs[2]
print(("ok  " if good else "BAD ") + "sample --noise: the file's noise, whatever the seed")
ok &= good

# Bad input: one line, non-zero exit.
ddpm = os.path.join(work, "ddpm")
run(["train", "--objective", "ddpm", "--model", dit, "--data", data, "--batch", "4", "--steps", "1", "--out", ddpm,
     "--no-progress", "--threads", "1"])
cases = [
    (["likelihood", "--model", ddpm, "--data", data], "ddpm"),
    (common + ["--trace", "approx"], "--trace"),
    (common + ["--probes", "0"], "--probes"),
    (common + ["--probe", "sphere"], "--probe"),
    (common + ["--jacobian", "reverse"], "--jacobian"),
    (["likelihood", "--model", os.path.join(work, "realnvp"), "--data", data, "--split", "extra"], "extra"),
    (["train", "--objective", "nll", "--model", dit, "--data", data, "--steps", "1", "--out",
      os.path.join(work, "x"), "--no-progress"], "density"),
    (["sample", "--model", os.path.join(work, "dit"), "--count", "2", "--out", os.path.join(work, "y.png")],
     "--sampler"),
    (["sample", "--model", os.path.join(work, "realnvp"), "--count", "2", "--out", os.path.join(work, "y.png"),
      "--temperature", "0"], "--temperature"),
    (sam[:-1] + ["3", "--noise", noise, "--out", os.path.join(work, "y.png")], "--noise"),
]
for cmd, needle in cases:
    r = subprocess.run([kiln] + cmd, capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    good = r.returncode != 0 and r.returncode < 128 and len(lines) == 1 and needle in lines[0]
    print(("ok  " if good else "BAD ") + f"exit {r.returncode}: {lines[-1] if lines else '(no message)'}")
    ok &= good
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
