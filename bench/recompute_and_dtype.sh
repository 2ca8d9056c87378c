#!/usr/bin/env bash
# Step time and activation memory per recompute policy, and bf16 vs fp32, on one model and batch.
# usage: bench/recompute_and_dtype.sh [config.json] [batch] [seq] [steps]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cfg="${1:-$here/bench/gpt2-124m.json}"; B="${2:-4}"; T="${3:-64}"; K="${4:-5}"
kiln="${KILN:-$here/build/kiln}"
run() { "$kiln" bench train --model "$cfg" --batch "$B" --seq "$T" --steps "$K" "$@"; }
{
  for p in none selective every:4 block; do run --recompute "$p"; done
  run --recompute block --lm-head-chunk 100000
  run --dtype bf16
} | /usr/bin/python3 -c "
import json, sys
rows = [json.loads(l) for l in sys.stdin]
base = rows[0]
print(f\"{'dtype':6} {'recompute':10} {'lm-chunk':>8} {'ms/step':>9} {'act MB':>8} {'time x':>7} {'act ÷':>6}\")
for r, extra in zip(rows, ['all', '64', '64', '64', 'all', 'all']):
    print(f\"{r['dtype']:6} {r['recompute']:10} {extra:>8} {r['ms_per_step']:9.0f} {r['activation_mb']:8.1f} \"
          f\"{r['ms_per_step']/base['ms_per_step']:7.2f} {base['activation_mb']/r['activation_mb']:6.2f}\")
"
