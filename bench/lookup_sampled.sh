#!/usr/bin/env bash
# Prompt lookup where the text does not repeat itself: sampled decoding (temperature 1, top-k 40, one seed) of
# bench/decode_methods.sh's target, plain beside --prompt-lookup with the adaptive length and with
# --lookup-fixed-length, in the same run (each prompt's runs interleaved). Sampled outputs differ from run to run
# of a method only through the acceptance draws, so the figure is tokens/s, its ratio to plain, and acceptance.
#
#   bench/lookup_sampled.sh KILN [MODELS_DIR] [MAX_NEW] [REPS] [THREADS] [FORMAT] [K]
set -euo pipefail
kiln=$(realpath "$1")
dir=${2:-/work/bench-models}
max_new=${3:-128}
reps=${4:-3}
threads=${5:-2}
fmt=${6:-bf16}
k=${7:-8}
cd "$dir"
prompts=("The meaning of life is" "A computer" "Q: Why did the chicken" "You will be")
methods=("plain|--no-medusa" "lookup K=$k|--no-medusa|--prompt-lookup|--draft-tokens|$k"
         "lookup K=$k fixed|--no-medusa|--prompt-lookup|--draft-tokens|$k|--lookup-fixed-length")
echo "lookup_sampled: $fmt weights, temperature 1, top-k 40, seed 7, $max_new new tokens, ${#prompts[@]} prompts, median of $reps, $threads threads"
for _ in $(seq "$reps"); do
  for pi in "${!prompts[@]}"; do
    for mi in "${!methods[@]}"; do
      IFS='|' read -ra a <<< "${methods[$mi]}"
      echo "$mi $pi $("$kiln" generate --model target-medusa/latest --prompt "${prompts[$pi]}" --max-new "$max_new" \
        --temperature 1 --top-k 40 --seed 7 --json --eot-id -1 --threads "$threads" --weights-dtype "$fmt" \
        "${a[@]:1}" 2>/dev/null)"
    done
  done
done | /usr/bin/python3 -c '
import json, sys, statistics
labels = sys.argv[1:]
runs = {}
for line in sys.stdin:
    m, p, j = line.split(" ", 2)
    runs.setdefault((int(m), int(p)), []).append(json.loads(j))
prompts = sorted({p for _, p in runs})
def tps(m, p): return statistics.median(r["decode_tokens_per_s"] for r in runs[(m, p)])
print("%-18s %9s %8s %10s %9s" % ("method", "tokens/s", "x plain", "acceptance", "tok/round"))
for m, lab in enumerate(labels):
    sp = [runs[(m, p)][0].get("speculative", {}) for p in prompts]
    acc = statistics.median(s.get("acceptance_rate", float("nan")) for s in sp) if sp[0] else float("nan")
    tpr = statistics.median(s.get("tokens_per_round", 1.0) for s in sp) if sp[0] else 1.0
    print("%-18s %9.1f %8.2f %10.3f %9.2f" % (lab, statistics.median(tps(m, p) for p in prompts),
          statistics.median(tps(m, p) / tps(0, p) for p in prompts), acc, tpr))
' "${methods[@]%%|*}"
