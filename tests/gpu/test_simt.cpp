// The SIMT layer: mma/ldmatrix fragment layouts against a naive product, shuffles against their definition,
// block reductions, and (emulator only) the deadlock check.
#include <gtest/gtest.h>

#include "core/gpu.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/simt_probe.h"
#ifdef KILN_TEST_EMULATED
#include "kernels/cuda/emu/simt_emu.h"
#endif

namespace kiln {
namespace {
using test::DeviceVec;

TEST(Simt, MmaThroughLdmatrixMatchesNaiveProduct) {
  KILN_REQUIRE_GPU();
  auto a = test::round_bf16(test::randn(256, 1));
  auto b = test::round_bf16(test::randn(128, 2));
  DeviceVec<uint16_t> da(test::to_bf16(a)), db(test::to_bf16(b));
  DeviceVec<float> dd(256);
  probe::mma(dd.get(), da.get(), db.get(), gpu::stream());
  auto d = dd.download();
  for (int r = 0; r < 16; r++)
    for (int n = 0; n < 8; n++) {
      double s = 0;
      for (int k = 0; k < 16; k++) s += double(a[r * 16 + k]) * b[k * 8 + n];
      EXPECT_NEAR(d[r * 8 + n], s, 1e-5) << "row " << r << " col " << n << " (ldmatrix)";
      EXPECT_NEAR(d[128 + r * 8 + n], s, 1e-5) << "row " << r << " col " << n << " (ldmatrix.trans)";
    }
}

TEST(Simt, ShufflesFollowTheirDefinition) {
  KILN_REQUIRE_GPU();
  DeviceVec<int> out(96);
  probe::shuffles(out.get(), gpu::stream());
  auto o = out.download();
  for (int l = 0; l < 32; l++) {
    EXPECT_EQ(o[l], (l ^ 5) * 10);
    EXPECT_EQ(o[32 + l], (l + 3 < 32 ? l + 3 : l) * 10);
    EXPECT_EQ(o[64 + l], ((l & ~15) + 7) * 10);
  }
}

TEST(Simt, BlockSumAcrossBlocksAndWarps) {
  KILN_REQUIRE_GPU();
  auto x = test::randn(5000, 3);
  double ref = 0;
  for (float v : x) ref += v;
  DeviceVec<float> dx(x), out(std::vector<float>{0.0f});
  probe::block_sum(out.get(), dx.get(), int(x.size()), 3, 128, gpu::stream());
  EXPECT_NEAR(out.download()[0], ref, 1e-3);
}

TEST(Simt, TileHandedBetweenWarpsAcrossABarrier) {
  KILN_REQUIRE_GPU();
  std::vector<float> src_f(64);
  for (int i = 0; i < 64; i++) src_f[size_t(i)] = float(i);
  DeviceVec<uint16_t> src(test::to_bf16(src_f));
  DeviceVec<float> out(32);
  probe::tile_handoff(out.get(), src.get(), true, gpu::stream());
  auto o = out.download();
  for (int l = 0; l < 32; l++) EXPECT_EQ(o[size_t(l)], float(8 * (l / 4) + 2 * (l % 4))) << "lane " << l;
}

#ifdef KILN_TEST_EMULATED
// The probe's A tile has unpadded 32-byte rows, so rows 0 and 4 of each 8×8 matrix share banks: the bank
// conflict counter must see it (the attention kernels' padded tiles are checked to have none).
TEST(Simt, EmulatorCountsLdmatrixBankConflicts) {
  KILN_REQUIRE_GPU();
  DeviceVec<uint16_t> a(std::vector<uint16_t>(256, 0)), b(std::vector<uint16_t>(128, 0));
  DeviceVec<float> d(256);
  const int64_t before = emu::ldmatrix_bank_conflicts();
  probe::mma(d.get(), a.get(), b.get(), gpu::stream());
  EXPECT_GT(emu::ldmatrix_bank_conflicts() - before, 0);
}

TEST(Simt, EmulatorReportsASharedMemoryRace) {
  KILN_REQUIRE_GPU();
  DeviceVec<uint16_t> src(std::vector<uint16_t>(64, 0));
  DeviceVec<float> out(32);
  try {
    probe::tile_handoff(out.get(), src.get(), false, gpu::stream());
    FAIL() << "no race reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shared-memory race"), std::string::npos) << e.what();
  }
}

TEST(Simt, EmulatorReportsABarrierSomeThreadsSkip) {
  KILN_REQUIRE_GPU();
  DeviceVec<float> out(64);
  try {
    probe::bad_barrier(out.get(), gpu::stream());
    FAIL() << "no deadlock reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
  }
}
#endif

}  // namespace
}  // namespace kiln
