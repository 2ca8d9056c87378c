#!/usr/bin/env bash
# Speculative decoding beside plain decoding of the same target, in the same run, per weight format and
# draft length: tokens/s of each (median of REPS runs), the ratio, and the draft's acceptance rate.
#
#   bench/speculative_bench.sh KILN TARGET_DIR DRAFT_DIR [PROMPT_IDS] [MAX_NEW] [REPS] [THREADS]
#
# TARGET_DIR / DRAFT_DIR: checkpoints trained on the same corpus with the same tokenizer (kiln train --out;
# the step_* directory). Greedy decoding, so the speculative output must equal the plain one (checked).
set -euo pipefail
kiln=$1 target=$2 draft=$3
prompt=${4:-464,3290,318,257}
max_new=${5:-128}
reps=${6:-3}
threads=${7:-2}
py=/usr/bin/python3

run() {  # extra args... -> one JSON line
  "$kiln" generate --model "$target" --prompt-ids "$prompt" --max-new "$max_new" --temperature 0 --json \
    --eot-id -1 --threads "$threads" "$@" 2>/dev/null
}
median_of() {  # label, extra args...
  local label=$1; shift
  local out=()
  for _ in $(seq "$reps"); do out+=("$(run "$@")"); done
  printf '%s\n' "${out[@]}" | $py -c '
import json, sys, statistics
rows = [json.loads(l) for l in sys.stdin if l.strip()]
tps = statistics.median(r["decode_tokens_per_s"] for r in rows)
spec = rows[0].get("speculative")
acc = spec["acceptance_rate"] if spec else float("nan")
print(json.dumps({"label": sys.argv[1], "tokens_per_s": tps, "acceptance": acc, "tokens": rows[0]["tokens"]}))
' "$label"
}

echo "speculative_bench: target $target, draft $draft, $max_new new tokens, median of $reps, $threads threads"
printf '%-6s %-8s %12s %12s %8s %10s\n' format K plain_tok/s spec_tok/s ratio acceptance
for fmt in f32 bf16 q8_0; do
  plain=$(median_of plain --weights-dtype "$fmt")
  for k in 2 4 6; do
    spec=$(median_of spec --weights-dtype "$fmt" --draft-model "$draft" --draft-tokens "$k")
    $py - "$fmt" "$k" "$plain" "$spec" <<'PY'
import json, sys
fmt, k, p, s = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
same = "" if p["tokens"] == s["tokens"] else "  OUTPUT DIFFERS FROM PLAIN GREEDY"
print(f"{fmt:<6} {k:<8} {p['tokens_per_s']:12.1f} {s['tokens_per_s']:12.1f} {s['tokens_per_s'] / p['tokens_per_s']:8.2f} "
      f"{s['acceptance']:10.3f}{same}")
PY
  done
done
