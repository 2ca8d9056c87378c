#!/usr/bin/env bash
# Sample quality of class-conditional DiT models trained as flow matching, EDM and DDPM on Fashion-MNIST (the same
# network, batch, steps, learning rate and seed for each), judged by the ViT classifier: per objective, sampler and
# step count, the share of class-conditional samples classified as their class (guidance 1 and --guidance W) and
# the Fréchet distance in the classifier's pooled features between the samples and the test images (our stand-in
# for FID). Compares flow matching Heun (≤ 50 evaluations) and EDM Heun (35) against DDPM ancestral at 50.
#
# One command, end to end (prepares the data, trains the three models and the judge unless they exist, samples,
# prints a table and writes $OUT/quality.jsonl and $OUT/quality.md). Settings from the environment:
#   OUT=/work/bench-models/images   where the data, models and results go (outside git)
#   KILN=build/kiln                 the binary
#   MODEL=bench/dit-fmnist-small.json   the DiT (a config or a preset such as DiT-S/2)
#   STEPS=20000 BATCH=128 LR=3e-4   training budget of each model
#   EMA_DECAY=0.999                 the EMA the samples read. Short runs: an EMA of 0.999 after 3000 steps still
#                                   weighs the first third of training by 13% and the initialisation by 5%, and its
#                                   samples were noise where the final weights' were clothes; sample such runs with
#                                   SAMPLE_FLAGS=--raw-weights (the cosine schedule has already annealed them)
#   SAMPLE_FLAGS=                   extra kiln sample flags (e.g. --raw-weights)
#   COUNT=10000                     samples per setting (the distance is over these vs the 10,000 test images)
#   GUIDANCE=2                      the guided setting's w (the unguided one is w = 1)
#   JUDGE=$OUT/vit                  classifier directory (trained here with the recipe below if missing)
#   JUDGE_STEPS=5000                its steps when this script trains it
#   THREADS=0                       CPU threads of every run (0: all cores; 1 on a machine shared by many jobs:
#                                   OpenMP's spinning threads oversubscribe it badly)
#   SETTINGS="..."                  objective:sampler:steps triples (default below); only their objectives are trained
# Resumable: a trained model (summary.json of STEPS), the judge (summary.json) and each setting's result
# ($OUT/samples-*.json, newer than its model and the judge) are kept, so runs with disjoint SETTINGS can share the
# cores (THREADS=1 each) and a last run with every setting assembles the table.
# Reduced scale: e.g. STEPS=300 COUNT=200 MODEL=tiny.json bench/diffusion_quality.sh (state it with the numbers).
# Long runs go under nice -n 10.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/work/bench-models/images}"
KILN="${KILN:-$here/build/kiln}"
MODEL="${MODEL:-$here/bench/dit-fmnist-small.json}"
STEPS="${STEPS:-20000}"; BATCH="${BATCH:-128}"; LR="${LR:-3e-4}"
COUNT="${COUNT:-10000}"; GUIDANCE="${GUIDANCE:-2}"; EMA_DECAY="${EMA_DECAY:-0.999}"; SAMPLE_FLAGS="${SAMPLE_FLAGS:-}"
JUDGE="${JUDGE:-$OUT/vit}"; JUDGE_STEPS="${JUDGE_STEPS:-5000}"; THREADS="${THREADS:-0}"
SETTINGS="${SETTINGS:-flow:flow-heun:25 flow:flow-euler:50 flow:flow-heun:5 edm:edm-heun:18 edm:edm-euler:35 edm:edm-heun:3 ddpm:ddpm:50 ddpm:ddim:50 ddpm:ddpm:10}"
F=/usr/share/datasets/fashion-mnist
mkdir -p "$OUT"
run() { nice -n 10 "$KILN" "$@"; }

# 1. Data: train (55,083) / val (4,917) / test (10,000).
if [ ! -f "$OUT/fm/images.json" ]; then
  run data prepare-images --idx "$F/train-images-idx3-ubyte.gz:$F/train-labels-idx1-ubyte.gz" \
    --test-idx "$F/t10k-images-idx3-ubyte.gz:$F/t10k-labels-idx1-ubyte.gz" --classes 10 --val-fraction 0.0834 \
    --out "$OUT/fm" >/dev/null
fi

# 2. The models SETTINGS names (flow, edm, ddpm by default): one network, one budget; flow matching with
# logit-normal t (SiT/SD3's choice).
for obj in $(for s in $SETTINGS; do echo "${s%%:*}"; done | awk '!seen[$0]++'); do
  dir="$OUT/dit-$obj"
  if [ ! -e "$dir/latest" ] || ! grep -q "\"steps\":$STEPS" "$dir/summary.json" 2>/dev/null; then
    extra=(); [ "$obj" = flow ] && extra=(--flow-t logit-normal)
    run train --objective "$obj" "${extra[@]}" --model "$MODEL" --data "$OUT/fm" --batch "$BATCH" --steps "$STEPS" \
      --lr "$LR" --warmup $((STEPS / 50 + 1)) --min-lr 1e-5 --weight-decay 0 --ema-decay "$EMA_DECAY" --label-dropout 0.1 \
      --save-every 2000 --keep-checkpoints 2 --val-batches 0 --threads "$THREADS" --metrics "$dir.jsonl" --out "$dir" \
      --no-progress > "$dir.summary.tmp"
    mv "$dir.summary.tmp" "$dir/summary.json"
  fi
done

# 3. The judge: a ViT classifier (the issue asks >= 90% test accuracy); its eval.json holds the number.
# A finished run has summary.json (a checkpoint saved on the way is not the judge yet).
while [ -f "$JUDGE.summary.tmp" ] && [ ! -f "$JUDGE/summary.json" ]; do sleep 30; done  # another run trains it
if [ ! -f "$JUDGE/summary.json" ]; then
  printf '{"model_type": "vit", "patch": 4, "hidden": 64, "depth": 6, "heads": 4, "mlp_ratio": 4}\n' > "$OUT/vit-judge.json"
  run train --objective classify --model "$OUT/vit-judge.json" --data "$OUT/fm" --batch 128 --steps "$JUDGE_STEPS" \
    --lr 2e-3 --min-lr 1e-5 --warmup 300 --weight-decay 0.05 --augment crop:1,flip --label-smoothing 0.1 \
    --eval-every 500 --save-every 500 --threads "$THREADS" --metrics "$JUDGE.jsonl" --out "$JUDGE" --no-progress \
    > "$JUDGE.summary.tmp"
  mv "$JUDGE.summary.tmp" "$JUDGE/summary.json"
fi
[ -f "$JUDGE/eval.json" ] && echo "judge: $(tr -d '\n ' < "$JUDGE/eval.json")"

# 4. Samples and their judgement: every setting with and without guidance (the same seed for each).
res="$OUT/quality.jsonl"; : > "$res"
for s in $SETTINGS; do
  IFS=: read -r obj sampler steps <<< "$s"
  for w in 1 "$GUIDANCE"; do
    tag="$(printf '%s' "$SAMPLE_FLAGS" | tr -c 'a-z0-9' '-' | tr -s '-' | sed 's/^-//; s/-$//')"
    name="$OUT/samples-$obj-$sampler-$steps-w$w${tag:+-$tag}"
    # A setting sampled before (same count, newer than its model and the judge) is not sampled again.
    if [ -s "$name.json" ] && [ "$name.json" -nt "$OUT/dit-$obj/summary.json" ] && [ "$name.json" -nt "$JUDGE/model.safetensors" ] \
       && grep -q "\"count\":$COUNT," "$name.json"; then
      cat "$name.json" >> "$res"
      continue
    fi
    run sample --model "$OUT/dit-$obj" --sampler "$sampler" --steps "$steps" --guidance "$w" --count "$COUNT" \
      --batch 250 --seed 7 --threads "$THREADS" $SAMPLE_FLAGS --out "$name.png" --judge "$JUDGE" --reference "$OUT/fm" \
      > "$name.json.tmp"
    mv "$name.json.tmp" "$name.json"
    cat "$name.json" >> "$res"
  done
done

# 5. The table.
/usr/bin/python3 - "$res" "$OUT/quality.md" "$COUNT" "$STEPS" "$SAMPLE_FLAGS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = [f"samples {sys.argv[3]} per setting, models trained {sys.argv[4]} steps{(', sampled with ' + sys.argv[5]) if sys.argv[5] else ''}; "
       "Fréchet distance in the judge's features vs the test set",
       "", "| objective | sampler | steps | NFE | guidance | class accuracy | Fréchet distance | images/s |",
       "|---|---|---|---|---|---|---|---|"]
for r in rows:
    out.append(f"| {r['objective']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['guidance']:g} | "
               f"{r.get('class_accuracy', float('nan')):.3f} | {r.get('frechet_distance', float('nan')):.3f} | "
               f"{r['images_per_second']:.1f} |")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
EOF
