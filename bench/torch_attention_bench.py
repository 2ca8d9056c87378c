"""PyTorch peer of bench/cuda_attention_bench.cpp: scaled_dot_product_attention, bf16, on the GPU, with the
flash backend and the cuDNN backend, at the same shapes (16k tokens per batch, width 2048: B = tokens / T,
NH = width / HD) and the same FLOP count (forward 4*B*NH*T^2*HD, halved when causal; backward 2.5x forward).
Prints one JSON line per measurement with the fields cuda_attention_bench prints.

usage: torch_attention_bench.py [--seqs 1024,2048,4096,8192,16384] [--hds 64,128] [--tokens 16384]
                                [--width 2048] [--iters 20] [--backends flash,cudnn]
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, iters):
    fn()
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--hds", default="64,128")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backends", default="flash,cudnn")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", file=sys.stderr)
    for name in args.backends.split(","):
        backend = BACKENDS[name]
        for hd in (int(x) for x in args.hds.split(",")):
            for causal in (False, True):
                for T in (int(x) for x in args.seqs.split(",")):
                    if args.tokens % T or args.width % hd:
                        continue
                    B, NH = args.tokens // T, args.width // hd
                    q, k, v = (torch.randn(B, NH, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
                               for _ in range(3))
                    dout = torch.randn(B, NH, T, hd, device=dev, dtype=torch.bfloat16)
                    try:
                        with sdpa_kernel([backend]):
                            def fwd():
                                with torch.no_grad():
                                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                            fwd_ms = time_ms(fwd, args.iters)
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                            def bwd():
                                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

                            bwd_ms = time_ms(bwd, args.iters)
                    except RuntimeError as e:  # a backend that does not take this shape
                        print(f"torch-{name} seq {T} hd {hd} causal {causal}: {str(e).splitlines()[0]}",
                              file=sys.stderr)
                        continue
                    flops = 4.0 * B * NH * T * T * hd * (0.5 if causal else 1.0)
                    for op, ms, f in (("fwd", fwd_ms, flops), ("bwd", bwd_ms, 2.5 * flops)):
                        print(json.dumps({"impl": f"torch-{name}", "op": op, "seq": T, "hd": hd, "causal": causal,
                                          "batch": B, "heads": NH, "ms": round(ms, 4),
                                          "tflops": round(f / (ms * 1e-3) / 1e12, 2)}), flush=True)
                    del q, k, v, dout, out
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
