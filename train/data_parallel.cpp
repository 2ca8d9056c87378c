#include "train/data_parallel.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>

#include "core/error.h"

namespace kiln {

void take_share(const Batch& g, int rank, int ranks, Batch& local) {
  if (ranks == 1) {
    local = g;
    return;
  }
  if (g.cu_seqlens.empty()) {
    // Fixed rows (rows, padded): B/N rows each.
    KILN_CHECK(g.B % ranks == 0, "a micro-batch of ", g.B, " rows does not divide over ", ranks, " ranks");
    const int rows = g.B / ranks;
    const int64_t begin = int64_t(rank) * rows * g.T, n = int64_t(rows) * g.T;
    local.B = rows;
    local.T = g.T;
    local.resize(n);
    local.cu_seqlens.clear();
    std::copy_n(g.tokens.begin() + begin, n, local.tokens.begin());
    std::copy_n(g.targets.begin() + begin, n, local.targets.begin());
    std::copy_n(g.pos.begin() + begin, n, local.pos.begin());
    return;
  }
  // Packed: whole sequences; sequence s goes to the rank whose token range holds its first token.
  const int S = int(g.cu_seqlens.size()) - 1;
  const int64_t n = g.n_tokens;
  auto owner = [&](int s) { return int(int64_t(g.cu_seqlens[size_t(s)]) * ranks / std::max<int64_t>(n, 1)); };
  int first = 0;
  while (first < S && owner(first) < rank) first++;
  int last = first;
  while (last < S && owner(last) == rank) last++;
  const int64_t begin = first < S ? g.cu_seqlens[size_t(first)] : n;
  const int64_t end = last < S ? g.cu_seqlens[size_t(last)] : n;
  local.resize(end - begin);
  local.B = 1;
  local.T = int(end - begin);
  std::copy(g.tokens.begin() + begin, g.tokens.begin() + end, local.tokens.begin());
  std::copy(g.targets.begin() + begin, g.targets.begin() + end, local.targets.begin());
  std::copy(g.pos.begin() + begin, g.pos.begin() + end, local.pos.begin());
  local.cu_seqlens.clear();
  for (int s = first; s <= last && first < last; s++)
    local.cu_seqlens.push_back(int32_t((s < S ? g.cu_seqlens[size_t(s)] : n) - begin));
  if (local.cu_seqlens.empty()) local.cu_seqlens = {0};
}

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Buckets of the stage-0 all-reduce: bounded messages (the size DDP defaults to, 25 MB).
size_t bucket_floats() {
  const char* env = std::getenv("KILN_DIST_BUCKET_MB");
  const double mb = env ? std::atof(env) : 25.0;
  return std::max<size_t>(1024, size_t(mb * 1024 * 1024 / 4));
}

}  // namespace

DataParallel::DataParallel(dist::Communicator& host, dist::Communicator& grads, Model& model, const AdamWConfig& cfg,
                           int zero_stage)
    : host_(host), grads_comm_(grads), model_(model), stage_(zero_stage) {
  KILN_CHECK(stage_ >= 0 && stage_ <= 2, "--zero-stage ", stage_, ": stages 0, 1 and 2 are implemented");
  const ParamBlocks b = model.blocks();
  counts_ = dist::segment_counts(b.n, host.size());
  lo_ = dist::segment_offset(counts_, host.rank());
  hi_ = lo_ + counts_[size_t(host.rank())];
  AdamWShard shard;
  if (stage_ >= 1) shard = {lo_, hi_};
  adam_ = std::make_unique<AdamW>(model.table(), cfg, b.backend, shard);
}

DataParallel::~DataParallel() = default;

size_t DataParallel::optimizer_bytes() const { return adam_->shard_floats() * 2 * sizeof(float); }

void DataParallel::after_backward() {
  if (stage_ != 2 || host_.size() == 1) return;
  // Stage 2: this micro-batch's gradients are summed into the owners' segments now, and the other segments are
  // cleared. The next backward adds its gradients onto both, so the next reduce-scatter sums the owner's
  // running total with every rank's new contribution: the segment accumulates without a second buffer.
  const ParamBlocks b = model_.blocks();
  const auto t0 = Clock::now();
  grads_comm_.reduce_scatter_sum(b.grads, counts_);
  comm_seconds_ += seconds_since(t0);
  clear_others();
}

void DataParallel::clear_others() {
  const ParamBlocks b = model_.blocks();
  b.backend->memset(b.grads, 0, lo_ * sizeof(float));
  b.backend->memset(b.grads + hi_, 0, (b.n - hi_) * sizeof(float));
}

void DataParallel::reduce_gradients() {
  if (host_.size() == 1) return;
  const ParamBlocks b = model_.blocks();
  const auto t0 = Clock::now();
  if (stage_ == 0) {
    const size_t bucket = bucket_floats();
    for (size_t at = 0; at < b.n; at += bucket) grads_comm_.all_reduce_sum(b.grads + at, std::min(bucket, b.n - at));
  } else if (stage_ == 1) {
    grads_comm_.reduce_scatter_sum(b.grads, counts_);
  }
  // Stage 2: reduced by the last after_backward.
  comm_seconds_ += seconds_since(t0);
}

double DataParallel::grad_norm(float unscale) {
  if (host_.size() == 1 || stage_ == 0) return adam_->grad_norm(model_.blocks(), unscale);
  // The segments' squared norms, summed over the ranks (an inf or NaN anywhere reaches every rank).
  const ParamBlocks b = model_.blocks();
  double sq = hi_ > lo_ ? b.backend->sum_squares(b.grads + lo_, int64_t(hi_ - lo_)) : 0.0;
  const auto t0 = Clock::now();
  host_.all_reduce_sum(&sq, 1);
  comm_seconds_ += seconds_since(t0);
  return std::sqrt(sq) * double(unscale);
}

void DataParallel::update(float lr, int64_t t, double norm, float unscale) {
  const ParamBlocks b = model_.blocks();
  adam_->update(b, lr, t, norm, unscale, /*zero_grads=*/true);
  if (stage_ >= 1 && host_.size() > 1) {
    clear_others();  // the update cleared only this rank's segment of the gradients
    gather_params();
  }
}

void DataParallel::skip() { model_.zero_grad(); }

double DataParallel::take_comm_seconds() {
  const double s = comm_seconds_;
  comm_seconds_ = 0;
  return s;
}

void DataParallel::gather_params() {
  const ParamBlocks b = model_.blocks();
  const auto t0 = Clock::now();
  grads_comm_.all_gather(b.params, counts_);
  comm_seconds_ += seconds_since(t0);
  // The 16-bit copy the products read: refreshed from the gathered fp32 weights (the update wrote only this
  // rank's segment of it).
  if (b.params16) b.backend->to_lowp(b.params16, b.params, int64_t(b.n), *b.backend->lowp());
}

void DataParallel::gather_optimizer(AdamW& full) {
  adam_->sync_to_host();
  if (!adam_->sharded()) {
    if (host_.rank() == 0) {
      std::copy_n(adam_->m(), adam_->num_floats(), full.m());
      std::copy_n(adam_->v(), adam_->num_floats(), full.v());
    }
    return;
  }
  // Each rank's moments into its segment of a whole-block buffer, all-gathered over the host communicator
  // (rank 0 keeps the result; the others' copies are dropped with `full`).
  for (int which = 0; which < 2; which++) {
    float* dst = which == 0 ? full.m() : full.v();
    const float* src = which == 0 ? adam_->m() : adam_->v();
    std::copy_n(src, hi_ - lo_, dst + lo_);
    host_.all_gather(dst, counts_);
  }
}

void DataParallel::scatter_optimizer(AdamW& full) {
  const size_t at = adam_->shard_begin();
  std::copy_n(full.m() + at, adam_->shard_floats(), adam_->m());
  std::copy_n(full.v() + at, adam_->shard_floats(), adam_->v());
  adam_->moments_changed();
}

}  // namespace kiln
