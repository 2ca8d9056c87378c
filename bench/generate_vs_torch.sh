#!/usr/bin/env bash
# Greedy generation at batch 1, kiln and PyTorch side by side: the same GPT-2 shape with random weights (fp32),
# the same prompt length and number of new tokens, the same threads; prefill and decode tokens/s (best of
# `repeats` runs each) and the ratio. kiln's model comes from `kiln generate --random-init`.
# usage: bench/generate_vs_torch.sh [config.json] [prompt_len] [max_new] [threads] [repeats]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cfg="${1:-$here/bench/gpt2-124m.json}"; P="${2:-16}"; N="${3:-128}"; TH="${4:-$(nproc)}"; R="${5:-3}"
kiln="${KILN:-$here/build/kiln}"
# The PyTorch peer's OpenBLAS gets the kernels kiln runs on (kiln picks them by CPU feature where OpenBLAS does not
# recognise the CPU; kernels/matmul.h), so both sides multiply with the same code.
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$("$kiln" version | sed -n 's/^blas core: //p')}"
py=/usr/bin/python3

ids=$($py -c "
import json, random, sys
V = json.load(open(sys.argv[1]))['vocab_size']
random.seed(0)
print(','.join(str(random.randrange(V)) for _ in range(int(sys.argv[2]))))" "$cfg" "$P")

# kiln: one process per run (model init is not timed); its stderr line carries both speeds.
runs=""
for _ in $(seq "$R"); do
  line=$("$kiln" generate --random-init "$cfg" --prompt-ids "$ids" --max-new "$N" --temperature 0 --eot-id -1 \
         --json --threads "$TH" 2>&1 >/dev/null | grep 'prefill')
  runs="$runs$line"$'\n'
done
ours=$($py -c "
import json, re, sys
pre, dec = [], []
for l in filter(None, sys.stdin.read().splitlines()):
    m = re.search(r'prefill (\d+) tokens .*\(([\d.]+) tokens/s\), decode (\d+) tokens .*\(([\d.]+) tokens/s\)', l)
    pre.append(float(m.group(2))); dec.append(float(m.group(4)))
print(json.dumps({'impl': 'kiln', 'threads': int(sys.argv[1]), 'prompt_tokens': int(sys.argv[2]),
                  'new_tokens': int(sys.argv[3]), 'prefill_tokens_per_s': max(pre), 'decode_tokens_per_s': max(dec)}))
" "$TH" "$P" "$N" <<< "$runs")
peer=$(LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp $py "$here/bench/torch_generate_bench.py" "$cfg" \
       --prompt-len "$P" --max-new "$N" --threads "$TH" --repeats "$R")
echo "kiln:    $ours"
echo "pytorch: $peer"
$py -c "
import json, sys
a = json.loads(sys.argv[1]); b = json.loads(sys.argv[2])
print(f\"decode: kiln {a['decode_tokens_per_s']:.1f} tokens/s, pytorch {b['decode_tokens_per_s']:.1f} tokens/s: \"
      f\"kiln is {a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x faster\")
print(f\"prefill: kiln {a['prefill_tokens_per_s']:.0f} tokens/s, pytorch {b['prefill_tokens_per_s']:.0f} tokens/s: \"
      f\"kiln is {a['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x faster\")
" "$ours" "$peer"
