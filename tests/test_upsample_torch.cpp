// Upsampling (kernels/upsample.h) against PyTorch's F.interpolate (tests/peer/torch_upsample.py, float64):
// nearest, bilinear with align_corners False and True, forward and the input gradient, on the CPU kernels and the
// naive reference, at scales 2, 3 and 4 of odd, non-square planes (and a one-row plane).
#include <gtest/gtest.h>

#include <cstdlib>

#include "core/safetensors.h"
#include "kernels/upsample.h"
#include "tests/io_test_helpers.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

void check_shape(int B, int C, int H, int W) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no torch";
  const int64_t planes = int64_t(B) * C, n = planes * H * W;
  const std::vector<float> x = test::randn(size_t(n), uint64_t(n + H));
  const std::vector<int> scales = {2, 3, 4};
  std::vector<std::vector<float>> douts;
  std::vector<Tensor> in = {{"x", DType::F32, Shape{B, C, H, W}, const_cast<float*>(x.data())}};
  for (int s : scales) douts.push_back(test::randn(size_t(n * s * s), uint64_t(100 + s)));
  for (size_t k = 0; k < scales.size(); k++) {
    const int64_t s = scales[k];
    in.push_back({"dout_" + std::to_string(s), DType::F32, Shape{B, C, H * s, W * s}, douts[k].data()});
  }
  test::ScratchDir dir("upsample_torch");
  write_safetensors((dir.path / "in.safetensors").string(), in);
  const std::string cmd = "/usr/bin/python3 " KILN_SOURCE_DIR "/tests/peer/torch_upsample.py " +
                          (dir.path / "in.safetensors").string() + " " + (dir.path / "out.safetensors").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  SafeTensorsReader r((dir.path / "out.safetensors").string());
  const std::pair<const char*, Upsample> modes[] = {
      {"nearest", Upsample::Nearest}, {"bilinear", Upsample::Bilinear}, {"aligned", Upsample::BilinearAligned}};
  for (size_t k = 0; k < scales.size(); k++) {
    const int s = scales[k];
    for (const auto& [name, mode] : modes) {
      const std::string tag = std::string(name) + "_" + std::to_string(s);
      const Tensor& want_out = r.get("out_" + tag);
      const Tensor& want_din = r.get("din_" + tag);
      ASSERT_EQ(want_out.numel(), n * s * s) << tag;
      std::vector<float> out(static_cast<size_t>(n * s * s)), din(static_cast<size_t>(n));
      cpu::upsample_forward(out.data(), x.data(), planes, H, W, s, mode);
      EXPECT_TRUE(test::all_close(out.data(), want_out.f32(), out.size(), 1e-5, 1e-6)) << "cpu out " << tag;
      cpu::upsample_backward(din.data(), douts[k].data(), planes, H, W, s, mode);
      EXPECT_TRUE(test::all_close(din.data(), want_din.f32(), din.size(), 1e-5, 1e-5)) << "cpu din " << tag;
      ref::upsample_forward(out.data(), x.data(), planes, H, W, s, mode);
      EXPECT_TRUE(test::all_close(out.data(), want_out.f32(), out.size(), 1e-5, 1e-6)) << "ref out " << tag;
      ref::upsample_backward(din.data(), douts[k].data(), planes, H, W, s, mode);
      EXPECT_TRUE(test::all_close(din.data(), want_din.f32(), din.size(), 1e-5, 1e-5)) << "ref din " << tag;
    }
  }
}

TEST(UpsampleTorch, OddPlanes) { check_shape(2, 3, 5, 7); }
TEST(UpsampleTorch, OneRowAndTwoColumns) { check_shape(1, 2, 1, 2); }

}  // namespace
}  // namespace kiln
