#!/usr/bin/python3
"""An independent reader and writer of the safetensors format, standard library only (struct, json).

kiln's tests use it as a peer: files written here must read in kiln, and files kiln writes must read here,
with every value equal to a formula both sides compute on their own.

  safetensors_peer.py write FILE [--pad]        tensors of every kiln dtype (plus an I64 buffer)
  safetensors_peer.py check FILE                checks a file kiln wrote with the same tensors
  safetensors_peer.py write-gpt2 DIR ...        a tiny GPT-2 in the original openai-community layout
  safetensors_peer.py check-gpt2 DIR ...        checks a GPT-2 checkpoint kiln saved

The formula: h = (i * 2654435761 + seed * 40503 + 12345) mod 2^32 for element i of a tensor whose seed is
the FNV-1a hash of its name; floats are +-m * 2^-e with m in [512, 1024) and e in 10..13, exact in f32 and
f16, and rounded when stored as bf16 (a quarter of them are ties, so round-half-to-even matters).
"""
import argparse
import json
import math
import struct
import sys

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
         "F64": 8, "I64": 8, "U64": 8}
# Reference implementation's writer order: this rank, descending, then the name.
RANK = {"BOOL": 0, "U8": 4, "I8": 5, "I16": 9, "U16": 10, "F16": 11, "BF16": 12, "I32": 13, "U32": 14, "F32": 15,
        "F64": 16, "I64": 17, "U64": 18}


def fnv1a(name):
    h = 2166136261
    for b in name.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def mix(seed, i):
    return (i * 2654435761 + seed * 40503 + 12345) & 0xFFFFFFFF


def fval(seed, i):
    h = mix(seed, i)
    m = 512 + ((h >> 3) & 511)
    e = 10 + ((h >> 13) & 3)
    s = -1.0 if (h >> 20) & 1 else 1.0
    return s * m * 2.0 ** -e


def bf16_round(v):
    """Nearest bf16 (8 significant bits), ties to even, via frexp and Python's half-even round()."""
    if v == 0.0:
        return v
    mant, exp = math.frexp(v)  # v = mant * 2^exp, 0.5 <= |mant| < 1
    return math.ldexp(round(mant * 256), exp - 8)


def expected_values(name, dtype, count):
    seed = fnv1a(name)
    if dtype in ("F32", "F16", "F64"):
        return [fval(seed, i) for i in range(count)]
    if dtype == "BF16":
        return [bf16_round(fval(seed, i)) for i in range(count)]
    if dtype == "I32":
        return [mix(seed, i) % 2001 - 1000 for i in range(count)]
    if dtype == "U16":
        return [mix(seed, i) & 0xFFFF for i in range(count)]
    if dtype == "I64":
        return [mix(seed, i) - 2 ** 31 for i in range(count)]
    raise SystemExit("no formula for dtype " + dtype)


def encode(dtype, values):
    if dtype == "F32":
        return struct.pack("<%df" % len(values), *values)
    if dtype == "F16":
        return struct.pack("<%de" % len(values), *values)
    if dtype == "F64":
        return struct.pack("<%dd" % len(values), *values)
    if dtype == "BF16":
        out = bytearray()
        for v in values:
            bits = struct.unpack("<I", struct.pack("<f", v))[0]
            assert bits & 0xFFFF == 0, "not a bf16 value: %r" % v
            out += struct.pack("<H", bits >> 16)
        return bytes(out)
    if dtype == "I32":
        return struct.pack("<%di" % len(values), *values)
    if dtype == "U16":
        return struct.pack("<%dH" % len(values), *values)
    if dtype == "I64":
        return struct.pack("<%dq" % len(values), *values)
    raise SystemExit("cannot encode " + dtype)


def decode(dtype, raw):
    n = len(raw) // SIZES[dtype]
    if dtype == "BF16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack("<%dH" % n, raw)]
    code = {"F32": "f", "F16": "e", "F64": "d", "I32": "i", "U16": "H", "I64": "q"}[dtype]
    return list(struct.unpack("<%d%s" % (n, code), raw))


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def write_file(path, tensors, metadata, pad):
    """tensors: list of (name, dtype, shape, values). The header keeps this order; the data goes in reverse
    order, so readers must follow data_offsets rather than the header order."""
    blobs = {name: encode(dtype, values) for name, dtype, shape, values in tensors}
    offsets, pos = {}, 0
    for name, _, _, _ in reversed(tensors):
        offsets[name] = (pos, pos + len(blobs[name]))
        pos += len(blobs[name])
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, _ in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets[name])}
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, _, _, _ in reversed(tensors):
            f.write(blobs[name])


def read_file(path):
    """Returns (header_length, header dict, data bytes), validating the layout."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise SystemExit("%s: header length %d beyond the file" % (path, n))
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    return n, raw[8:8 + n], header, raw[8 + n:]


GENERIC = [  # (name, dtype, shape); kiln writes all but the I64 buffer
    ("alpha", "F32", [3, 5]),
    ("beta.bf16", "BF16", [7, 4]),
    ("gamma", "F16", [2, 2, 3]),
    ("delta", "I32", [4]),
    ("eps", "U16", [5]),
    ("empty", "F32", [0]),
    ("scalar", "F32", []),
    ("wide", "F32", [1, 2, 1, 3]),
]
METADATA = {"format": "pt", "note": "peer"}


def cmd_write(args):
    tensors = [(n, d, s, expected_values(n, d, numel(s))) for n, d, s in GENERIC]
    tensors.append(("int64.buffer", "I64", [3], expected_values("int64.buffer", "I64", 3)))
    write_file(args.file, tensors, METADATA, args.pad)


class Checker:
    def __init__(self):
        self.errors = []

    def expect(self, cond, msg):
        if not cond:
            self.errors.append(msg)

    def finish(self):
        for e in self.errors[:20]:
            print("peer check failed:", e, file=sys.stderr)
        sys.exit(1 if self.errors else 0)


def check_layout(c, path, n, text, header, data):
    """What the reference writer guarantees: a padded header, contiguous data in its sort order."""
    c.expect(n % 8 == 0, "%s: header length %d is not a multiple of 8" % (path, n))
    stripped = text.rstrip(b" ")
    c.expect(stripped.endswith(b"}") and b"\n" not in text, "%s: header is not compact JSON padded with spaces" % path)
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    by_offset = sorted(entries, key=lambda kv: kv[1]["data_offsets"])
    pos = 0
    for name, info in by_offset:
        b, e = info["data_offsets"]
        c.expect(b == pos, "%s: tensor %s starts at %d, expected %d (gap or overlap)" % (path, name, b, pos))
        c.expect(e - b == numel(info["shape"]) * SIZES[info["dtype"]], "%s: tensor %s has a wrong size" % (path, name))
        pos = e
    c.expect(pos == len(data), "%s: data section has %d bytes, tensors cover %d" % (path, len(data), pos))
    order = [name for name, _ in by_offset]
    want = [name for name, _ in sorted(entries, key=lambda kv: (-RANK[kv[1]["dtype"]], kv[0]))]
    c.expect(order == want, "%s: data order %s, the reference writer's order is %s" % (path, order, want))


def check_values(c, path, name, info, data, want):
    b, e = info["data_offsets"]
    got = decode(info["dtype"], data[b:e])
    c.expect(len(got) == len(want), "%s: tensor %s has %d values, expected %d" % (path, name, len(got), len(want)))
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            c.expect(False, "%s: tensor %s element %d is %r, expected %r" % (path, name, i, g, w))
            break


def cmd_check(args):
    c = Checker()
    n, text, header, data = read_file(args.file)
    check_layout(c, args.file, n, text, header, data)
    c.expect(header.get("__metadata__") == METADATA, "metadata %r" % header.get("__metadata__"))
    names = sorted(k for k in header if k != "__metadata__")
    c.expect(names == sorted(n for n, _, _ in GENERIC), "tensor names %s" % names)
    for name, dtype, shape in GENERIC:
        info = header.get(name)
        if info is None:
            continue
        c.expect(info["dtype"] == dtype and info["shape"] == shape,
                 "tensor %s is %s %s, expected %s %s" % (name, info["dtype"], info["shape"], dtype, shape))
        check_values(c, args.file, name, info, data, expected_values(name, dtype, numel(shape)))
    c.finish()


def gpt2_tensors(layers, embd, vocab, positions):
    """(name without the transformer. prefix, shape) in GPT2LMHeadModel's order; Conv1D weights are [in, out]."""
    C = embd
    out = [("wte.weight", [vocab, C]), ("wpe.weight", [positions, C])]
    for l in range(layers):
        p = "h.%d." % l
        out += [(p + "ln_1.weight", [C]), (p + "ln_1.bias", [C]),
                (p + "attn.c_attn.weight", [C, 3 * C]), (p + "attn.c_attn.bias", [3 * C]),
                (p + "attn.c_proj.weight", [C, C]), (p + "attn.c_proj.bias", [C]),
                (p + "ln_2.weight", [C]), (p + "ln_2.bias", [C]),
                (p + "mlp.c_fc.weight", [C, 4 * C]), (p + "mlp.c_fc.bias", [4 * C]),
                (p + "mlp.c_proj.weight", [4 * C, C]), (p + "mlp.c_proj.bias", [C])]
    return out + [("ln_f.weight", [C]), ("ln_f.bias", [C])]


def cmd_write_gpt2(args):
    """Values use the seed of the prefixed name, so the same formula holds whatever the file calls them."""
    import os
    os.makedirs(args.dir, exist_ok=True)
    tensors = []
    prefix = "transformer." if args.prefix else ""
    for name, shape in gpt2_tensors(args.layers, args.embd, args.vocab, args.positions):
        values = expected_values("transformer." + name, "F32", numel(shape))
        if args.dtype == "BF16":
            values = [bf16_round(v) for v in values]
        tensors.append((prefix + name, args.dtype, shape, values))
    if args.buffers:  # what the original openai-community/gpt2 model.safetensors carries
        P = args.positions
        for l in range(args.layers):
            mask = [1.0 if c <= r else 0.0 for r in range(P) for c in range(P)]
            tensors.append(("h.%d.attn.bias" % l, args.dtype, [1, 1, P, P], mask))
            tensors.append(("h.%d.attn.masked_bias" % l, args.dtype, [], [bf16_round(-10000.0)]))
    if args.lm_head:
        tensors.append(("lm_head.weight", args.dtype, [args.vocab, args.embd], tensors[0][3]))
    write_file(os.path.join(args.dir, "model.safetensors"), tensors, {"format": "pt"}, args.pad)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": args.layers, "n_head": args.heads, "n_embd": args.embd, "vocab_size": args.vocab,
              "n_positions": args.positions, "n_ctx": args.positions, "layer_norm_epsilon": 1e-05,
              "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "bos_token_id": args.vocab - 1,
              "eos_token_id": args.vocab - 1, "summary_type": "cls_index", "summary_use_proj": True,
              "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}}
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def cmd_check_gpt2(args):
    import os
    c = Checker()
    with open(os.path.join(args.dir, "config.json")) as f:
        config = json.load(f)
    for key, want in [("n_layer", args.layers), ("n_head", args.heads), ("n_embd", args.embd),
                      ("vocab_size", args.vocab), ("n_positions", args.positions),
                      ("architectures", ["GPT2LMHeadModel"]), ("model_type", "gpt2"),
                      ("activation_function", "gelu_new")]:
        c.expect(config.get(key) == want, "config.json %s is %r, expected %r" % (key, config.get(key), want))
    path = os.path.join(args.dir, "model.safetensors")
    n, text, header, data = read_file(path)
    check_layout(c, path, n, text, header, data)
    c.expect(header.get("__metadata__") == {"format": "pt"}, "metadata %r" % header.get("__metadata__"))
    want = gpt2_tensors(args.layers, args.embd, args.vocab, args.positions)
    names = sorted(k for k in header if k != "__metadata__")
    c.expect(names == sorted("transformer." + n for n, _ in want), "tensor names %s" % names)
    for bare, shape in want:
        name = "transformer." + bare
        info = header.get(name)
        if info is None:
            continue
        c.expect(info["dtype"] == args.dtype and info["shape"] == shape,
                 "tensor %s is %s %s, expected %s %s" % (name, info["dtype"], info["shape"], args.dtype, shape))
        values = expected_values(name, "F32", numel(shape))
        if args.dtype == "BF16":
            values = [bf16_round(v) for v in values]
        check_values(c, path, name, info, data, values)
    c.finish()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("file")
    w.add_argument("--pad", action="store_true", help="pad the header to 8 bytes (otherwise data is unaligned)")
    ck = sub.add_parser("check")
    ck.add_argument("file")
    for name in ("write-gpt2", "check-gpt2"):
        g = sub.add_parser(name)
        g.add_argument("dir")
        for dim in ("layers", "heads", "embd", "vocab", "positions"):
            g.add_argument("--" + dim, type=int, required=True)
        g.add_argument("--dtype", choices=["F32", "F16", "BF16"], default="F32")
        if name == "write-gpt2":
            g.add_argument("--prefix", action="store_true", help="names start with transformer.")
            g.add_argument("--buffers", action="store_true", help="add h.N.attn.bias / masked_bias buffers")
            g.add_argument("--lm-head", action="store_true", help="add a (tied) lm_head.weight")
            g.add_argument("--pad", action="store_true")
    args = ap.parse_args()
    {"write": cmd_write, "check": cmd_check, "write-gpt2": cmd_write_gpt2, "check-gpt2": cmd_check_gpt2}[args.cmd](args)


if __name__ == "__main__":
    main()
