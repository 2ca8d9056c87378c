#!/usr/bin/python3
"""End-to-end test of `kiln tokenizer ...` and `kiln data prepare` as a user runs them.

Usage: tokenizer_cli.py <kiln binary> <work dir>
Checks: train -> encode -> decode round trip on text with invalid UTF-8; --json output; bench prints one
JSON line with identical single/threaded ids; data prepare writes shards whose tokens (read here with
struct, independently of kiln's reader) decode back to the documents; bad inputs exit 1 with one line.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

kiln, work = sys.argv[1], sys.argv[2]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)


def run(*args, ok=True):
    p = subprocess.run([kiln, *args], capture_output=True)
    if ok and p.returncode != 0:
        sys.exit(f"FAIL: kiln {' '.join(args)} exited {p.returncode}: {p.stderr.decode(errors='replace')}")
    return p


def path(name):
    return os.path.join(work, name)


corpus = ("The quick brown fox jumps over the lazy dog. It's a test; we'll see.\n" * 200 +
          "Numbers 12345 and 3.14, emoji 😀, CJK 中文文本, accents café naïve.\n" * 50)
with open(path("corpus.txt"), "w") as f:
    f.write(corpus)

out = json.loads(run("tokenizer", "train", "--input", path("corpus.txt"), "--vocab-size", "320", "--out",
                     path("tok")).stdout)
assert out["vocab_size"] == 320, out
tok = json.load(open(path("tok/tokenizer.json")))
assert tok["model"]["type"] == "BPE" and len(tok["model"]["vocab"]) == 320
assert tok["added_tokens"][0]["content"] == "<|endoftext|>" and tok["added_tokens"][0]["id"] == 319

# Llama 3's pre-tokenizer: tokenizer.json names its Split regex; GPT-2's files are not written.
out = json.loads(run("tokenizer", "train", "--input", path("corpus.txt"), "--vocab-size", "300", "--out",
                     path("tok_llama3"), "--pre-tokenizer", "llama3").stdout)
assert out["pre_tokenizer"] == "llama-bpe", out
tok3 = json.load(open(path("tok_llama3/tokenizer.json")))
assert tok3["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].endswith(r"\s+(?!\S)|\s+"), tok3["pre_tokenizer"]
assert not os.path.exists(path("tok_llama3/vocab.bpe"))
p3 = run("tokenizer", "train", "--input", path("corpus.txt"), "--vocab-size", "300", "--out", path("t3"),
         "--pre-tokenizer", "gpt4", ok=False)
assert p3.returncode != 0 and b"gpt4" in p3.stderr, p3.stderr

# Arbitrary bytes (invalid UTF-8 included) survive encode -> decode.
raw = "Hello, wörld! it's 42\n\n  x".encode() + b"\xff\xfe\xc3(\x80 end<|endoftext|>tail"
with open(path("raw.bin"), "wb") as f:
    f.write(raw)
ids = run("tokenizer", "encode", "--tokenizer", path("tok"), "--input", path("raw.bin")).stdout.decode().split()
assert "319" in ids, ids  # <|endoftext|> is special by default
with open(path("ids.txt"), "w") as f:
    f.write(" ".join(ids))
assert run("tokenizer", "decode", "--tokenizer", path("tok"), "--input", path("ids.txt")).stdout == raw
js = json.loads(run("tokenizer", "encode", "--tokenizer", path("tok/tokenizer.json"), "--input", path("raw.bin"),
                    "--json").stdout)
assert js["tokens"] == [int(i) for i in ids]
plain = run("tokenizer", "encode", "--tokenizer", path("tok"), "--input", path("raw.bin"), "--ordinary").stdout.split()
assert b"319" not in plain

bench = run("tokenizer", "bench", "--tokenizer", path("tok"), "--input", path("corpus.txt"), "--repeat", "1").stdout
lines = bench.decode().strip().splitlines()
assert len(lines) == 1, lines
b = json.loads(lines[0])
assert b["identical"] and b["decodes_back"] and b["single_mb_s"] > 0 and b["threaded_mb_s"] > 0, b

# data prepare: two text documents and three JSONL documents.
docs = ["first document\n", "second one, with <|endoftext|> inside", "j1", "j2 ü", "j3 😀"]
os.makedirs(path("in"))
for i in range(2):
    with open(path(f"in/d{i}.txt"), "w") as f:
        f.write(docs[i])
with open(path("in/more.jsonl"), "w") as f:
    for d in docs[2:]:
        f.write(json.dumps({"text": d}) + "\n")
st = json.loads(run("data", "prepare", "--tokenizer", path("tok"), "--input", path("in/*.txt"), path("in/more.jsonl"),
                    "--out", path("shards"), "--shard-tokens", "7").stdout)
assert st["documents"] == 5 and st["val_documents"] == 0, st

stream, starts = [], []
for i in range(st["train_shards"]):
    name = path(f"shards/train_{i:06d}.bin")
    data = open(name, "rb").read()
    magic, version, count = struct.unpack("<3i", data[:12])
    assert magic == 20240520 and version == 1 and len(data) == 1024 + 2 * count, (name, magic, version, count)
    idx = open(name + ".idx", "rb").read()
    assert idx[:4] == b"KDOC"
    (n,) = struct.unpack("<q", idx[8:16])
    starts += [len(stream) + s for s in struct.unpack(f"<{n}q", idx[16:])]
    stream += list(struct.unpack(f"<{count}H", data[1024:]))
assert len(stream) == st["train_tokens"] and len(starts) == 5, (len(stream), starts)
with open(path("stream.txt"), "w") as f:
    f.write(" ".join(map(str, stream)))
text = run("tokenizer", "decode", "--tokenizer", path("tok"), "--input", path("stream.txt")).stdout.decode()
assert text == "".join(d + "<|endoftext|>" for d in docs), text
for k, s in enumerate(starts):
    end = starts[k + 1] if k + 1 < len(starts) else len(stream)
    assert stream[end - 1] == 319, (k, stream[s:end])

# Bad inputs: exit code 1 and one line on stderr naming the problem.
open(path("empty.txt"), "w").close()
with open(path("bad.jsonl"), "w") as f:
    f.write('{"text": "ok"}\n{"text": \n')
for args, needle in [
    (["data", "prepare", "--tokenizer", path("nope"), "--input", path("corpus.txt"), "--out", path("o1")], "nope"),
    (["data", "prepare", "--tokenizer", path("tok"), "--input", path("empty.txt"), "--out", path("o2")],
     "no text found in"),
    (["data", "prepare", "--tokenizer", path("tok"), "--input", path("bad.jsonl"), "--out", path("o3")],
     "bad.jsonl:2: malformed JSON"),
    (["tokenizer", "encode", "--tokenizer", path("tok"), "--input", path("missing.txt")], "missing.txt"),
    (["tokenizer", "train", "--input", path("empty.txt"), "--vocab-size", "300", "--out", path("t2")],
     "no text found in"),
]:
    p = run(*args, ok=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and needle in err, (args, p.returncode, err)
print("tokenizer_cli: 1 passed, 0 failed")
