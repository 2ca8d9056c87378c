#!/usr/bin/env bash
# kiln's CUDA FlashAttention against PyTorch's scaled_dot_product_attention (flash and cuDNN backends), bf16,
# forward and backward, measured in the same run on the same GPU: 16k tokens per batch, width 2048, sequence
# lengths 1k..16k, head dims 64 and 128, causal and not. Prints a table of TFLOP/s with ratios kiln / peer.
# usage: ATTN_BENCH=build/cuda_attention_bench bash bench/attention_vs_torch_cuda.sh [extra flags for both]
#        (e.g. --seqs 1024,4096 --hds 128 --iters 10)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bench="${ATTN_BENCH:-$here/build/cuda_attention_bench}"
py="${PYTHON:-python3}"
[ -x "$bench" ] || { echo "no $bench (build the cuda_attention_bench target, or set ATTN_BENCH)" >&2; exit 1; }

ours=$("$bench" "$@")
peers=$("$py" "$here/bench/torch_attention_bench.py" "$@" || true)

"$py" - "$ours" "$peers" <<'PY'
import json, sys
rows = {}
for line in (sys.argv[1] + "\n" + sys.argv[2]).splitlines():
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    rows.setdefault((r["op"], r["hd"], r["causal"], r["seq"]), {})[r["impl"]] = r["tflops"]
peers = ["torch-flash", "torch-cudnn"]
head = f"{'op':4} {'hd':>4} {'causal':>6} {'seq':>6} | {'kiln':>7} | " + " | ".join(f"{p:>11} {'ratio':>6}" for p in peers)
print("TFLOP/s (ratio = kiln / peer)")
print(head)
print("-" * len(head))
for key in sorted(rows, key=lambda k: (k[0] != "fwd", k[1], k[2], k[3])):
    r = rows[key]
    k = r.get("kiln")
    cells = []
    for p in peers:
        v = r.get(p)
        ratio = f"{k / v:6.2f}" if k and v else f"{'-':>6}"
        cells.append(f"{v if v is not None else '-':>11} {ratio}")
    print(f"{key[0]:4} {key[1]:>4} {str(key[2]).lower():>6} {key[3]:>6} | {k if k is not None else '-':>7} | " +
          " | ".join(cells))
PY
