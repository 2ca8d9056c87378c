#!/usr/bin/env bash
# The main job on a fresh Debian machine, with no internet beyond Debian's packages:
# install, build, learn a BPE tokenizer from Debian's `fortunes` corpus (about 2.6 MB of English), prepare
# token shards, train a small GPT (about 4M parameters, about five minutes on 2 cores), and print samples.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
cmake -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target kiln
kiln=build/kiln
run=runs/fortunes
# The quickstart's own directory: each run starts afresh (the data step refuses to overwrite shards).
rm -rf "$run"
mkdir -p "$run"

# The corpus: every fortune file (not the .dat indexes); fortunes are separated by lines holding '%'.
corpus=()
for f in /usr/share/games/fortunes/*; do
  case "$f" in *.dat|*.u8) continue ;; esac
  [ -f "$f" ] && corpus+=("$f")
done

echo "== 1. tokenizer: byte-level BPE with 4096 tokens"
$kiln tokenizer train --input "${corpus[@]}" --vocab-size 4096 --out "$run/tokenizer"

echo "== 2. data: one document per fortune, 5% held out for validation"
$kiln data prepare --tokenizer "$run/tokenizer" --input "${corpus[@]}" --doc-separator '%' \
  --val-fraction 0.05 --out "$run/data"

echo "== 3. model: a 4-layer GPT, 256 wide, 256-token context"
cat > "$run/config.json" <<JSON
{"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 4096, "n_positions": 256, "layer_norm_epsilon": 1e-5}
JSON
$kiln train --model "$run/config.json" --tokenizer "$run/tokenizer" \
  --data "$run/data/train_*.bin" --val-data "$run/data/val_*.bin" --eval-every 100 --val-batches 10 \
  --batch 16 --seq 128 --steps ${KILN_QUICKSTART_STEPS:-1000} --lr 2e-3 --min-lr 2e-4 --warmup 50 \
  --weight-decay 0.1 --out "$run/checkpoints" --save-every 200 --metrics "$run/metrics.jsonl"

echo "== 4. samples"
for prompt in "The meaning of life is" "A computer" "Q: Why did the chicken"; do
  echo "--- $prompt"
  $kiln generate --model "$run/checkpoints/latest" --prompt "$prompt" --max-new 80 \
    --temperature 0.8 --top-k 40 --seed 1
  echo
done
