#!/usr/bin/env bash
# GPU benchmarks on the H100 machine, each beside its PyTorch peer measured in the same run:
#   1. GPT-2 124M training step, bf16 (kiln --device cuda vs PyTorch autocast + fused AdamW, eager and compiled)
#   2. batch-1 greedy decoding of GPT-2 124M in bf16 (kiln's CUDA-graph step vs PyTorch eager / compiled)
#   3. attention forward/backward (bench/attention_vs_torch_cuda.sh: ours vs SDPA flash and cuDNN)
# usage: KILN=build/kiln bash bench/gpu_vs_torch.sh [batch] [seq] [new_tokens]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
kiln="${KILN:-$here/build/kiln}"
py="${PYTHON:-python3}"
cfg="$here/bench/gpt2-124m.json"
B="${1:-32}"; T="${2:-1024}"; NEW="${3:-256}"

echo "== training step, GPT-2 124M, B=$B T=$T, bf16"
ours=$("$kiln" bench train --device cuda --dtype bf16 --model "$cfg" --batch "$B" --seq "$T" --steps 10 --warmup 3)
eager=$("$py" "$here/bench/torch_gpt2_cuda.py" train "$cfg" --batch "$B" --seq "$T")
compiled=$("$py" "$here/bench/torch_gpt2_cuda.py" train "$cfg" --batch "$B" --seq "$T" --compile || echo '{}')
echo "kiln:            $ours"
echo "pytorch eager:   $eager"
echo "pytorch compile: $compiled"

echo "== batch-1 greedy decode, GPT-2 124M, bf16, $NEW new tokens"
ids=$(seq -s, 1 16)
gen_err=$("$kiln" generate --device cuda --random-init "$cfg" --prompt-ids "$ids" --max-new "$NEW" --temperature 0 \
          --eot-id -1 --json 2>&1 >/dev/null | grep 'tokens/s' | tail -1)
echo "kiln:            $gen_err"
geager=$("$py" "$here/bench/torch_gpt2_cuda.py" generate "$cfg" --new "$NEW")
gcompiled=$("$py" "$here/bench/torch_gpt2_cuda.py" generate "$cfg" --new "$NEW" --compile || echo '{}')
echo "pytorch eager:   $geager"
echo "pytorch compile: $gcompiled"

"$py" - "$ours" "$eager" "$compiled" "$gen_err" "$geager" "$gcompiled" <<'PY'
import json, re, sys
ours, eager, comp = (json.loads(x) for x in sys.argv[1:4])
print(f"\ntraining: kiln {ours['tokens_per_s']:,.0f} tok/s | pytorch eager {eager['tokens_per_s']:,.0f} "
      f"({ours['tokens_per_s']/eager['tokens_per_s']:.2f}x)" +
      (f" | pytorch compile {comp['tokens_per_s']:,.0f} ({ours['tokens_per_s']/comp['tokens_per_s']:.2f}x)" if comp else ""))
m = re.search(r"decode \d+ tokens in [\d.]+ s \(([\d.]+) tokens/s\)", sys.argv[4])
k = float(m.group(1)) if m else float("nan")
ge, gc = json.loads(sys.argv[5]), json.loads(sys.argv[6])
print(f"decode:   kiln {k:,.0f} tok/s | pytorch eager {ge['tokens_per_s']:,.0f} ({k/ge['tokens_per_s']:.2f}x)" +
      (f" | pytorch compile {gc['tokens_per_s']:,.0f} ({k/gc['tokens_per_s']:.2f}x)" if gc else ""))
PY

if [ -x "$here/bench/attention_vs_torch_cuda.sh" ] || [ -f "$here/bench/attention_vs_torch_cuda.sh" ]; then
  echo "== attention"
  bash "$here/bench/attention_vs_torch_cuda.sh"
fi
