// Whole-model tests: gradients against finite differences, recomputation policies bit-identical,
// the chunked LM head equal to the whole one, and the data loader's sequential order.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <vector>

#include "tests/gpt2_compat.h"
#include "test_util.h"
#include "train/dataloader.h"
#include "train/schedule.h"

using namespace kiln;

namespace {

GPT2Config tiny() {
  GPT2Config c;
  c.n_layer = 3;
  c.n_head = 2;
  c.n_embd = 32;
  c.vocab_size = 37;
  c.n_positions = 12;
  return c;
}

struct TestBatch {
  int B = 2, T = 7;
  std::vector<int32_t> tokens, targets, pos;
  explicit TestBatch(int vocab) {
    Rng r(11);
    for (int i = 0; i < B * T; i++) {
      tokens.push_back(int32_t(r.below(uint64_t(vocab))));
      targets.push_back(int32_t(r.below(uint64_t(vocab))));
      pos.push_back(i % T);
    }
    targets[3] = -1;  // an ignored target
  }
};

std::vector<float> grads_with(const GPT2Config& c, const TestBatch& b, const std::string& policy, int chunk, double* loss) {
  GPT2 m(c);
  m.init_random(5);
  m.plan(b.B, b.T, RecomputePolicy::parse(policy), chunk);
  m.zero_grad();
  *loss = m.forward(b.tokens.data(), b.pos.data(), b.targets.data(), m.attention_params(b.B, b.T), 0.05f);
  m.backward(b.tokens.data(), b.pos.data());
  return std::vector<float>(m.grads(), m.grads() + m.num_floats());
}

}  // namespace

TEST(GPT2Model, GradientsMatchFiniteDifferences) {
  GPT2Config c = tiny();
  TestBatch b(c.vocab_size);
  GPT2 m(c);
  m.init_random(3);
  m.plan(b.B, b.T);
  const auto ap = m.attention_params(b.B, b.T);
  m.zero_grad();
  m.forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 1.0f);
  m.backward(b.tokens.data(), b.pos.data());
  std::vector<float> g(m.grads(), m.grads() + m.num_floats());
  // Loss as a function of one parameter, summed in double.
  auto loss_at = [&](size_t i, float delta) {
    float old = m.params()[i];
    m.params()[i] = old + delta;
    double l = m.forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.0f);
    m.params()[i] = old;
    return l;
  };
  Rng r(9);
  int checked = 0;
  for (const ParamSpec& s : m.table().specs) {
    for (int k = 0; k < 2; k++) {
      size_t i = s.offset + size_t(r.below(uint64_t(s.numel())));
      const float h = 1e-2f;
      double fd = (loss_at(i, h) - loss_at(i, -h)) / (2.0 * h);
      EXPECT_NEAR(g[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << s.name << " element " << i - s.offset;
      checked++;
    }
  }
  EXPECT_GT(checked, 60);
}

TEST(GPT2Model, RecomputePoliciesGiveBitIdenticalGradients) {
  GPT2Config c = tiny();
  TestBatch b(c.vocab_size);
  double l0 = 0;
  auto base = grads_with(c, b, "none", 0, &l0);
  for (const char* p : {"block", "every:2", "every:3", "every:5", "selective"}) {
    double l = 0;
    auto g = grads_with(c, b, p, 0, &l);
    EXPECT_EQ(l, l0) << p;
    EXPECT_EQ(0, std::memcmp(g.data(), base.data(), g.size() * sizeof(float))) << p;
  }
}

TEST(GPT2Model, RecomputeShrinksThePlan) {
  GPT2Config c = tiny();
  c.n_layer = 12;
  size_t none = GPT2::plan_bytes(c, 256, RecomputePolicy::parse("none"), 0);
  size_t block = GPT2::plan_bytes(c, 256, RecomputePolicy::parse("block"), 0);
  size_t sel = GPT2::plan_bytes(c, 256, RecomputePolicy::parse("selective"), 0);
  EXPECT_LT(block * 3, none);
  EXPECT_LT(sel, none);
  EXPECT_THROW(RecomputePolicy::parse("every:0"), Error);
  EXPECT_THROW(RecomputePolicy::parse("every:x"), Error);
  EXPECT_THROW(RecomputePolicy::parse("sometimes"), Error);
}

TEST(GPT2Model, ChunkedLmHeadMatchesWholeWithinRounding) {
  GPT2Config c = tiny();
  TestBatch b(c.vocab_size);
  double l0 = 0, l1 = 0;
  auto g0 = grads_with(c, b, "none", 0, &l0);
  auto g1 = grads_with(c, b, "none", 3, &l1);
  EXPECT_NEAR(l0, l1, 1e-5 * std::fabs(l0));
  EXPECT_TRUE(test::all_close(g1, g0, 1e-4, 1e-6));
}

TEST(DataLoader, SequentialOrderIsLlmcs) {
  auto dir = std::filesystem::temp_directory_path() / "kiln_test_loader";
  std::filesystem::create_directories(dir);
  std::vector<uint32_t> a(50), b(30);
  for (size_t i = 0; i < a.size(); i++) a[i] = uint32_t(i);
  for (size_t i = 0; i < b.size(); i++) b[i] = uint32_t(1000 + i);
  write_shard((dir / "s_0.bin").string(), a);
  write_shard((dir / "s_1.bin").string(), b);
  DataLoader dl((dir / "s_*.bin").string(), 2, 5, DataLoader::Order::Sequential, 0, 0);
  std::vector<int32_t> in(10), tg(10);
  // Batches take B·T+1 = 11 tokens and advance by 10: positions 0, 10, 20, 30 of shard 0 (30+11 <= 50),
  // then 40+11 > 50 moves to shard 1 at 0, then 10, then back to shard 0.
  const int64_t expect_first[] = {0, 10, 20, 30, 1000, 1010, 0};
  for (int64_t first : expect_first) {
    dl.next(in.data(), tg.data());
    for (int i = 0; i < 10; i++) {
      EXPECT_EQ(in[size_t(i)], first + i);
      EXPECT_EQ(tg[size_t(i)], first + i + 1);
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(DataLoader, ShuffledVisitsEveryWindowOncePerEpochAndResumes) {
  auto dir = std::filesystem::temp_directory_path() / "kiln_test_loader2";
  std::filesystem::create_directories(dir);
  std::vector<uint32_t> a(41);
  for (size_t i = 0; i < a.size(); i++) a[i] = uint32_t(i);
  write_shard((dir / "s.bin").string(), a);
  DataLoader dl((dir / "s.bin").string(), 1, 4, DataLoader::Order::Shuffled, 3, 0);
  std::vector<int32_t> in(4), tg(4);
  std::vector<int> seen(10, 0);
  for (int k = 0; k < 10; k++) {
    dl.next(in.data(), tg.data());
    ASSERT_EQ(in[0] % 4, 0);
    seen[size_t(in[0] / 4)]++;
    EXPECT_EQ(tg[3], in[0] + 4);
  }
  for (int s : seen) EXPECT_EQ(s, 1);
  LoaderState st = dl.state();
  dl.next(in.data(), tg.data());
  std::vector<int32_t> want = in;
  DataLoader dl2((dir / "s.bin").string(), 1, 4, DataLoader::Order::Shuffled, 3, 0);
  dl2.set_state(st);
  dl2.next(in.data(), tg.data());
  EXPECT_EQ(in, want);
  std::filesystem::remove_all(dir);
}

TEST(LrSchedule, WarmupThenCosineToFloor) {
  LrSchedule s;
  s.lr = 1.0f;
  s.min_lr = 0.1f;
  s.warmup = 4;
  s.total = 14;
  EXPECT_FLOAT_EQ(s.at(0), 0.25f);
  EXPECT_FLOAT_EQ(s.at(3), 1.0f);
  EXPECT_FLOAT_EQ(s.at(4), 1.0f);
  EXPECT_NEAR(s.at(9), 0.1 + 0.5 * (1 + std::cos(M_PI * 0.5)) * 0.9, 1e-6);
  EXPECT_NEAR(s.at(14), 0.1f, 1e-6);
}
