#include "train/data_parallel.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <cmath>
#include <cstdlib>

#include <omp.h>
#include <unistd.h>

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

// The communication thread of the overlap: reduces queued float ranges in order, one collective at a time
// (the main thread calls no collective until drain() returns, as MPI_THREAD_SERIALIZED asks).
class DataParallel::Stream {
 public:
  explicit Stream(std::function<void(size_t, size_t)> reduce) : reduce_(std::move(reduce)), th_([this] { run(); }) {}
  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    th_.join();
  }
  void push(size_t begin, size_t end) {
    if (begin >= end) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace_back(begin, end);
      pending_++;
    }
    cv_.notify_all();
  }
  // Waits for every queued range; returns the seconds spent in the collectives since the last drain.
  double drain() {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return pending_ == 0; });
    KILN_CHECK(error_.empty(), error_);
    const double s = busy_;
    busy_ = 0;
    return s;
  }

 private:
  std::function<void(size_t, size_t)> reduce_;
  std::mutex mu_;
  std::condition_variable cv_, done_;
  std::deque<std::pair<size_t, size_t>> queue_;
  int pending_ = 0;
  bool stop_ = false;
  double busy_ = 0;
  std::string error_;
  std::thread th_;

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      const auto [begin, end] = queue_.front();
      queue_.pop_front();
      lock.unlock();
      const auto t0 = Clock::now();
      std::string err;
      try {
        reduce_(begin, end);
      } catch (const std::exception& e) {
        err = e.what();
      }
      const double secs = seconds_since(t0);
      lock.lock();
      busy_ += secs;
      if (!err.empty() && error_.empty()) error_ = err;
      if (--pending_ == 0) done_.notify_all();
    }
  }
};

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
  // Overlap by default only with a core to spare for each rank's communication thread: on a machine whose
  // cores the ranks' compute threads already fill, that thread only takes time from the backward (measured
  // slower on 2 ranks x 1 thread on 2 cores).
  const char* env = std::getenv("KILN_DIST_OVERLAP");
  const bool spare = host.local_size() * (omp_get_max_threads() + 1) <= int(sysconf(_SC_NPROCESSORS_ONLN));
  const bool want = env ? std::string(env) != "0" : spare;
  if (want && host.size() > 1 && !grads.device_buffers() && grads.thread_serialized() && find_layer_ranges()) {
    stream_ = std::make_unique<Stream>([this](size_t a, size_t e) { reduce_range(a, e); });
    model.set_layer_grads_hook([this](int l) {
      if (!armed_ || l != next_layer_ - 1) return;  // layers come in descending order
      next_layer_ = l;
      stream_->push(layer_range_[size_t(l)].first, layer_range_[size_t(l)].second);
    });
  }
}

DataParallel::~DataParallel() {
  if (stream_) model_.set_layer_grads_hook(nullptr);
}

size_t DataParallel::optimizer_bytes() const { return adam_->shard_floats() * 2 * sizeof(float); }

// Each layer's tensors ("blk.N." keys) as one float range; false (no overlap) unless the ranges are disjoint
// and no other tensor lies inside one.
bool DataParallel::find_layer_ranges() {
  const ParamTable& t = model_.table();
  const int L = model_.config().n_layer;
  layer_range_.assign(size_t(L), {SIZE_MAX, 0});
  for (const ParamSpec& s : t.specs) {
    int l = -1;
    if (std::sscanf(s.key.c_str(), "blk.%d.", &l) != 1 || l < 0 || l >= L) continue;
    auto& r = layer_range_[size_t(l)];
    r.first = std::min(r.first, s.offset);
    r.second = std::max(r.second, s.offset + size_t(s.numel()));
  }
  std::vector<std::pair<size_t, size_t>> sorted = layer_range_;
  for (auto& r : sorted)
    if (r.first > r.second) return false;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); i++)
    if (sorted[i].first < sorted[i - 1].second) return false;
  for (const ParamSpec& s : t.specs) {
    int l = -1;
    if (std::sscanf(s.key.c_str(), "blk.%d.", &l) == 1 && l >= 0 && l < L) continue;
    for (const auto& r : sorted)
      if (s.offset < r.second && s.offset + size_t(s.numel()) > r.first) return false;
  }
  // The rest of the block, between and around the layers (padding included: it is zero everywhere).
  rest_ranges_.clear();
  size_t at = 0;
  for (const auto& r : sorted) {
    if (r.first > at) rest_ranges_.emplace_back(at, r.first);
    at = r.second;
  }
  if (at < t.total) rest_ranges_.emplace_back(at, t.total);
  return true;
}

void DataParallel::reduce_range(size_t begin, size_t end) {
  float* g = model_.blocks().grads;
  if (stage_ == 0) {
    const size_t bucket = bucket_floats();
    for (size_t at = begin; at < end; at += bucket) grads_comm_.all_reduce_sum(g + at, std::min(bucket, end - at));
    return;
  }
  // The range's part of every rank's segment (segments are in rank order, so the parts are too).
  std::vector<size_t> counts(counts_.size());
  size_t seg = 0;
  for (size_t r = 0; r < counts_.size(); r++) {
    const size_t a = std::max(begin, seg), e = std::min(end, seg + counts_[r]);
    counts[r] = e > a ? e - a : 0;
    seg += counts_[r];
  }
  grads_comm_.reduce_scatter_sum(g + begin, counts);
}

void DataParallel::begin_micro(bool last) {
  if (!stream_) return;
  armed_ = stage_ == 2 || last;
  next_layer_ = model_.config().n_layer;
}

void DataParallel::after_backward() {
  if (host_.size() == 1) return;
  if (armed_) {
    // Layers the backward did not report (a rank with no tokens in this micro-batch runs no backward), in the
    // same descending order as every other rank, then the rest of the block; then wait for the thread.
    for (int l = next_layer_ - 1; l >= 0; l--) stream_->push(layer_range_[size_t(l)].first, layer_range_[size_t(l)].second);
    for (const auto& r : rest_ranges_) stream_->push(r.first, r.second);
    const auto t0 = Clock::now();
    const double busy = stream_->drain(), waited = seconds_since(t0);
    comm_.total += busy;
    comm_.exposed += waited;
    comm_.overlapped += busy;
    comm_.overlap_wait += waited;
    armed_ = false;
    reduced_ = true;
  } else if (stage_ == 2) {
    // Stage 2 without overlap: the whole block reduce-scattered now.
    const auto t0 = Clock::now();
    grads_comm_.reduce_scatter_sum(model_.blocks().grads, counts_);
    const double secs = seconds_since(t0);
    comm_.total += secs;
    comm_.exposed += secs;
  } else {
    return;
  }
  // Stage 2: this micro-batch's gradients are now summed into the owners' segments; the other segments are
  // cleared. The next backward adds its gradients onto both, so the next reduce-scatter sums the owner's
  // running total with every rank's new contribution: the segment accumulates without a second buffer.
  if (stage_ == 2) clear_others();
}

void DataParallel::clear_others() {
  const ParamBlocks b = model_.blocks();
  b.backend->memset(b.grads, 0, lo_ * sizeof(float));
  b.backend->memset(b.grads + hi_, 0, (b.n - hi_) * sizeof(float));
}

void DataParallel::reduce_gradients() {
  if (host_.size() == 1) return;
  const bool done = reduced_ || stage_ == 2;  // reduced during (or after) the last backward
  reduced_ = false;
  if (done) return;
  const auto t0 = Clock::now();
  reduce_range(0, model_.blocks().n);
  const double secs = seconds_since(t0);
  comm_.total += secs;
  comm_.exposed += secs;
}

double DataParallel::grad_norm(float unscale) {
  if (host_.size() == 1 || stage_ == 0) return adam_->grad_norm(model_.blocks(), unscale);
  // The segments' squared norms, summed over the ranks (an inf or NaN anywhere reaches every rank).
  const ParamBlocks b = model_.blocks();
  double sq = hi_ > lo_ ? b.backend->sum_squares(b.grads + lo_, int64_t(hi_ - lo_)) : 0.0;
  const auto t0 = Clock::now();
  host_.all_reduce_sum(&sq, 1);
  comm_.total += seconds_since(t0);
  comm_.exposed += seconds_since(t0);
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

DataParallel::CommTime DataParallel::take_comm_seconds() {
  const CommTime c = comm_;
  comm_ = {};
  return c;
}

void DataParallel::gather_params() {
  const ParamBlocks b = model_.blocks();
  const auto t0 = Clock::now();
  grads_comm_.all_gather(b.params, counts_);
  const double secs = seconds_since(t0);
  comm_.total += secs;
  comm_.exposed += secs;
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
