#!/usr/bin/env bash
# MTP self-drafting beside plain decoding of the same model, in the same run: tokens/s of each (median of REPS
# runs per prompt), the ratio, the acceptance rate of the modules' drafts and each draft position's (position 1:
# the module-1 guess of the second token, which DeepSeek-V3 reports accepted 85-90% of the time), greedy and
# sampled.
#
#   bench/mtp_self_draft.sh KILN MODEL_DIR [MAX_NEW] [REPS] [THREADS] [DRAFT_TOKENS]
#
# DRAFT_TOKENS: chained drafts per round (default: one per MTP module).
#
# MODEL_DIR: a checkpoint with MTP modules (num_nextn_predict_layers), e.g. trained with kiln train --mtp-lambda
# on the fortunes corpus (scripts/quickstart.sh's data). Greedy self-drafted output must equal plain (checked).
set -euo pipefail
kiln=$1 model=$2
max_new=${3:-128}
reps=${4:-3}
threads=${5:-2}
draft=()
if [ -n "${6:-}" ]; then draft=(--draft-tokens "$6"); fi
py=/usr/bin/python3
prompts=("The meaning of life is" "A computer" "Q: Why did the chicken" "You will" "It is a truth universally")

run() {  # prompt, extra args... -> one JSON line
  local p=$1; shift
  "$kiln" generate --model "$model" --prompt "$p" --max-new "$max_new" --json --eot-id -1 --threads "$threads" "$@" \
    2>/dev/null
}
echo "mtp_self_draft: $model, $max_new new tokens, median of $reps, $threads threads"
printf '%-10s %-28s %12s %12s %8s %10s  %s\n' mode prompt plain_tok/s mtp_tok/s ratio acceptance per_position
for mode in greedy sampled; do
  if [ $mode = greedy ]; then s=(--temperature 0); else s=(--temperature 0.8 --top-k 40 --seed 1); fi
  for p in "${prompts[@]}"; do
    plain=(); mtp=()
    for _ in $(seq "$reps"); do
      plain+=("$(run "$p" "${s[@]}" --no-mtp-draft)")
      mtp+=("$(run "$p" "${s[@]}" --mtp-draft "${draft[@]}")")
    done
    $py - "$mode" "$p" "$(printf '%s\n' "${plain[@]}")" "$(printf '%s\n' "${mtp[@]}")" <<'PY'
import json, statistics, sys
mode, prompt = sys.argv[1], sys.argv[2]
plain = [json.loads(l) for l in sys.argv[3].splitlines() if l.strip()]
mtp = [json.loads(l) for l in sys.argv[4].splitlines() if l.strip()]
tp = statistics.median(r["decode_tokens_per_s"] for r in plain)
tm = statistics.median(r["decode_tokens_per_s"] for r in mtp)
acc = mtp[0]["speculative"]["acceptance_rate"]
per = " ".join(f"{a:.3f}" for a in mtp[0]["speculative"]["accepted_per_position"])
same = "" if mode != "greedy" or plain[0]["tokens"] == mtp[0]["tokens"] else "  OUTPUT DIFFERS FROM PLAIN GREEDY"
print(f"{mode:<10} {prompt[:28]:<28} {tp:12.1f} {tm:12.1f} {tm / tp:8.2f} {acc:10.3f}  {per}{same}")
PY
  done
done
