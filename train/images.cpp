// kiln data prepare-images and the image shard reader (format: train/images.h).
#include "train/images.h"

#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_io.h"
#include "core/png.h"
#include "core/rng.h"
#include "core/safetensors.h"

namespace kiln {

namespace fs = std::filesystem;

IdxArray read_idx(const std::string& path) {
  // gzread reads plain files too (zlib passes non-gzip data through).
  gzFile f = gzopen(path.c_str(), "rb");
  KILN_CHECK(f, "idx ", path, ": cannot open");
  std::string bytes;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) bytes.append(buf, size_t(n));
  int err = 0;
  const char* msg = n < 0 ? gzerror(f, &err) : nullptr;
  std::string emsg = msg ? msg : "";
  gzclose(f);
  KILN_CHECK(n == 0, "idx ", path, ": ", emsg);
  auto u8 = [&](size_t i) { return uint8_t(bytes[i]); };
  KILN_CHECK(bytes.size() >= 4 && u8(0) == 0 && u8(1) == 0, "idx ", path, ": not an idx file (bad magic)");
  KILN_CHECK(u8(2) == 0x08, "idx ", path, ": element type 0x", std::hex, int(u8(2)), std::dec,
             " is not unsigned bytes (0x08)");
  const int nd = u8(3);
  KILN_CHECK(nd >= 1 && nd <= 3, "idx ", path, ": ", nd, " dimensions (expected 1 for labels or 3 for images)");
  KILN_CHECK(bytes.size() >= size_t(4 + 4 * nd), "idx ", path, ": truncated header");
  IdxArray a;
  int64_t total = 1;
  for (int d = 0; d < nd; d++) {
    const size_t o = 4 + 4 * size_t(d);
    const int64_t v = (int64_t(u8(o)) << 24) | (int64_t(u8(o + 1)) << 16) | (int64_t(u8(o + 2)) << 8) | u8(o + 3);
    a.dims.push_back(v);
    total *= v;
  }
  const size_t head = 4 + 4 * size_t(nd);
  KILN_CHECK(bytes.size() - head == size_t(total), "idx ", path, ": ", bytes.size() - head,
             " data bytes, the header says ", total);
  a.data.assign(bytes.begin() + head, bytes.end());
  return a;
}

namespace {

// The images of one input, before splitting.
struct Pool {
  int channels = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;  // [N, C, H, W]
  std::vector<int32_t> labels;
  std::vector<std::string> class_names;  // from PNG folders
  std::string first;                     // the input that fixed the image size (for errors)
  void check_size(int c, int h, int w, const std::string& where) {
    if (first.empty()) {
      channels = c, height = h, width = w, first = where;
      return;
    }
    KILN_CHECK(c == channels && h == height && w == width, where, ": image is ", c, "x", h, "x", w,
               " (channels x height x width), but ", first, " is ", channels, "x", height, "x", width,
               "; all images must have one size");
  }
};

void add_idx(Pool& p, const std::string& spec) {
  const size_t colon = spec.rfind(':');
  KILN_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < spec.size(), "--idx ", spec,
             ": expected IMAGES:LABELS (two idx files)");
  const std::string ip = spec.substr(0, colon), lp = spec.substr(colon + 1);
  IdxArray im = read_idx(ip), lb = read_idx(lp);
  KILN_CHECK(im.dims.size() == 3, "idx ", ip, ": expected images [N, H, W], got ", im.dims.size(), " dimensions");
  KILN_CHECK(lb.dims.size() == 1, "idx ", lp, ": expected labels [N], got ", lb.dims.size(), " dimensions");
  KILN_CHECK(im.dims[0] == lb.dims[0], "idx ", lp, ": ", lb.dims[0], " labels for ", im.dims[0], " images in ", ip);
  p.check_size(1, int(im.dims[1]), int(im.dims[2]), ip);
  p.pixels.insert(p.pixels.end(), im.data.begin(), im.data.end());
  for (uint8_t l : lb.data) p.labels.push_back(l);
}

// DIR/<class>/*.png. Class folders named by integers take those numbers as labels; otherwise the sorted folder
// names are labels 0, 1, ... (the same names across dirs give the same labels).
void add_png_dir(Pool& p, const std::string& dir) {
  KILN_CHECK(fs::is_directory(dir), "--png-dir ", dir, ": not a directory");
  std::vector<std::string> classes;
  for (auto& e : fs::directory_iterator(dir))
    if (e.is_directory()) classes.push_back(e.path().filename().string());
  std::sort(classes.begin(), classes.end());
  KILN_CHECK(!classes.empty(), "--png-dir ", dir, ": no class folders (expected DIR/<class>/*.png)");
  const bool numeric = std::all_of(classes.begin(), classes.end(), [](const std::string& s) {
    return !s.empty() && s.size() < 9 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  });
  if (!numeric && p.class_names.empty()) p.class_names = classes;
  for (const std::string& c : classes) {
    int32_t label;
    if (numeric) {
      label = std::stoi(c);
    } else {
      auto it = std::find(p.class_names.begin(), p.class_names.end(), c);
      KILN_CHECK(it != p.class_names.end(), "--png-dir ", dir, ": class folder '", c,
                 "' is not among the classes of the first folder");
      label = int32_t(it - p.class_names.begin());
    }
    std::vector<std::string> files;
    for (auto& e : fs::directory_iterator(fs::path(dir) / c))
      if (e.is_regular_file() && e.path().extension() == ".png") files.push_back(e.path().string());
    std::sort(files.begin(), files.end());
    for (const std::string& f : files) {
      Image8 im = read_png(f);
      p.check_size(im.channels, im.height, im.width, f);
      // HWC -> CHW
      const size_t at = p.pixels.size(), hw = size_t(im.height) * im.width;
      p.pixels.resize(at + hw * im.channels);
      for (size_t i = 0; i < hw; i++)
        for (int ch = 0; ch < im.channels; ch++) p.pixels[at + ch * hw + i] = im.pixels[i * im.channels + ch];
      p.labels.push_back(label);
    }
  }
}

Pool gather(const std::vector<std::string>& idx, const std::vector<std::string>& pngs) {
  Pool p;
  for (auto& s : idx) add_idx(p, s);
  for (auto& d : pngs) add_png_dir(p, d);
  return p;
}

struct ShardWriter {
  ShardWriter(std::string o, std::string s, int c, int h, int w, int k, int per)
      : out(std::move(o)), split(std::move(s)), C(c), H(h), W(w), classes(k), per_shard(per) {}
  std::string out, split;
  int C, H, W, classes, per_shard;
  std::vector<float> img;
  std::vector<int32_t> lab;
  std::vector<std::string> files;
  int64_t count = 0;
  void add(const uint8_t* px, int32_t label) {
    const int64_t n = int64_t(C) * H * W;
    for (int64_t i = 0; i < n; i++) img.push_back(float(px[i]) / 127.5f - 1.0f);
    lab.push_back(label);
    count++;
    if (int(lab.size()) == per_shard) flush();
  }
  void flush() {
    if (lab.empty()) return;
    char name[64];
    std::snprintf(name, sizeof name, "%s_%06zu.safetensors", split.c_str(), files.size());
    const int64_t N = int64_t(lab.size());
    std::vector<Tensor> t = {{"images", DType::F32, Shape{N, C, H, W}, img.data()},
                             {"labels", DType::I32, Shape{N}, lab.data()}};
    write_safetensors((fs::path(out) / name).string(), t,
                      {{"format", "kiln-images"}, {"version", "1"}, {"classes", std::to_string(classes)},
                       {"channels", std::to_string(C)}, {"height", std::to_string(H)},
                       {"width", std::to_string(W)}});
    files.push_back(name);
    img.clear();
    lab.clear();
  }
};

}  // namespace

ImagePrepareStats prepare_images(const ImagePrepareOptions& opt) {
  KILN_CHECK(!opt.out.empty(), "--out: an output directory is required");
  KILN_CHECK(!opt.idx.empty() || !opt.png_dirs.empty(), "prepare-images: give --idx or --png-dir inputs");
  KILN_CHECK(opt.val_fraction >= 0 && opt.val_fraction < 1, "--val-fraction ", opt.val_fraction,
             ": must be in [0, 1)");
  KILN_CHECK(opt.shard_images > 0, "--shard-images ", opt.shard_images, ": must be positive");
  KILN_CHECK(opt.classes >= 0, "--classes ", opt.classes, ": must be positive");
  Pool train = gather(opt.idx, opt.png_dirs);
  Pool test = gather(opt.test_idx, opt.test_png_dirs);
  KILN_CHECK(!train.labels.empty(), "prepare-images: the inputs hold no images");
  if (!test.labels.empty())
    test.check_size(train.channels, train.height, train.width, train.first);  // names the mismatch
  // Class count: given, or from the inputs; every label must fall below it.
  int classes = opt.classes;
  if (classes == 0) {
    if (!train.class_names.empty()) classes = int(train.class_names.size());
    for (const Pool* p : {&train, &test})
      for (int32_t l : p->labels) classes = std::max(classes, l + 1);
  }
  for (const Pool* p : {&train, &test})
    for (size_t i = 0; i < p->labels.size(); i++)
      KILN_CHECK(p->labels[i] < classes, "prepare-images: label ", p->labels[i], " of image ", i, " (",
                 p == &train ? "train" : "test", " inputs) is out of range for --classes ", classes);

  if (fs::exists(opt.out))
    for (auto& e : fs::directory_iterator(opt.out))
      KILN_CHECK(e.path().extension() != ".safetensors", "--out ", opt.out, ": already holds shards (",
                 e.path().filename().string(), ")");
  make_dirs(opt.out);
  const int C = train.channels, H = train.height, W = train.width;
  const int64_t px = int64_t(C) * H * W;
  ShardWriter tw(opt.out, "train", C, H, W, classes, opt.shard_images);
  ShardWriter vw(opt.out, "val", C, H, W, classes, opt.shard_images);
  ShardWriter sw(opt.out, "test", C, H, W, classes, opt.shard_images);
  for (size_t i = 0; i < train.labels.size(); i++) {
    uint32_t r[4];
    Philox::block(opt.seed, i, r);
    const bool val = double(r[0] >> 8) / 16777216.0 < opt.val_fraction;
    (val ? vw : tw).add(train.pixels.data() + int64_t(i) * px, train.labels[i]);
  }
  for (size_t i = 0; i < test.labels.size(); i++) sw.add(test.pixels.data() + int64_t(i) * px, test.labels[i]);
  tw.flush(), vw.flush(), sw.flush();

  std::vector<std::string> names = train.class_names;
  if (names.empty())
    for (int c = 0; c < classes; c++) names.push_back(std::to_string(c));
  nlohmann::json j = {{"format", "kiln-images"}, {"version", 1}, {"classes", classes}, {"channels", C},
                      {"height", H}, {"width", W}, {"class_names", names}, {"train", tw.count},
                      {"val", vw.count}, {"test", sw.count},
                      {"shards", {{"train", tw.files}, {"val", vw.files}, {"test", sw.files}}}};
  write_file_atomic((fs::path(opt.out) / "images.json").string(), j.dump(2) + "\n");
  ImagePrepareStats st;
  st.train = tw.count, st.val = vw.count, st.test = sw.count;
  st.classes = classes, st.channels = C, st.height = H, st.width = W;
  st.shards = int(tw.files.size() + vw.files.size() + sw.files.size());
  return st;
}

ImageSet load_images(const std::string& path, const std::string& split) {
  std::vector<std::string> files;
  if (fs::is_directory(path)) {
    files = expand_glob((fs::path(path) / (split + "_*.safetensors")).string());
    KILN_CHECK(!files.empty(), "images ", path, ": no ", split, " shards (", split, "_*.safetensors)");
  } else {
    files = expand_glob(path);
    KILN_CHECK(!files.empty(), "images ", path, ": no such shard files");
  }
  ImageSet s;
  for (const std::string& f : files) {
    SafeTensorsReader r(f);
    auto meta = [&](const char* k) {
      auto it = r.metadata().find(k);
      KILN_CHECK(it != r.metadata().end(), "images ", f, ": metadata '", k, "' missing (not a kiln image shard)");
      try {
        return std::stoi(it->second);
      } catch (...) {
        fail("images ", f, ": metadata '", k, "' is not an integer: ", it->second);
      }
    };
    auto fmt = r.metadata().find("format");
    KILN_CHECK(fmt != r.metadata().end() && fmt->second == "kiln-images", "images ", f,
               ": not a kiln image shard (metadata format)");
    const int classes = meta("classes"), C = meta("channels"), H = meta("height"), W = meta("width");
    const Tensor& im = r.get("images");
    const Tensor& lb = r.get("labels");
    KILN_CHECK(im.dtype == DType::F32 && im.shape.ndim == 4 && im.shape.dims[1] == C && im.shape.dims[2] == H &&
                   im.shape.dims[3] == W,
               "images ", f, ": tensor 'images' must be F32 [N, ", C, ", ", H, ", ", W, "]");
    KILN_CHECK(lb.dtype == DType::I32 && lb.shape.ndim == 1 && lb.shape.dims[0] == im.shape.dims[0], "images ", f,
               ": tensor 'labels' must be I32 [", im.shape.dims[0], "]");
    if (s.labels.empty() && s.images.empty()) {
      s.classes = classes, s.channels = C, s.height = H, s.width = W;
    } else {
      KILN_CHECK(classes == s.classes && C == s.channels && H == s.height && W == s.width, "images ", f,
                 ": shape or class count differs from ", files[0]);
    }
    const int32_t* l = lb.as<int32_t>();
    for (int64_t i = 0; i < lb.numel(); i++)
      KILN_CHECK(l[i] >= 0 && l[i] < classes, "images ", f, ": label ", l[i], " at ", i, " out of range [0, ",
                 classes, ")");
    s.labels.insert(s.labels.end(), l, l + lb.numel());
    s.images.insert(s.images.end(), im.f32(), im.f32() + im.numel());
  }
  return s;
}

bool has_image_split(const std::string& dir, const std::string& split) {
  return std::filesystem::is_directory(dir) &&
         std::filesystem::exists(std::filesystem::path(dir) / (split + "_000000.safetensors"));
}

Augment Augment::parse(const std::string& s) {
  Augment a;
  if (s.empty() || s == "none") return a;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = std::min(s.find(',', at), s.size());
    const std::string item = s.substr(at, comma - at);
    if (item == "flip") {
      a.flip = true;
    } else if (item.rfind("crop:", 0) == 0 && item.size() > 5 && item.size() < 8 &&
               item.find_first_not_of("0123456789", 5) == std::string::npos) {
      a.crop = std::stoi(item.substr(5));
    } else {
      fail("--augment '", s, "': expected none or a comma list of crop:K and flip (got '", item, "')");
    }
    at = comma + 1;
  }
  return a;
}

void augment_batch(float* x, int B, int C, int H, int W, const Augment& a, Rng& r) {
  if (!a.any()) return;
  std::vector<float> src(size_t(C) * H * W);
  for (int b = 0; b < B; b++) {
    const int dy = a.crop ? int(r.below(uint64_t(2 * a.crop + 1))) - a.crop : 0;
    const int dx = a.crop ? int(r.below(uint64_t(2 * a.crop + 1))) - a.crop : 0;
    const bool flip = a.flip && r.uniform() < 0.5;
    float* im = x + int64_t(b) * C * H * W;
    std::copy_n(im, src.size(), src.data());
    // out(i, j) = in(i + dy, j' + dx) with j' the mirrored column; outside the image: the background.
    for (int c = 0; c < C; c++)
      for (int i = 0; i < H; i++)
        for (int j = 0; j < W; j++) {
          const int si = i + dy, sj = (flip ? W - 1 - j : j) + dx;
          im[(int64_t(c) * H + i) * W + j] =
              si >= 0 && si < H && sj >= 0 && sj < W ? src[(size_t(c) * H + si) * W + sj] : -1.0f;
        }
  }
}

}  // namespace kiln
