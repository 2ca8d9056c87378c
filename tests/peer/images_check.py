"""Independent check of `kiln data prepare-images` on Fashion-MNIST: parses the gzipped idx test files and the
written test shard with numpy alone and compares pixels (scaled to [-1, 1]) and labels.
usage: images_check.py OUT_DIR IDX_IMAGES.gz IDX_LABELS.gz"""
import gzip, json, struct, sys
import numpy as np

out, ip, lp = sys.argv[1:4]
raw = gzip.open(ip).read()
n, h, w = struct.unpack(">III", raw[4:16])
img = np.frombuffer(raw[16:], np.uint8).reshape(n, 1, h, w).astype(np.float32) / 127.5 - 1
lab = np.frombuffer(gzip.open(lp).read()[8:], np.uint8).astype(np.int32)
b = open(f"{out}/test_000000.safetensors", "rb").read()
hl = struct.unpack("<Q", b[:8])[0]
hdr = json.loads(b[8:8 + hl])
data = b[8 + hl:]
def get(name, dt):
    e = hdr[name]; s, t = e["data_offsets"]
    return np.frombuffer(data[s:t], dt).reshape(e["shape"])
si, sl = get("images", np.float32), get("labels", np.int32)
assert si.shape == img.shape, (si.shape, img.shape)
assert np.array_equal(si, img) and np.array_equal(sl, lab)
print("ok", si.shape, "min", si.min(), "max", si.max())
