#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "core/dtype.h"
#include "core/file_io.h"
#include "core/memory.h"
#include "core/rng.h"

using namespace kiln;

// Known-answer vectors published with Random123 (kat_vectors: philox4x32_10).
TEST(Philox, MatchesRandom123KnownAnswers) {
  uint32_t c[4] = {0, 0, 0, 0};
  const uint32_t k[2] = {0, 0};
  Philox::round4x32(c, k);
  EXPECT_EQ(c[0], 0x6627e8d5u);
  EXPECT_EQ(c[1], 0xe169c58du);
  EXPECT_EQ(c[2], 0xbc57ac4cu);
  EXPECT_EQ(c[3], 0x9b00dbd8u);
  uint32_t c2[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};
  const uint32_t k2[2] = {0xffffffffu, 0xffffffffu};
  Philox::round4x32(c2, k2);
  EXPECT_EQ(c2[0], 0x408f276du);
  EXPECT_EQ(c2[1], 0x41c83b0eu);
  EXPECT_EQ(c2[2], 0xa20bc7c6u);
  EXPECT_EQ(c2[3], 0x6d5451fdu);
}

TEST(Rng, ResumesFromPosition) {
  Rng a(42);
  for (int i = 0; i < 7; i++) a.next_u32();
  Rng b(42, a.position());
  for (int i = 0; i < 20; i++) EXPECT_EQ(a.next_u32(), b.next_u32());
}

TEST(Rng, NormalMoments) {
  Rng r(7);
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; i++) {
    double x = r.normal();
    s += x;
    s2 += x * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.02);
}

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly half-way between bf16 1.0 and 1 + 2^-7: ties go to even (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(f16_to_f32(f32_to_f16(0.333251953125f)), 0.333251953125f);
}

TEST(Arena, MeasuresThenAllocates) {
  Arena measure;
  measure.alloc<float>(10);
  measure.alloc<double>(3);
  Arena real(measure.peak());
  float* a = real.alloc<float>(10);
  double* b = real.alloc<double>(3);
  EXPECT_NE(a, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % kAlign, 0u);
  EXPECT_EQ(real.peak(), measure.peak());
}

TEST(AtomicWrite, FailureLeavesOldFileWhole) {
  auto dir = std::filesystem::temp_directory_path() / "kiln_test_atomic";
  std::filesystem::create_directories(dir);
  std::string path = (dir / "f.txt").string();
  write_file_atomic(path, std::string_view("first"));
  EXPECT_THROW(write_file_atomic(path, [&](int fd) {
                 write_all(fd, "partial", 7, path);
                 throw std::runtime_error("killed");
               }),
               std::runtime_error);
  EXPECT_EQ(read_file(path), "first");
  for (auto& e : std::filesystem::directory_iterator(dir)) EXPECT_EQ(e.path().filename(), "f.txt");
  std::filesystem::remove_all(dir);
}
