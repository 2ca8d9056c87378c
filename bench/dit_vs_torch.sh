#!/usr/bin/env bash
# A DiT training step on 28×28 Fashion-MNIST-sized images: kiln (kiln train --objective edm --model DiT-S/2) beside
# the PyTorch peer (bench/torch_dit_bench.py: the same DiT, EDM loss, AdamW) on the same cores, medians of the steps
# after the first. usage: bench/dit_vs_torch.sh IMAGE_DIR [BATCH] [STEPS] [THREADS] [PRESET: S|B] [PATCH]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="$1"; batch="${2:-8}"; steps="${3:-5}"; threads="${4:-2}"; preset="${5:-S}"; patch="${6:-2}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$here/build/kiln" train --objective edm --model "DiT-$preset/$patch" --data "$data" --batch "$batch" \
  --steps $((steps + 1)) --threads "$threads" --weight-decay 0 --val-batches 0 --metrics "$tmp/m.jsonl" --no-progress >/dev/null
kiln=$(/usr/bin/python3 -c "
import json, statistics, sys
t = [json.loads(l)['step_seconds'] for l in open('$tmp/m.jsonl')][1:]
print(statistics.median(t))")
torch=$(/usr/bin/python3 "$here/bench/torch_dit_bench.py" --preset "$preset" --patch "$patch" --batch "$batch" \
  --steps "$steps" --threads "$threads" | /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)['torch_step_seconds_median'])")
/usr/bin/python3 -c "
k, t = $kiln, $torch
print(f'DiT-$preset/$patch 28x28 batch $batch threads $threads: kiln {k:.3f} s/step, torch {t:.3f} s/step, kiln speedup {t / k:.2f}x')"
