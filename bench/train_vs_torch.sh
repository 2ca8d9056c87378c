#!/usr/bin/env bash
# Training-step benchmark: kiln and PyTorch side by side on the same model and batch, printed with the ratio.
# usage: bench/train_vs_torch.sh [config.json] [batch] [seq] [steps] [fp32|bf16]
# (config: bench/gpt2-124m.json by default, or bench/llama-124m.json, the Llama family at the same size)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cfg="${1:-$here/bench/gpt2-124m.json}"; B="${2:-4}"; T="${3:-64}"; K="${4:-5}"; D="${5:-fp32}"
kiln="${KILN:-$here/build/kiln}"
# The PyTorch peer's OpenBLAS gets the kernels kiln runs on (kiln picks them by CPU feature where OpenBLAS does not
# recognise the CPU; kernels/matmul.h), so both sides multiply with the same code.
export OPENBLAS_CORETYPE="${OPENBLAS_CORETYPE:-$("$kiln" version | sed -n 's/^blas core: //p')}"
ours=$("$kiln" bench train --model "$cfg" --batch "$B" --seq "$T" --steps "$K" --dtype "$D")
peer=$(LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp /usr/bin/python3 "$here/bench/torch_train_bench.py" \
       "$cfg" --batch "$B" --seq "$T" --steps "$K" --dtype "$D")
echo "kiln:    $ours"
echo "pytorch: $peer"
/usr/bin/python3 -c "
import json,sys
a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2])
print(f\"kiln {a['ms_per_step']:.0f} ms/step ({a['gflops']:.1f} GFLOP/s), pytorch {b['ms_per_step']:.0f} ms/step ({b['gflops']:.1f} GFLOP/s): kiln is {b['ms_per_step']/a['ms_per_step']:.2f}x faster\")
" "$ours" "$peer"
