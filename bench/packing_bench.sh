#!/usr/bin/env bash
# Packing benchmark: one epoch of training over a corpus with a wide spread of document lengths (log-normal,
# 10..1000 tokens), with --batching packed and with --batching padded (one document per row of T, the peer),
# measured in the same run. Both visit exactly the same documents once (sequential order), so the real tokens
# per second (padding not counted) are corpus tokens / summed step time; the gain is their ratio.
# Each mode runs REPEAT times (default 3), alternating; every step counts with its fastest time.
# usage: bench/packing_bench.sh [documents] [batch] [seq] [layers] [width] [threads]
#   defaults: 200 documents, batch 4, seq 256 (= n_positions), 4 layers, 256 wide, all cores.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
DOCS="${1:-200}"; B="${2:-4}"; T="${3:-256}"; L="${4:-4}"; C="${5:-256}"; THREADS="${6:-0}"; REPEAT="${REPEAT:-3}"
kiln="${KILN:-$here/build/kiln}"
work="$(mktemp -d /tmp/kiln_packing_bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# A byte-level tokenizer (GPT-2 files, no merges), the corpus, and the model config.
KILN_PEER_DIR="$here/tests/peer" /usr/bin/python3 - "$work" "$DOCS" "$T" "$L" "$C" <<'EOF'
import json, math, os, random, sys
work, docs, T, L, C = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, os.environ["KILN_PEER_DIR"])
from gpt2_bytes import byte_order, bytes_to_unicode
b2u = bytes_to_unicode()
order = byte_order(b2u)
os.makedirs(f"{work}/tok")
json.dump({**{b2u[b]: i for i, b in enumerate(order)}, "<|endoftext|>": 256}, open(f"{work}/tok/encoder.json", "w"))
open(f"{work}/tok/vocab.bpe", "w").write("#version: 0.2\n")
rng = random.Random(1)
with open(f"{work}/corpus.jsonl", "w") as f:
    for _ in range(docs):
        n = int(min(1000, max(10, rng.lognormvariate(math.log(100), 1.0))))
        text = "".join(rng.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(n - 1))  # + end-of-text
        f.write(json.dumps({"text": text}) + "\n")
json.dump({"n_layer": L, "n_head": C // 64, "n_embd": C, "vocab_size": 257, "n_positions": T},
          open(f"{work}/config.json", "w"))
EOF
"$kiln" data prepare --tokenizer "$work/tok" --input "$work/corpus.jsonl" --out "$work/data" >/dev/null

# Micro-batches per epoch and padding, from the documents (.idx) and the rules of train/packing.h.
read -r PACKED_STEPS PADDED_STEPS TOKENS PAD_FRAC SPREAD < <(/usr/bin/python3 - "$work/data" "$B" "$T" <<'EOF'
import glob, struct, sys
d, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lengths, total = [], 0
starts = []
for path in sorted(glob.glob(f"{d}/train_*.bin")):
    count = struct.unpack("<3i", open(path, "rb").read(12))[2]
    raw = open(path + ".idx", "rb").read()
    n = struct.unpack("<q", raw[8:16])[0]
    starts += [total + s for s in struct.unpack(f"<{n}q", raw[16:])]
    total += count
bounds = starts + [total]
lengths = [b - a for a, b in zip(bounds, bounds[1:])]
seqs = []
for n in lengths:  # T == n_positions: whole up to T, else pieces of T
    seqs += [n] if n <= T else [min(T, n - b) for b in range(0, n, T)]
packed, used = 1, 0
for s in seqs:
    if used + s > B * T:
        packed, used = packed + 1, 0
    used += s
padded = (len(seqs) + B - 1) // B
s = sorted(lengths)
print(packed, padded, total, 1 - total / (len(seqs) * T), f"{s[0]}/{s[len(s)//2]}/{s[-1]}")
EOF
)

run() {  # mode steps repeat: one epoch; checks the run ended exactly at the end of the epoch
  rm -rf "$work/ckpt"
  "$kiln" train --model "$work/config.json" --data "$work/data/train_*.bin" --batching "$1" --batch "$B" --seq "$T" \
    --steps "$2" --data-order sequential --lr 1e-4 --threads "$THREADS" --no-progress \
    --metrics "$work/$1.$3.jsonl" --out "$work/ckpt" 2>/dev/null
  /usr/bin/python3 - "$work/ckpt/latest/train_state.safetensors" "$DOCS" <<'EOF'
import json, struct, sys
f = open(sys.argv[1], "rb")
meta = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))["__metadata__"]
assert (meta["loader_epoch"], meta["loader_position"], meta["loader_shard"]) == ("0", sys.argv[2], "0"), meta
EOF
}
echo "corpus: $DOCS documents, $TOKENS tokens, lengths min/median/max $SPREAD; model ${L} layers x ${C}, B=$B T=$T"
for r in $(seq "$REPEAT"); do
  run packed "$PACKED_STEPS" "$r"
  run padded "$PADDED_STEPS" "$r"
done
# The same steps see the same data in every repeat: each step's fastest time filters out other load.
/usr/bin/python3 - "$work" "$REPEAT" "$TOKENS" "$PACKED_STEPS" "$PADDED_STEPS" "$PAD_FRAC" <<'EOF'
import json, sys
work, R, tok, pk, pd, pad = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
def epoch_seconds(mode):
    runs = [[json.loads(l)["ms"] for l in open(f"{work}/{mode}.{r}.jsonl")] for r in range(1, R + 1)]
    return sum(min(step) for step in zip(*runs)) / 1e3
ps, ds = epoch_seconds("packed"), epoch_seconds("padded")
print(f"packed: {pk} steps, {ps:.1f} s, {tok / ps:.0f} real tokens/s (no padding)")
print(f"padded: {pd} steps, {ds:.1f} s, {tok / ds:.0f} real tokens/s ({pad:.1%} of the computed tokens are padding)")
print(f"gain: packing trains {ds / ps:.2f}x the real tokens per second of padded batching")
EOF
