#!/usr/bin/env bash
# Sampling speed of a DiT at 35 network evaluations: `kiln sample --sampler edm-heun --steps 18` (EDM's Heun, 2·18 − 1
# evaluations) beside the PyTorch peer (bench/torch_dit_sample_bench.py: tests/peer/torch_dit.py's DiT in float32,
# the same sampler) on the same weights (the checkpoint's model.safetensors), the same starting noise (drawn here,
# given to both: kiln sample --noise) and the same cores, K class-conditional images (labels k mod classes), without
# and with classifier-free guidance (which doubles the rows of every evaluation). Rounds are interleaved (kiln and
# torch alternate, the first of each round swapping), each prints both images/s and their ratio, and every round
# checks that the two produced the same samples (max |Δ| over all pixels at most TOL, images in [-1, 1] scale).
# The summary is the median of each and the median of the per-round ratios. Both run with OMP_WAIT_POLICY=passive
# unless the environment names a policy (kiln sample sets it itself; torch's OpenMP threads also lose 2-3x to
# spinning on a loaded machine, measured).
# usage: bench/dit_sample_vs_torch.sh CHECKPOINT_DIR [COUNT=16] [ROUNDS=3] [THREADS=2] [GUIDANCES="1 2"] [TOL=1e-2]
#   GUIDANCES: integer scales w (1: none)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$(readlink -f "$1")"; count="${2:-16}"; rounds="${3:-3}"; threads="${4:-2}"; guidances="${5:-1 2}"
tol="${6:-1e-2}"
[ -f "$model/config.json" ] || model="$(readlink -f "$model/latest")"
[ -f "$model/config.json" ] || { echo "dit_sample_vs_torch.sh: no config.json in $1 (or its latest)" >&2; exit 1; }
py=/usr/bin/python3
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
# The starting noise, N(0, 1) [COUNT, C, H, W] from torch's generator.
KILN_HERE="$here" $py - "$model/config.json" "$count" "$tmp/noise.safetensors" <<'EOF'
import json, os, sys
sys.path.insert(0, os.path.join(os.environ.get("KILN_HERE", "."), "tests", "peer"))
import torch
from torch_gpt2 import write_safetensors
c = json.load(open(sys.argv[1]))
torch.manual_seed(0)
write_safetensors(sys.argv[3], {"noise": torch.randn(int(sys.argv[2]), c["channels"], c["image_size"], c["image_size"])})
EOF
kiln_run() {  # guidance (an integer) -> images/s; samples in $tmp/kiln.safetensors. One network call per evaluation.
  "$here/build/kiln" sample --model "$model" --raw-weights --sampler edm-heun --steps 18 --guidance "$1" \
    --count "$count" --batch $((count * ($1 == 1 ? 1 : 2))) --threads "$threads" --noise "$tmp/noise.safetensors" --out "$tmp/kiln.png" |
    $py -c "import json,sys; j=json.load(sys.stdin); assert j['nfe'] == 35, j; print(j['images_per_second'])"
}
torch_run() {
  $py "$here/bench/torch_dit_sample_bench.py" --model "$model" --weights model --steps 18 --guidance "$1" \
    --threads "$threads" --noise "$tmp/noise.safetensors" --out "$tmp/torch.safetensors" |
    $py -c "import json,sys; j=json.load(sys.stdin); assert j['nfe'] == 35, j; print(j['images_per_second'])"
}
same() {  # max |kiln − torch| over the samples; fails past the tolerance
  $py - "$tmp/kiln.safetensors" "$tmp/torch.safetensors" "$tol" <<EOF
import json, struct, sys
import numpy as np
def images(path):  # the F32 tensor 'images' of a safetensors file
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    e = json.loads(raw[8:8 + n])["images"]
    b, f = e["data_offsets"]
    assert e["dtype"] == "F32", e
    return np.frombuffer(raw[8 + n + b:8 + n + f], dtype=np.float32).reshape(e["shape"])
a, b = images(sys.argv[1]), images(sys.argv[2])
d = float(np.abs(a - b).max())
print(f"{d:.2e}")
sys.exit(0 if d <= float(sys.argv[3]) else 1)
EOF
}
cfgline=$($py -c "import json; c=json.load(open('$model/config.json')); print(f\"hidden {c['hidden']} depth {c['depth']} patch {c['patch']} {c['image_size']}x{c['image_size']}x{c['channels']}\")")
echo "DiT $cfgline, $count images, edm-heun 18 steps (35 evaluations), $threads threads, $rounds rounds"
for w in $guidances; do
  ks=(); ts=(); rs=()
  for ((r = 0; r < rounds; r++)); do
    if ((r % 2 == 0)); then k=$(kiln_run "$w"); t=$(torch_run "$w"); else t=$(torch_run "$w"); k=$(kiln_run "$w"); fi
    if ! d=$(same); then echo "guidance $w round $r: kiln and torch samples differ by $d (> $tol)" >&2; exit 1; fi
    ratio=$($py -c "print(f'{$k / $t:.2f}')")
    printf 'guidance %s round %d: kiln %.3f images/s, torch %.3f images/s, kiln/torch %s, max |kiln - torch| %s\n' \
      "$w" "$r" "$k" "$t" "$ratio" "$d"
    ks+=("$k"); ts+=("$t"); rs+=("$ratio")
  done
  $py -c "
import statistics as s
k, t, r = [${ks[*]/%/,}], [${ts[*]/%/,}], [${rs[*]/%/,}]
print(f'guidance $w median: kiln {s.median(k):.3f} images/s, torch {s.median(t):.3f} images/s, kiln/torch {s.median(r):.2f}x')"
done
