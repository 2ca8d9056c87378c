"""kiln memory against an independent count: parameter floats from the GPT-2 shapes (each tensor padded to
16 floats, as the parameter block lays them out), ZeRO per-rank bytes from the paper's accounting
(fp32: 4Ψ + 4Ψ + 8Ψ; 16-bit: 2Ψ + 2Ψ + 12Ψ; stage 1 shards the optimizer, 2 also gradients, 3 also weights),
and activations that shrink with recomputation. Bad flags give one-line errors.

usage: memory_plan.py KILN_BINARY
"""
import json
import subprocess
import sys

kiln = sys.argv[1]
cfg_path = __file__.rsplit("/", 3)[0] + "/bench/gpt2-124m.json"
cfg = json.load(open(cfg_path))
C, V, L, P = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"], cfg["n_positions"]
pad = lambda n: (n + 15) // 16 * 16
per_layer = [C, C, C * 3 * C, 3 * C, C * C, C, C, C, C * 4 * C, 4 * C, 4 * C * C, C]
psi = pad(V * C) + pad(P * C) + L * sum(pad(n) for n in per_layer) + 2 * pad(C)


def plan(*flags):
    r = subprocess.run([kiln, "memory", "--model", cfg_path, "--json"] + list(flags), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


ok = True
for dtype, (w, g, o) in [("fp32", (4, 4, 8)), ("bf16", (2, 2, 12))]:
    j = plan("--dtype", dtype, "--ranks", "8")
    ok &= j["params"] == 124439808 and j["param_floats"] == psi
    for stage in range(4):
        z = j[f"zero{stage}"]
        want = (psi * w / (8 if stage >= 3 else 1), psi * g / (8 if stage >= 2 else 1), psi * o / (8 if stage >= 1 else 1))
        got = (z["weights_bytes"], z["gradients_bytes"], z["optimizer_bytes"])
        if any(abs(a - b) > 0.5 for a, b in zip(got, want)):
            print(f"{dtype} stage {stage}: got {got}, want {want}")
            ok = False
none, block = plan()["activations_bytes"], plan("--recompute", "block")["activations_bytes"]
print(f"param floats {psi}; activations none {none / 2**20:.1f} MB, block {block / 2**20:.1f} MB")
ok &= block * 4 < none
for bad in [["--zero-stage", "4"], ["--ranks", "0"], ["--recompute", "every:0"], ["--dtype", "fp8"]]:
    r = subprocess.run([kiln, "memory", "--model", cfg_path] + bad, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    ok &= r.returncode != 0 and len(lines) == 1

# The GPU trainer's plan (kiln memory --device cuda): model state 18 bytes per parameter float (fp32 weights,
# bf16 copy, fp32 gradients, m, v), and activations against a count of the Transformer's named buffers on the
# CUDA backend (bf16 activations, fp32 residual stream and statistics, logits at a vocabulary stride padded to
# 64, the integer inputs). The kernels' scratch (norm partial sums, the embedding sort, the dQ accumulator) is
# not in the count: within 10%.
B, T, NH = 8, 256, cfg["n_head"]
N, Vp = B * T, (V + 63) // 64 * 64
# per block: ln1, att, ln2 (bf16 [N,C]); qkv; up and act (bf16 [N,4C]); mean/rstd twice; lse; h (fp32)
layer = N * C * 2 * 3 + N * 3 * C * 2 + 2 * N * 4 * C * 2 + 4 * N * 4 + NH * N * 4 + N * C * 4
# the embedding and every block's output (fp32); lnf (+ mean/rstd) and its gradient; logits; losses; the
# residual gradient (fp32 and its bf16 copy); backward scratch d_ln, d_att, d_qkv, d_up; tokens, pos, targets,
# cu_seqlens.
glob = N * C * 2 + 2 * N * 4 + N * C * 2 + N * 4 + N * C * 4 + N * C * 2 \
    + N * C * 2 * 2 + N * 3 * C * 2 + N * 4 * C * 2 + 4 * N * 4
count = (L + 1) * N * C * 4 + L * layer + glob + N * Vp * 2
g = plan("--device", "cuda", "--batch", str(B), "--seq", str(T))
print(f"GPU plan: state {g['state_bytes'] / 2**20:.1f} MB (want {18 * psi / 2**20:.1f}), activations "
      f"{g['activations_bytes'] / 2**20:.1f} MB (named buffers {count / 2**20:.1f} MB)")
ok &= g["state_bytes"] == 18 * psi and count <= g["activations_bytes"] <= 1.10 * count
# --recompute block on the GPU keeps each block's input and one block's activations: the L per-layer sets
# (`layer` bytes each) shrink to one, the L block outputs to the L - 1 segment inputs and the final output, and
# the logits are held 64 rows at a time.
gb = plan("--device", "cuda", "--batch", str(B), "--seq", str(T), "--recompute", "block")
want = (L - 1) * layer - N * C * 4 + (N - 64) * Vp * 2
print(f"GPU plan with block recomputation: activations {gb['activations_bytes'] / 2**20:.1f} MB "
      f"(saves {(g['activations_bytes'] - gb['activations_bytes']) / 2**20:.1f} MB, counted {want / 2**20:.1f} MB)")
ok &= abs((g["activations_bytes"] - gb["activations_bytes"]) - want) < 0.01 * layer
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
