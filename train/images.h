// Image data sets for the generative and classifier objectives: `kiln data prepare-images` turns Fashion-MNIST's
// idx files (optionally gzipped) and folders of PNG files into image shards, and training reads them back.
//
// Shard format (one safetensors file per shard, <out>/{train,val,test}_NNNNNN.safetensors):
//   images  F32 [N, C, H, W]  pixels scaled to [-1, 1]: v = p / 127.5 − 1 for the 8-bit value p
//   labels  I32 [N]           class index in [0, classes)
//   __metadata__  {"format": "kiln-images", "version": "1", "classes", "channels", "height", "width"}
// and <out>/images.json: {"format", "version", "classes", "channels", "height", "width", "class_names": [...],
// "train", "val", "test" (image counts), "shards": {"train": [...], ...}}.
// Every file is written atomically. The held-out (val) split is chosen per image from its index and the seed
// (Philox), so it does not depend on the shard size; a test split comes from separate inputs (t10k files).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"

namespace kiln {

struct ImagePrepareOptions {
  std::vector<std::string> idx;        // "IMAGES:LABELS" idx pairs (train pool)
  std::vector<std::string> png_dirs;   // DIR/<class>/*.png (train pool)
  std::vector<std::string> test_idx;   // the same for the test split
  std::vector<std::string> test_png_dirs;
  std::string out;
  int classes = 0;             // 0: from the inputs (idx: max label + 1; PNG: the number of class folders)
  double val_fraction = 0.1;   // of the train pool
  int shard_images = 10000;
  uint64_t seed = 1337;
};

struct ImagePrepareStats {
  int64_t train = 0, val = 0, test = 0;
  int classes = 0, channels = 0, height = 0, width = 0;
  int shards = 0;
};

ImagePrepareStats prepare_images(const ImagePrepareOptions& opt);

// A split of an image data set in memory (every shard of it).
struct ImageSet {
  int classes = 0, channels = 0, height = 0, width = 0;
  std::vector<float> images;    // [N, C, H, W] in [-1, 1]
  std::vector<int32_t> labels;  // [N]
  int64_t size() const { return int64_t(labels.size()); }
  int64_t pixels() const { return int64_t(channels) * height * width; }
};

// Whether a prepared directory holds a split (its first shard, <dir>/<split>_000000.safetensors, exists).
bool has_image_split(const std::string& dir, const std::string& split);

// Loads a split: `path` is a shard file, a glob of them, or a prepared directory plus `split` (train, val, test).
// Throws kiln::Error naming the file and tensor on any defect (shape, dtype, label range, mixed image sizes).
ImageSet load_images(const std::string& path, const std::string& split = "train");

// Training augmentation of a batch x [B, C, H, W] in place: "none", or a comma list of "crop:K" (shift each
// image by a uniform (dy, dx) in [-K, K]², filling with the background value -1: a random crop of the image
// padded by K) and "flip" (mirror left-right with probability 1/2). Draws from r, per image: dy, dx, flip.
struct Augment {
  int crop = 0;
  bool flip = false;
  static Augment parse(const std::string& s);  // one-line error naming --augment
  bool any() const { return crop > 0 || flip; }
};
void augment_batch(float* x, int B, int C, int H, int W, const Augment& a, Rng& r);

// Reads an idx file (gzip or plain): magic 0x0803 (u8 images [N, H, W]) or 0x0801 (u8 labels [N]).
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};
IdxArray read_idx(const std::string& path);

}  // namespace kiln
