"""Bad input on the command line: every case must exit non-zero with exactly one line on stderr that names
the flag, field or file, and must not leave a checkpoint half-written.

usage: cli_errors.py KILN_BINARY WORK_DIR
"""
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

kiln, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
cfg = os.path.join(work, "config.json")
json.dump({"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 50, "n_positions": 16}, open(cfg, "w"))
bad_cfg = os.path.join(work, "bad_config.json")
json.dump({"n_layer": 1, "n_head": 3, "n_embd": 32, "vocab_size": 50, "n_positions": 16}, open(bad_cfg, "w"))
missing_cfg = os.path.join(work, "missing.json")
json.dump({"n_layer": 1, "n_head": 2, "vocab_size": 50, "n_positions": 16}, open(missing_cfg, "w"))


def shard(name, toks, magic=20240520, count=None):
    p = os.path.join(work, name)
    with open(p, "wb") as f:
        f.write(struct.pack("<256i", magic, 1, len(toks) if count is None else count, *([0] * 253)))
        f.write(struct.pack(f"<{len(toks)}H", *toks))
    return p


good = shard("good.bin", [i % 50 for i in range(400)])
wrong_magic = shard("magic.bin", [1] * 400, magic=1234)
too_big = shard("big.bin", [1] * 100 + [77] + [1] * 299)
truncated = shard("trunc.bin", [1] * 100, count=400)
ro = os.path.join(work, "readonly")
os.makedirs(ro)
os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)


def train(data=good, model=cfg, batch="2", seq="8"):
    return [kiln, "train", "--model", model, "--data", data, "--batch", batch, "--seq", seq, "--steps", "2",
            "--no-progress"]


cases = [
    (train() + ["--bogus-flag"], "--bogus-flag"),
    ([kiln, "train", "--model", cfg], "--data"),
    (train(model=bad_cfg), "n_head"),
    (train(model=missing_cfg), "n_embd"),
    (train(data=wrong_magic), "magic.bin"),
    (train(data=too_big), "big.bin"),
    (train(data=truncated), "trunc.bin"),
    (train(data=os.path.join(work, "none_*.bin")), "none_"),
    (train() + ["--recompute", "every:0"], "every"),
    (train() + ["--dtype", "fp8"], "--dtype"),
    (train(seq="64"), "seq"),
    (train(batch="0"), "--batch"),
    (train() + ["--resume", "--out", os.path.join(work, "empty_out")], "empty_out"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1,2,99", "--max-new", "2"], "99"),
    ([kiln, "memory", "--model", cfg, "--zero-stage", "7"], "--zero-stage"),
    (train() + ["--out", os.path.join(good, "run")], "good.bin/run"),  # a directory below a file
    (train() + ["--device", "tpu"], "--device"),
    (train() + ["--device", "cuda", "--dtype", "fp32"], "--dtype"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1", "--device", "cuda:x"], "--device"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1", "--weights-dtype", "q4_0"], "--weights-dtype"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1", "--draft-random-init", cfg, "--draft-tokens", "0"],
     "--draft-tokens"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1", "--draft-model", os.path.join(work, "nowhere")],
     "nowhere"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1", "--prompt-lookup", "--lookup-min-ngram", "0"],
     "--lookup-min-ngram"),
    ([kiln, "generate", "--random-init", cfg, "--prompt-ids", "1", "--prompt-lookup", "--draft-random-init", cfg],
     "--prompt-lookup"),
    # No GPU here: "--device cuda: no usable CUDA device (...)"; on a GPU: this model's head_dim 16 is refused.
    (train() + ["--device", "cuda", "--dtype", "bf16"], "--device"),
]
if os.geteuid() != 0:  # root ignores directory permissions
    cases.append((train() + ["--out", os.path.join(ro, "run")], "readonly"))

ok = True
for cmd, needle in cases:
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    good_case = r.returncode != 0 and len(lines) == 1 and needle in lines[0] and r.returncode < 128
    print(("ok  " if good_case else "BAD ") + f"exit {r.returncode}: {lines[-1] if lines else '(no message)'}")
    ok &= good_case
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
