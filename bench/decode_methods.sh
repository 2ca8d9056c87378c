#!/usr/bin/env bash
# Decoding methods side by side at batch 1 on the CPU, in the same run and weight format: plain greedy, speculative
# decoding with a small draft, and Medusa heads (a candidate tree per pass): tokens/s (median of REPS runs over
# each prompt), acceptance, and the ratio to plain greedy. Greedy, so every method's output must equal plain
# greedy's (checked, per prompt).
#
#   bench/decode_methods.sh KILN [MODELS_DIR] [MAX_NEW] [REPS] [THREADS] [FORMAT]
#
# MODELS_DIR (default /work/bench-models) holds, or gets (trained here on Debian's fortunes corpus, as
# scripts/quickstart.sh prepares it, under `nice -n 19` on KILN_TRAIN_THREADS threads, default 1: a shared
# machine; the target checkpoints every 50 steps and a rerun resumes it until target/DONE exists):
#   target/latest         a 32M GPT-2 (6 layers, 640 wide, 256-token context)
#   draft/latest          a 4M GPT-2 (4 layers, 256 wide) on the same tokenizer
#   target-medusa/latest  the target with Medusa heads (kiln train --medusa-heads, Medusa-1: the base frozen)
# Set KILN_TRAIN_STEPS_SCALE=0.5 to halve every training run (a loaded machine), or KILN_BENCH_NO_TRAIN=1 to
# train nothing (the methods whose models are missing are left out). A target stopped early (killed) is used as
# it stands once target/DONE is created by hand; the header line names the checkpoint step used.
# Methods: plain greedy; speculative with K = 2, 3, 4, 6 proposals, and with drafting that ends early where the
# draft is unsure (--draft-min-prob); prompt lookup (n-gram drafting from the sequence, no draft model) with K = 4,
# 6, 8 (the length adapting to what passed, and K = 8 kept fixed); Medusa with the default 16-node tree, smaller
# trees and chains. On a CPU whose multi-row products are compute-bound, each verified row costs a fraction of a step
# (bench/verify_pass_bench.cpp measures it), so the small configurations are the interesting ones.
set -euo pipefail
kiln=$(realpath "$1")
dir=${2:-/work/bench-models}
max_new=${3:-128}
reps=${4:-3}
threads=${5:-2}
fmt=${6:-bf16}
py=/usr/bin/python3
scale=${KILN_TRAIN_STEPS_SCALE:-1}
tthreads=${KILN_TRAIN_THREADS:-1}
no_train=${KILN_BENCH_NO_TRAIN:-0}
steps() { $py -c "import sys; print(max(1, int($1 * $scale)))"; }
mkdir -p "$dir"
cd "$dir"

# ---- models (only what is missing) ----
if [ "$no_train" = 1 ]; then :; elif [ ! -f data/train_000000.bin ]; then
  corpus=()
  for f in /usr/share/games/fortunes/*; do
    case "$f" in *.dat|*.u8) continue ;; esac
    [ -f "$f" ] && corpus+=("$f")
  done
  nice -n 19 "$kiln" tokenizer train --input "${corpus[@]}" --vocab-size 4096 --out tokenizer
  nice -n 19 "$kiln" data prepare --tokenizer tokenizer --input "${corpus[@]}" --doc-separator '%' \
    --val-fraction 0.05 --out data
fi
if [ "$no_train" != 1 ] && [ ! -e target/DONE ]; then
  echo '{"n_layer": 6, "n_head": 10, "n_embd": 640, "vocab_size": 4096, "n_positions": 256, "layer_norm_epsilon": 1e-5}' > target.json
  resume=(); [ -e target/latest ] && resume=(--resume)
  nice -n 19 "$kiln" train --model target.json --tokenizer tokenizer --data "data/train_*.bin" \
    --val-data "data/val_*.bin" --eval-every 100 --val-batches 10 --batch 16 --seq 128 \
    --steps "$(steps 800)" --lr 1.5e-3 --min-lr 1.5e-4 --warmup 50 --weight-decay 0.1 --out target --save-every 50 \
    --keep-checkpoints 1 --metrics target.jsonl --no-progress --threads "$tthreads" "${resume[@]}"
  touch target/DONE
fi
if [ "$no_train" != 1 ] && [ ! -e draft/latest ]; then
  echo '{"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 4096, "n_positions": 256, "layer_norm_epsilon": 1e-5}' > draft.json
  nice -n 19 "$kiln" train --model draft.json --tokenizer tokenizer --data "data/train_*.bin" \
    --val-data "data/val_*.bin" --eval-every 500 --val-batches 10 --batch 16 --seq 128 \
    --steps "$(steps 1200)" --lr 2e-3 --min-lr 2e-4 --warmup 50 --weight-decay 0.1 --out draft --save-every 500 \
    --keep-checkpoints 1 --metrics draft.jsonl --no-progress --threads "$tthreads"
fi
if [ "$no_train" != 1 ] && [ ! -e target-medusa/latest ]; then
  nice -n 19 "$kiln" train --medusa-heads 3 --init target/latest --data "data/train_*.bin" --batch 16 --seq 128 \
    --steps "$(steps 200)" --lr 1e-3 --min-lr 1e-4 --warmup 10 --weight-decay 0 --out target-medusa \
    --metrics target-medusa.jsonl --threads "$tthreads"
fi

# ---- bench ----
prompts=("The meaning of life is" "A computer" "Q: Why did the chicken" "You will be")
run() {  # prompt, extra args... -> one JSON line
  local prompt=$1; shift
  "$kiln" generate --prompt "$prompt" --max-new "$max_new" --temperature 0 --json --eot-id -1 \
    --threads "$threads" --weights-dtype "$fmt" "$@" 2>/dev/null
}
labels=() margs=()  # each method's label and its generate arguments joined by '|'
method() { local l=$1; shift; labels+=("$l"); margs+=("$(IFS='|'; echo "$*")"); }
method plain --model target-medusa/latest --no-medusa
if [ -e draft/latest ]; then
  spec="--model|target-medusa/latest|--no-medusa|--draft-model|draft/latest"
  for k in 2 3 4 6; do method "speculative K=$k" "$spec|--draft-tokens|$k"; done
  for mp in ${KILN_BENCH_MIN_PROBS:-0.3 0.4 0.6}; do method "spec K=6 p>=$mp" "$spec|--draft-tokens|6|--draft-min-prob|$mp"; done
fi
for k in 4 6 8; do method "prompt lookup K=$k" --model target-medusa/latest --no-medusa --prompt-lookup --draft-tokens "$k"; done
method "prompt lookup K=8 fixed" --model target-medusa/latest --no-medusa --prompt-lookup --draft-tokens 8 --lookup-fixed-length
method "medusa tree 16" --model target-medusa/latest --medusa
method "medusa tree 8" --model target-medusa/latest --medusa --medusa-tree "0;1;2;0,0;0,1;1,0;0,0,0"
method "medusa tree 4" --model target-medusa/latest --medusa --medusa-tree "0;1;0,0"
method "medusa chain d3" --model target-medusa/latest --medusa --medusa-tree "0;0,0;0,0,0"
method "medusa chain d2" --model target-medusa/latest --medusa --medusa-tree "0;0,0"
echo "decode_methods: $fmt weights, $max_new new tokens per prompt, ${#prompts[@]} prompts, median of $reps, $threads threads"
echo "  target $(readlink -f target/latest), draft $(readlink -f draft/latest), heads $(readlink -f target-medusa/latest)"
echo "  (every method's run of a prompt follows the others' in each repetition, so all see the same load)"
# One line per run: method index, prompt index, the JSON line.
{
  for _ in $(seq "$reps"); do
    for pi in "${!prompts[@]}"; do
      for mi in "${!labels[@]}"; do
        IFS='|' read -ra a <<< "${margs[$mi]}"
        echo "$mi $pi $(run "${prompts[$pi]}" "${a[@]}")"
      done
    done
  done
} | $py -c '
import json, sys, statistics
labels = sys.argv[1:]
runs = {}  # (method, prompt) -> JSON rows
for line in sys.stdin:
    parts = line.split(" ", 2)
    if len(parts) < 3 or not parts[2].strip():
        continue
    runs.setdefault((int(parts[0]), int(parts[1])), []).append(json.loads(parts[2]))
prompts = sorted({p for _, p in runs})
def tps(m, p): return statistics.median(x["decode_tokens_per_s"] for x in runs[(m, p)])
def stat(m, p):
    r = runs[(m, p)][0]
    return r.get("medusa") or r.get("speculative") or {}
print("%-18s %9s %8s %10s %9s  output" % ("method", "tokens/s", "x plain", "acceptance", "tok/round"))
for m, lab in enumerate(labels):
    ps = [p for p in prompts if (m, p) in runs]
    if not ps:
        continue
    t = statistics.median(tps(m, p) for p in ps)
    ratio = statistics.median(tps(m, p) / tps(0, p) for p in ps)
    acc = [stat(m, p).get("acceptance_rate") for p in ps if stat(m, p)]
    ln = [stat(m, p).get("tokens_per_round", stat(m, p).get("mean_accepted_length")) for p in ps if stat(m, p)]
    same = all(runs[(m, p)][0]["tokens"] == runs[(0, p)][0]["tokens"] for p in ps)
    a = statistics.median(acc) if acc else float("nan")
    l = statistics.median(ln) if ln else 1.0
    print("%-18s %9.1f %8.2f %10.3f %9.2f  %s" % (lab, t, ratio, a, l, "= plain greedy" if same else "DIFFERS FROM PLAIN GREEDY"))
print("(tokens/s and x plain: medians over the prompts of the median run of each prompt; acceptance: speculative, accepted /"
      " drafted; medusa, accepted / (rounds x tree depth); tok/round: tokens per target pass; medusa tree N: N rows per"
      " pass with the root, chain dD: D heads in a chain)")' "${labels[@]}"
