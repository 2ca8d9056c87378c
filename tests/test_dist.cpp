// dist/ and train/data_parallel.h pieces that need no second process: segment layout, batch shares, the
// sharded AdamW against the whole-block one, single-process error agreement. (Multi-rank runs against one
// process: tests/e2e/dist_train.py.)
#include <gtest/gtest.h>

#include <numeric>

#include "dist/communicator.h"
#include "nn/backend.h"
#include "test_util.h"
#include "train/data_parallel.h"
#include "train/optimizer.h"

namespace kiln {
namespace {

TEST(Dist, SegmentCountsCoverTheBlockInAlignedPieces) {
  for (size_t n : {0, 1, 15, 16, 17, 1000, 4099})
    for (int ranks : {1, 2, 3, 7}) {
      const auto c = dist::segment_counts(n, ranks);
      ASSERT_EQ(c.size(), size_t(ranks));
      EXPECT_EQ(std::accumulate(c.begin(), c.end(), size_t(0)), n) << n << " over " << ranks;
      for (int r = 0; r + 1 < ranks; r++) {
        if (dist::segment_offset(c, r + 1) < n) EXPECT_EQ(c[size_t(r)] % 16, 0u);  // segments start aligned
        EXPECT_GE(c[size_t(r)], c[size_t(r + 1)]);  // equal, the last ones shorter
      }
    }
}

Batch rows_batch(int B, int T) {
  Batch b;
  b.B = B;
  b.T = T;
  b.resize(int64_t(B) * T);
  for (int64_t i = 0; i < b.n_tokens; i++) {
    b.tokens[size_t(i)] = int32_t(i);
    b.targets[size_t(i)] = int32_t(i % 5 == 0 ? -1 : i + 1);
    b.pos[size_t(i)] = int32_t(i % T);
  }
  return b;
}

TEST(Dist, RowSharesAreDisjointAndInOrder) {
  const Batch g = rows_batch(6, 4);
  for (int ranks : {1, 2, 3, 6}) {
    std::vector<int32_t> tokens, targets;
    for (int r = 0; r < ranks; r++) {
      Batch local;
      take_share(g, r, ranks, local);
      EXPECT_EQ(local.B, 6 / ranks);
      EXPECT_EQ(local.T, 4);
      EXPECT_TRUE(local.cu_seqlens.empty());
      tokens.insert(tokens.end(), local.tokens.begin(), local.tokens.end());
      targets.insert(targets.end(), local.targets.begin(), local.targets.end());
    }
    EXPECT_EQ(tokens, g.tokens);
    EXPECT_EQ(targets, g.targets);
  }
  Batch local;
  EXPECT_THROW(take_share(g, 0, 4, local), Error);
}

TEST(Dist, PackedSharesHoldWholeSequences) {
  // Sequences of 5, 1, 9, 3, 6 tokens packed back to back.
  Batch g;
  g.cu_seqlens = {0, 5, 6, 15, 18, 24};
  g.resize(24);
  g.B = 1;
  g.T = 24;
  for (int i = 0; i < 24; i++) {
    g.tokens[size_t(i)] = i;
    g.targets[size_t(i)] = i + 100;
    g.pos[size_t(i)] = 0;
  }
  for (int ranks : {1, 2, 3, 5, 8}) {
    std::vector<int32_t> tokens;
    int seqs = 0;
    for (int r = 0; r < ranks; r++) {
      Batch local;
      take_share(g, r, ranks, local);
      EXPECT_EQ(local.n_tokens, int64_t(local.tokens.size()));
      ASSERT_FALSE(local.cu_seqlens.empty());
      EXPECT_EQ(local.cu_seqlens.front(), 0);
      EXPECT_EQ(local.cu_seqlens.back(), local.n_tokens);
      // Every local sequence is one of the global ones (same length, same first token).
      for (size_t s = 0; s + 1 < local.cu_seqlens.size(); s++) {
        const int32_t first = local.tokens[size_t(local.cu_seqlens[s])];
        const auto it = std::find(g.cu_seqlens.begin(), g.cu_seqlens.end(), first);
        ASSERT_NE(it, g.cu_seqlens.end()) << "rank " << r << " sequence " << s << " starts mid-sequence";
        EXPECT_EQ(*(it + 1) - *it, local.cu_seqlens[s + 1] - local.cu_seqlens[s]);
        seqs++;
      }
      tokens.insert(tokens.end(), local.tokens.begin(), local.tokens.end());
    }
    EXPECT_EQ(tokens, g.tokens) << ranks << " ranks";
    EXPECT_EQ(seqs, 5);
  }
}

TEST(Dist, ShardedAdamWUpdatesLikeTheWholeBlock) {
  ParamTable t;
  t.add("a.weight", "a.weight", Shape{7, 5});
  t.add("a.bias", "a.bias", Shape{5});
  t.add("b.weight", "b.weight", Shape{3, 11});
  t.specs[0].decay = t.specs[2].decay = true;
  const size_t n = t.total;
  auto be = nn::make_cpu_backend();
  AdamWConfig cfg;
  cfg.weight_decay = 0.1f;
  std::vector<float> p_full = test::randn(n, 1), g = test::randn(n, 2);
  std::vector<float> p_shard = p_full;
  AdamW full(t, cfg, be.get());
  // Cut in the middle of a tensor (the update is elementwise).
  const std::vector<size_t> counts = {23, n - 23};
  std::vector<std::unique_ptr<AdamW>> parts;
  for (int r = 0; r < 2; r++) {
    const size_t lo = dist::segment_offset(counts, r);
    parts.push_back(std::make_unique<AdamW>(t, cfg, be.get(), AdamWShard{lo, lo + counts[size_t(r)]}));
    EXPECT_EQ(parts.back()->shard_floats(), counts[size_t(r)]);
  }
  for (int64_t step = 1; step <= 3; step++) {
    std::vector<float> g1 = g, g2 = g;
    full.update(ParamBlocks{p_full.data(), g1.data(), nullptr, n, be.get()}, 1e-2f, step, 2.0, 1.0f);
    for (auto& part : parts)
      part->update(ParamBlocks{p_shard.data(), g2.data(), nullptr, n, be.get()}, 1e-2f, step, 2.0, 1.0f);
  }
  // Not bit for bit: a tensor cut mid-way puts some of its floats in the kernel's scalar tail instead of its
  // vector body (fused multiply-adds round once).
  EXPECT_TRUE(test::all_close(p_shard, p_full, 1e-6, 1e-7));
  for (int r = 0; r < 2; r++) {
    const size_t lo = dist::segment_offset(counts, r);
    EXPECT_TRUE(test::all_close(parts[size_t(r)]->m(), full.m() + lo, counts[size_t(r)], 1e-6, 1e-9));
    EXPECT_TRUE(test::all_close(parts[size_t(r)]->v(), full.v() + lo, counts[size_t(r)], 1e-6, 1e-12));
  }
}

TEST(Dist, SingleProcessAgreementThrowsTheMessage) {
  auto comm = dist::make_single_communicator();
  EXPECT_NO_THROW(dist::agree_on_error(*comm, ""));
  try {
    dist::agree_on_error(*comm, "data.bin: cannot open");
    FAIL() << "no error";
  } catch (const dist::AgreedError& e) {
    EXPECT_STREQ(e.what(), "data.bin: cannot open");
  }
  std::vector<float> x = {1, 2, 3};
  comm->all_reduce_sum(x.data(), x.size());
  comm->reduce_scatter_sum(x.data(), {3});
  comm->all_gather(x.data(), {3});
  EXPECT_EQ(x, (std::vector<float>{1, 2, 3}));
}

}  // namespace
}  // namespace kiln
