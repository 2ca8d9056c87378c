"""GPT-2's byte-to-unicode table, written from its published definition: printable Latin-1 bytes map to
themselves, the other 68 bytes to U+0100 onwards in byte order. Used by tests that write GPT-2-format
tokenizer files of their own."""


def bytes_to_unicode():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, n = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def byte_order(b2u):
    """GPT-2's order of the 256 byte tokens: the printable ones first, then the remapped ones."""
    return sorted(range(256), key=lambda b: (0 if b2u[b] == chr(b) else 1, ord(b2u[b])))
