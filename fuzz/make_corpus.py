#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/ (committed; rerun after changing this file).

Each seed is a small, valid file shaped like the real ones the tests use: Hugging Face's GPT-2 config.json,
Llama 3 / Qwen / Mistral configs, a sharded index, safetensors files with every dtype, byte-level BPE
tokenizer.json files with each supported pre-tokenizer and post-processor, and GGUF files laid out as kiln's
exporter writes them. Plain Python, no dependencies, deterministic output."""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- safetensors -------------------------------------------------------------------------------------
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "U16": 2, "I64": 8, "F64": 8, "U8": 1, "BOOL": 1, "I8": 1}


def safetensors(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape)]; data is a counting byte pattern."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((len(data) + i) % 251 for i in range(n))
    text = json.dumps(header, separators=(",", ":"))
    if pad:
        text += " " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + data


def safetensors_seeds():
    put("safetensors", "all_dtypes.safetensors",
        safetensors([("a.weight", "F32", [3, 4]), ("b", "BF16", [2, 3]), ("h", "F16", [5]), ("i", "I32", [2, 1, 2]),
                     ("u", "U16", [3]), ("empty", "F32", [0, 3]), ("s", "F32", [])], {"format": "pt"}))
    put("safetensors", "gpt2_block.safetensors",
        safetensors([("transformer.h.0.attn.bias", "F32", [1, 1, 2, 2]), ("transformer.h.0.ln_1.weight", "BF16", [4]),
                     ("transformer.wte.weight", "BF16", [7, 4]), ("transformer.wpe.weight", "BF16", [3, 4])],
                    {"format": "pt"}))
    put("safetensors", "unaligned.safetensors",
        safetensors([("x", "U8", [3]), ("w", "F32", [2, 2]), ("d", "F64", [1])], pad=False))
    put("safetensors", "other_dtypes.safetensors",
        safetensors([("ids", "I64", [2]), ("mask", "BOOL", [4]), ("q", "I8", [1, 1, 1, 1, 2]), ("f", "F32", [1])]))
    put("safetensors", "metadata_only.safetensors", safetensors([], {"format": "pt", "note": "x"}))


# ---- model.safetensors.index.json --------------------------------------------------------------------
def index_seeds():
    names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
             "lm_head.weight"]
    wm = {n: "model-0000%d-of-00002.safetensors" % (1 if i < 3 else 2) for i, n in enumerate(names)}
    put("index", "llama_two_shards.json", json.dumps({"metadata": {"total_size": 1234567}, "weight_map": wm}, indent=2))
    put("index", "one_shard.json", json.dumps({"weight_map": {"transformer.wte.weight": "model.safetensors"}}))


# ---- config.json ---------------------------------------------------------------------------------------
GPT2_HUB = {  # openai-community/gpt2 as published (tests/test_config_shards.cpp)
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
    "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257}


def llama_like(model_type, **kw):
    c = {"architectures": ["X"], "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-05, "hidden_act": "silu", "rope_theta": 500000.0,
         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    c.update(kw)
    return c


def config_seeds():
    put("config", "gpt2_hub.json", json.dumps(GPT2_HUB, indent=2))
    old = {k: GPT2_HUB[k] for k in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size")}
    old.update({"n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 16, "vocab_size": 50, "n_inner": 24})
    put("config", "gpt2_no_model_type.json", json.dumps(old))
    put("config", "llama3.json", json.dumps(llama_like(
        "llama", rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        eos_token_id=[2, 3], tie_word_embeddings=True, pretraining_tp=1), indent=2))
    put("config", "llama_linear_rope.json", json.dumps(llama_like(
        "llama", rope_scaling={"type": "linear", "factor": 2.0}, head_dim=32, hidden_act="gelu_pytorch_tanh")))
    put("config", "llama_rope_parameters.json", json.dumps(llama_like(
        "llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})))
    put("config", "mistral.json", json.dumps(llama_like("mistral", sliding_window=64, rope_scaling=None)))
    put("config", "qwen2.json", json.dumps(llama_like("qwen2", use_sliding_window=False, sliding_window=None,
                                                      tie_word_embeddings=True)))
    put("config", "qwen3.json", json.dumps(llama_like("qwen3", head_dim=32, attention_bias=False)))


# ---- tokenizer.json (+ tokenizer_config.json, + a text) -------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = bytes_to_unicode()
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def spell(bs):
    return "".join(B2U[b] for b in bs)


def added(i, content, special, lstrip=False, rstrip=False, normalized=None):
    return {"id": i, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def tokenizer_json(pre, post, merges_as_lists=False, specials=True):
    order = [b for b in range(256) if B2U[b] == chr(b)] + [b for b in range(256) if B2U[b] != chr(b)]
    vocab = {spell([b]): i for i, b in enumerate(order)}
    pairs = [(b"h", b"e"), (b"l", b"l"), (b"he", b"ll"), (b" ", b"w"), (b"o", b"r"), (b" w", b"or"), (b"hell", b"o"),
             (b" t", b"he"), (b" ", b"t"), (b"1", b"2")]
    pairs = [pairs[8]] + pairs[:7] + [pairs[9]]
    merges = []
    for a, b in pairs:
        vocab.setdefault(spell(a + b), len(vocab))
        merges.append([spell(a), spell(b)] if merges_as_lists else spell(a) + " " + spell(b))
    n = len(vocab)
    toks = [added(n, "<|endoftext|>", True), added(n + 1, "<|begin_of_text|>", True),
            added(n + 2, "<tool_call>", False, normalized=False), added(n + 3, "<mask>", True, True, True)]
    j = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": toks if specials else [],
         "normalizer": None, "pre_tokenizer": pre, "post_processor": post,
         "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
         "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                   "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                   "vocab": vocab, "merges": merges}}
    return j


def split(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
TEMPLATE = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [266], "tokens": ["<|begin_of_text|>"]}}}


def tokenizer_seeds():
    cfg = json.dumps({"bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False},
                      "eos_token": "<|endoftext|>", "add_bos_token": True, "add_eos_token": False,
                      "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "T"}],
                      "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast"})
    text = "hello world <|endoftext|> the <tool_call> 1234 <mask> x"
    gpt2 = tokenizer_json(BYTELEVEL, dict(BYTELEVEL, add_prefix_space=True), specials=False)
    put("tokenizer", "gpt2_bytelevel.json", json.dumps(gpt2) + "\0\0" + text)
    llama = tokenizer_json(split(LLAMA3), {"type": "Sequence", "processors": [dict(BYTELEVEL, add_prefix_space=True), TEMPLATE]})
    put("tokenizer", "llama3_template_config.json", json.dumps(llama) + "\0" + cfg + "\0" + text)
    qwen = tokenizer_json(split(QWEN2), None, merges_as_lists=True)
    put("tokenizer", "qwen2_list_merges.json",
        json.dumps(qwen) + "\0" + json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False,
                                              "chat_template": "{{ x }}", "model_max_length": 32768}) + "\0" + text)
    # Small files that stop early (too few tokens for byte-level BPE) reach the field checks in few mutations.
    put("tokenizer", "tiny_vocab.json", json.dumps({
        "added_tokens": [added(3, "<s>", True)], "pre_tokenizer": BYTELEVEL, "post_processor": TEMPLATE,
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}}) + "\0" +
        json.dumps({"bos_token": "<s>", "add_bos_token": True}) + "\0ab")
    seq = tokenizer_json({"type": "Sequence", "pretokenizers": [BYTELEVEL]}, TEMPLATE)
    put("tokenizer", "sequence_bytelevel.json", json.dumps(seq) + "\0\0" + "\xff invalid \xc3")


# ---- GGUF ----------------------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q",
       F64: "<d"}


def gstr(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def gvalue(t, v):
    if t == STR:
        return gstr(v)
    if t == ARR:
        et, items = v
        out = struct.pack("<IQ", et, len(items))
        return out + b"".join(gvalue(et, x) for x in items)
    return struct.pack(FMT[t], v)


def gguf(meta, tensors, alignment=32):
    """meta: [(key, type, value)]; tensors: [(name, ne fastest-first, ggml type, data bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, t, v in meta:
        out += gstr(k) + struct.pack("<I", t) + gvalue(t, v)
    off, datas = 0, b""
    for name, ne, ty, data in tensors:
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ty, off)
        pad = (-len(data)) % alignment
        datas += data + b"\0" * pad
        off += len(data) + pad
    out += b"\0" * ((-len(out)) % alignment)
    return out + datas


def gguf_seeds():
    toks = ["!", "\"", "a", "b", "ab", "<|endoftext|>"]
    meta = [("general.architecture", STR, "llama"), ("general.alignment", U32, 32), ("general.name", STR, "kiln-llama"),
            ("general.file_type", U32, 1), ("llama.context_length", U32, 64), ("llama.embedding_length", U32, 8),
            ("llama.block_count", U32, 1), ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
            ("llama.rope.freq_base", F32, 10000.0), ("llama.rope.scaling.factor", F64, 2.0),
            ("tokenizer.ggml.model", STR, "gpt2"), ("tokenizer.ggml.tokens", ARR, (STR, toks)),
            ("tokenizer.ggml.token_type", ARR, (I32, [1, 1, 1, 1, 1, 3])), ("tokenizer.ggml.merges", ARR, (STR, ["a b"])),
            ("tokenizer.ggml.add_bos_token", BOOL, True), ("tokenizer.ggml.eos_token_id", U32, 5),
            ("small.ints", ARR, (I16, [-1, 2])), ("small.u8", U8, 7), ("small.i64", I64, -5), ("small.u64", U64, 9),
            ("small.bools", ARR, (BOOL, [True, False]))]
    f32 = struct.pack("<8f", *[0.5 * i - 1 for i in range(8)])
    f16 = struct.pack("<8e", *[0.25 * i for i in range(8)])
    q8 = struct.pack("<e", 0.01) + bytes((i * 7) % 256 for i in range(32))
    bf16 = struct.pack("<4H", 0x3F80, 0xBF80, 0x4000, 0x0000)
    put("gguf", "llama_f16.gguf", gguf(meta, [("token_embd.weight", [8, 1], 1, f16), ("output_norm.weight", [8], 0, f32),
                                               ("blk.0.attn_q.weight", [32, 1], 8, q8), ("b", [2, 2], 30, bf16)]))
    put("gguf", "metadata_only.gguf", gguf([("general.architecture", STR, "gpt2"), ("x", F64, 1.5)], []))
    put("gguf", "align64.gguf", gguf([("general.alignment", U32, 64)], [("a", [8], 0, f32), ("i", [2], 26, b"\1\0\0\0\2\0\0\0")], 64))


if __name__ == "__main__":
    safetensors_seeds()
    index_seeds()
    config_seeds()
    tokenizer_seeds()
    gguf_seeds()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        print(t, len(files), "seeds", sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files), "bytes", file=sys.stderr)
