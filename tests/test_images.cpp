// kiln data prepare-images and the image shard reader (train/images.h): idx (gzip and plain) and PNG inputs,
// the [-1, 1] scaling computed here from the bytes written, the held-out split, and one-line errors.
#include <gtest/gtest.h>
#include <zlib.h>

#include <fstream>

#include "core/error.h"
#include "core/png.h"
#include "tests/io_test_helpers.h"
#include "train/images.h"

namespace kiln {
namespace {

std::string be32(uint32_t v) {
  return {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
}

// An idx file: magic 0x08 (u8) with the given dims, gzipped or plain.
void write_idx(const std::string& path, const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data,
               bool gz) {
  std::string s = std::string("\0\0\x08", 3) + char(dims.size());
  for (uint32_t d : dims) s += be32(d);
  s.append(data.begin(), data.end());
  if (gz) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, s.data(), unsigned(s.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary) << s;
  }
}

std::string error_of(const ImagePrepareOptions& o) {
  try {
    prepare_images(o);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Images, IdxRoundTripScalingAndSplit) {
  test::ScratchDir d("images_idx");
  const int N = 50, H = 3, W = 2;
  std::vector<uint8_t> px(N * H * W), lb(N);
  for (size_t i = 0; i < px.size(); i++) px[i] = uint8_t((i * 37) % 256);
  for (int i = 0; i < N; i++) lb[i] = uint8_t(i % 4);
  write_idx((d.path / "img.gz").string(), {N, H, W}, px, true);
  write_idx((d.path / "lab").string(), {N}, lb, false);
  write_idx((d.path / "timg").string(), {2, H, W}, std::vector<uint8_t>(2 * H * W, 255), false);
  write_idx((d.path / "tlab").string(), {2}, {3, 0}, false);
  ImagePrepareOptions o;
  o.idx = {(d.path / "img.gz").string() + ":" + (d.path / "lab").string()};
  o.test_idx = {(d.path / "timg").string() + ":" + (d.path / "tlab").string()};
  o.out = (d.path / "out").string();
  o.val_fraction = 0.3;
  o.shard_images = 7;
  ImagePrepareStats st = prepare_images(o);
  EXPECT_EQ(st.classes, 4);
  EXPECT_EQ(st.train + st.val, N);
  EXPECT_GT(st.val, 5);
  EXPECT_LT(st.val, 30);
  EXPECT_EQ(st.test, 2);
  ImageSet tr = load_images(o.out, "train"), va = load_images(o.out, "val"), te = load_images(o.out, "test");
  ASSERT_EQ(tr.size(), st.train);
  EXPECT_EQ(tr.height, H);
  EXPECT_EQ(tr.width, W);
  EXPECT_EQ(tr.channels, 1);
  // Train and val together are the inputs in order: merge them back by label pattern and pixel values.
  size_t ti = 0, vi = 0;
  for (int i = 0; i < N; i++) {
    const bool in_train = ti < size_t(tr.size()) && tr.labels[ti] == lb[i] &&
                          tr.images[ti * H * W] == float(px[i * H * W]) / 127.5f - 1.0f;
    const ImageSet& s = in_train ? tr : va;
    size_t& k = in_train ? ti : vi;
    ASSERT_LT(k, size_t(s.size())) << i;
    ASSERT_EQ(s.labels[k], lb[i]) << i;
    for (int j = 0; j < H * W; j++) ASSERT_FLOAT_EQ(s.images[k * H * W + j], px[i * H * W + j] / 127.5f - 1.0f);
    k++;
  }
  EXPECT_EQ(te.labels, (std::vector<int32_t>{3, 0}));
  EXPECT_FLOAT_EQ(te.images[0], 1.0f);
  // The same seed gives the same split; another seed another one.
  ImagePrepareOptions o2 = o;
  o2.out = (d.path / "out2").string();
  EXPECT_EQ(prepare_images(o2).val, st.val);
  o2.out = (d.path / "out3").string();
  o2.seed = 7;
  ImageSet va3 = (prepare_images(o2), load_images(o2.out, "val"));
  EXPECT_NE(va3.images, va.images);
  // An existing output is refused.
  EXPECT_NE(error_of(o).find("already holds shards"), std::string::npos);
}

TEST(Images, PngFoldersAndErrors) {
  test::ScratchDir d("images_png");
  auto png = [&](const std::string& rel, int w, int h, uint8_t v) {
    std::filesystem::create_directories((d.path / rel).parent_path());
    Image8 im{w, h, 1, std::vector<uint8_t>(size_t(w) * h, v)};
    im.pixels[0] = 0;
    write_png((d.path / rel).string(), im);
  };
  png("a/shirt/1.png", 4, 3, 200);
  png("a/shirt/2.png", 4, 3, 100);
  png("a/boot/1.png", 4, 3, 50);
  ImagePrepareOptions o;
  o.png_dirs = {(d.path / "a").string()};
  o.out = (d.path / "out").string();
  o.val_fraction = 0;
  ImagePrepareStats st = prepare_images(o);
  EXPECT_EQ(st.classes, 2);
  EXPECT_EQ(st.train, 3);
  ImageSet s = load_images(o.out);
  EXPECT_EQ(s.labels, (std::vector<int32_t>{0, 1, 1}));  // boot < shirt
  EXPECT_FLOAT_EQ(s.images[0], -1.0f);
  EXPECT_FLOAT_EQ(s.images[1], 50 / 127.5f - 1);
  EXPECT_FLOAT_EQ(s.images[12 + 1], 200 / 127.5f - 1);

  // Mixed sizes: one line naming the file.
  png("b/0/1.png", 4, 3, 1);
  png("b/1/2.png", 5, 3, 1);
  o.png_dirs = {(d.path / "b").string()};
  o.out = (d.path / "out_b").string();
  std::string e = error_of(o);
  EXPECT_NE(e.find("2.png: image is 1x3x5"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos);
  // Labels out of range for --classes.
  png("c/0/1.png", 4, 3, 1);
  png("c/5/1.png", 4, 3, 1);
  o.png_dirs = {(d.path / "c").string()};
  o.classes = 3;
  o.out = (d.path / "out_c").string();
  e = error_of(o);
  EXPECT_NE(e.find("label 5 of image 1 (train inputs) is out of range for --classes 3"), std::string::npos) << e;
  // Not an idx file; a shard that is not a kiln image shard.
  std::ofstream(d.path / "bad.idx") << "hello world";
  o.png_dirs = {};
  o.idx = {(d.path / "bad.idx").string() + ":" + (d.path / "bad.idx").string()};
  e = error_of(o);
  EXPECT_NE(e.find("bad.idx: not an idx file"), std::string::npos) << e;
  EXPECT_THROW(load_images((d.path / "nothing").string()), Error);
}

}  // namespace
}  // namespace kiln
