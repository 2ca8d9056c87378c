#!/usr/bin/env bash
# Data-parallel benchmark: the same GPT-2 training step and global batch as 1 rank x 2 threads and as 2 ranks x
# 1 thread (mpirun; the communication share from the metrics' comm_ms), beside PyTorch DDP with gloo on the
# same 2 processes, in the same run; ZeRO stage 3 (parameters gathered layer by layer) on the same 2 ranks beside
# them, and the share of stage 2's reduce-scatter hidden behind the backward. Medians over the steps after the first.
# usage: bench/dist_train.sh [config.json] [global batch] [seq] [steps] [zero stage]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cfg="${1:-$here/bench/gpt2-124m.json}"; B="${2:-4}"; T="${3:-64}"; K="${4:-6}"; Z="${5:-0}"
kiln="${KILN:-$here/build/kiln}"
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$("$kiln" version | sed -n 's/^blas core: //p')}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
# Random tokens in an llm.c shard.
/usr/bin/python3 -c "
import json, random, struct, sys
V = json.load(open(sys.argv[1]))['vocab_size']; n = 200000; r = random.Random(0)
with open(sys.argv[2], 'wb') as f:
    f.write(struct.pack('<256i', 20240520, 1, n, *([0] * 253))); f.write(struct.pack(f'<{n}H', *[r.randrange(V) for _ in range(n)]))
" "$cfg" "$work/data.bin"
common=(train --model "$cfg" --data "$work/data.bin" --batch "$B" --seq "$T" --steps "$K" --no-progress)
"$kiln" "${common[@]}" --threads 2 --metrics "$work/one.jsonl" 2>/dev/null
mpirun -q --oversubscribe -np 2 "$kiln" "${common[@]}" --threads 1 --zero-stage "$Z" --metrics "$work/two.jsonl" 2>/dev/null
# Stage 2 with the reduce-scatter on the communication thread during the backward (forced on: off by default
# where the ranks' threads fill the cores), 2 micro-batches a step.
KILN_DIST_OVERLAP=1 mpirun -q --oversubscribe -np 2 "$kiln" "${common[@]}" --threads 1 --zero-stage 2 --grad-accum 2 \
  --metrics "$work/z2.jsonl" 2>/dev/null
# Stage 3: each layer's parameters all-gathered before its forward and its backward, gradients reduce-scattered
# layer by layer (on 2 cores without the communication thread, as stage 0 runs).
mpirun -q --oversubscribe -np 2 "$kiln" "${common[@]}" --threads 1 --zero-stage 3 --metrics "$work/z3.jsonl" 2>/dev/null
peer=$(LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp /usr/bin/python3 "$here/bench/torch_ddp_bench.py" \
       "$cfg" --batch "$B" --seq "$T" --steps "$((K - 1))" --ranks 2)
/usr/bin/python3 - "$work/one.jsonl" "$work/two.jsonl" "$peer" "$B" "$T" "$Z" "$work/z2.jsonl" "$work/z3.jsonl" <<'PY'
import json, statistics, sys
one = [json.loads(l) for l in open(sys.argv[1])][1:]
two = [json.loads(l) for l in open(sys.argv[2])][1:]
peer, B, T, Z = json.loads(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
m1 = statistics.median(r["ms"] for r in one)
m2 = statistics.median(r["ms"] for r in two)
c2 = statistics.median(r["comm_ms"] for r in two)
mp = peer["ms_per_step"]
print(f"global batch {B} x {T} tokens, medians over {len(two)} steps")
print(f"kiln 1 rank x 2 threads:        {m1:8.0f} ms/step")
print(f"kiln 2 ranks x 1 thread, ZeRO {Z}: {m2:8.0f} ms/step, communication {c2:.0f} ms ({100 * c2 / m2:.1f}% of the step)")
print(f"pytorch DDP gloo, 2 x 1 thread: {mp:8.0f} ms/step")
print(f"kiln 2 ranks vs 1 rank x 2 threads: {m1 / m2:.2f}x; kiln 2 ranks vs DDP: {mp / m2:.2f}x faster")
z2 = [json.loads(l) for l in open(sys.argv[7])][1:]
ov = statistics.median(r["overlap_ms"] for r in z2)
wait = statistics.median(r["overlap_wait_ms"] for r in z2)
print(f"ZeRO 2 overlapped (2 micro-batches): {statistics.median(r['ms'] for r in z2):.0f} ms/step, reduce-scatter "
      f"{ov:.0f} ms on the communication thread, {wait:.0f} ms waited for (a buffer, or the last after the backward): "
      f"{100 * max(0.0, 1 - wait / ov):.0f}% hidden")
z3 = [json.loads(l) for l in open(sys.argv[8])][1:]
m3 = statistics.median(r["ms"] for r in z3)
c3 = statistics.median(r["comm_ms"] for r in z3)
print(f"kiln 2 ranks x 1 thread, ZeRO 3: {m3:8.0f} ms/step, communication {c3:.0f} ms ({100 * c3 / m3:.1f}% of the step); "
      f"vs ZeRO {Z}: {m2 / m3:.2f}x, vs DDP: {mp / m3:.2f}x faster")
PY
