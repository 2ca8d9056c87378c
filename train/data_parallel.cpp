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
#include <cstring>

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

// The communication thread of the overlap: runs queued collectives in order, one at a time (the main thread
// calls no collective of its own until drain() returns, as MPI_THREAD_SERIALIZED asks). Each task gets a
// ticket; wait(ticket) returns once that task (and every earlier one) is done.
class DataParallel::Stream {
 public:
  Stream() : th_([this] { run(); }) {}
  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    th_.join();
  }
  uint64_t push(std::function<void()> task) {
    uint64_t t;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
      t = ++pushed_;
    }
    cv_.notify_all();
    return t;
  }
  void wait(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_ >= ticket; });
    KILN_CHECK(error_.empty(), error_);
  }
  // Waits for every queued task; returns the seconds spent in them since the last drain.
  double drain() {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_ == pushed_; });
    KILN_CHECK(error_.empty(), error_);
    const double s = busy_;
    busy_ = 0;
    return s;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_, done_;
  std::deque<std::function<void()>> queue_;
  uint64_t pushed_ = 0, finished_ = 0;
  bool stop_ = false;
  double busy_ = 0;
  std::string error_;
  std::thread th_;

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      const auto t0 = Clock::now();
      std::string err;
      try {
        task();
      } catch (const std::exception& e) {
        err = e.what();
      }
      const double secs = seconds_since(t0);
      lock.lock();
      busy_ += secs;
      if (!err.empty() && error_.empty()) error_ = err;
      finished_++;
      done_.notify_all();
    }
  }
};

// What a sharded model (stages 2, 3) calls: each fetch and reduce on the communication thread when there is
// one (waits then block on its ticket), else at once.
class DataParallel::Exchange final : public ShardExchange {
 public:
  explicit Exchange(DataParallel& dp) : dp_(dp), fetch_(dp.units_.size(), 0), reduce_(dp.units_.size(), 0) {}
  void fetch(int u, float* dst) override {
    run(fetch_[size_t(u)], [this, u, dst] { dp_.fetch_unit(u, dst); });
  }
  void wait_fetch(int u) override { wait(fetch_[size_t(u)]); }
  void reduce(int u, float* src) override {
    run(reduce_[size_t(u)], [this, u, src] { dp_.reduce_unit(u, src); });
  }
  void wait_reduce(int u) override { wait(reduce_[size_t(u)]); }

 private:
  DataParallel& dp_;
  std::vector<uint64_t> fetch_, reduce_;  // each unit's last ticket

  void run(uint64_t& ticket, std::function<void()> task) {
    if (dp_.stream_) {
      ticket = dp_.stream_->push(std::move(task));
      return;
    }
    const auto t0 = Clock::now();
    task();
    const double secs = seconds_since(t0);
    dp_.comm_.total += secs;
    dp_.comm_.exposed += secs;
  }
  void wait(uint64_t ticket) {
    if (!dp_.stream_ || ticket == 0) return;
    const auto t0 = Clock::now();
    dp_.stream_->wait(ticket);
    const double waited = seconds_since(t0);
    dp_.comm_.exposed += waited;
    dp_.comm_.overlap_wait += waited;
  }
};

ShardOptions DataParallel::shard_options(const ParamTable& table, int stage, int rank, int ranks) {
  ShardOptions o;
  if (stage < 2) return o;
  const std::vector<size_t> counts = dist::segment_counts(table.total, ranks);
  o.stage = stage;
  o.begin = dist::segment_offset(counts, rank);
  o.end = o.begin + counts[size_t(rank)];
  return o;
}

DataParallel::DataParallel(dist::Communicator& host, dist::Communicator& grads, Model& model, const AdamWConfig& cfg,
                           int zero_stage)
    : host_(host), grads_comm_(grads), model_(model), stage_(zero_stage) {
  KILN_CHECK(stage_ >= 0 && stage_ <= 3, "--zero-stage ", stage_, ": stages 0, 1, 2 and 3 are implemented");
  const ParamBlocks b = model.blocks();
  n_ = model.table().total;
  counts_ = dist::segment_counts(n_, host.size());
  lo_ = dist::segment_offset(counts_, host.rank());
  hi_ = lo_ + counts_[size_t(host.rank())];
  if (stage_ >= 2) {
    units_ = model.units();
    KILN_CHECK(!units_.empty() && b.offset == lo_ && b.n == hi_ - lo_, "--zero-stage ", stage_,
               ": the model was not built with this rank's segment (ModelOptions::shard)");
  }
  AdamWShard shard;
  if (stage_ >= 1) shard = {lo_, hi_};
  adam_ = std::make_unique<AdamW>(model.table(), cfg, b.backend, shard);
  // Overlap by default only with a core to spare for each rank's communication thread: on a machine whose
  // cores the ranks' compute threads already fill, that thread only takes time from the backward (measured
  // slower on 2 ranks x 1 thread on 2 cores).
  const char* env = std::getenv("KILN_DIST_OVERLAP");
  const bool spare = host.local_size() * (omp_get_max_threads() + 1) <= int(sysconf(_SC_NPROCESSORS_ONLN));
  const bool want = env ? std::string(env) != "0" : spare;
  const bool can = want && host.size() > 1 && !grads.device_buffers() && grads.thread_serialized();
  if (stage_ >= 2) {
    if (can) stream_ = std::make_unique<Stream>();
    exchange_ = std::make_unique<Exchange>(*this);
    model.set_shard_exchange(exchange_.get());
  } else if (can && find_layer_ranges()) {
    stream_ = std::make_unique<Stream>();
    model.set_layer_grads_hook([this](int l) {
      if (!armed_ || l != next_layer_ - 1) return;  // layers come in descending order
      next_layer_ = l;
      const auto [a, e] = layer_range_[size_t(l)];
      stream_->push([this, a, e] { reduce_range(a, e); });
    });
  }
}

DataParallel::~DataParallel() {
  if (stream_ && stage_ < 2) model_.set_layer_grads_hook(nullptr);
  if (exchange_) model_.set_shard_exchange(nullptr);
  stream_.reset();  // the thread ends before the exchange it may be running for
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

std::vector<size_t> DataParallel::part_counts(size_t begin, size_t end) const {
  std::vector<size_t> counts(counts_.size());
  size_t seg = 0;
  for (size_t r = 0; r < counts_.size(); r++) {
    const size_t a = std::max(begin, seg), e = std::min(end, seg + counts_[r]);
    counts[r] = e > a ? e - a : 0;
    seg += counts_[r];
  }
  return counts;
}

void DataParallel::reduce_range(size_t begin, size_t end) {
  float* g = model_.blocks().grads;
  if (stage_ == 0) {
    const size_t bucket = bucket_floats();
    for (size_t at = begin; at < end; at += bucket) grads_comm_.all_reduce_sum(g + at, std::min(bucket, end - at));
    return;
  }
  // The range's part of every rank's segment (segments are in rank order, so the parts are too).
  grads_comm_.reduce_scatter_sum(g + begin, part_counts(begin, end));
}

void DataParallel::fetch_unit(int u, float* dst) {
  const auto [ub, ue] = units_[size_t(u)];
  const ParamBlocks b = model_.blocks();
  // This rank's part into place, then every part to every rank (in place).
  const size_t a = std::max(ub, lo_), e = std::min(ue, hi_);
  if (a < e) {
    if (b.backend->on_host())
      std::memcpy(dst + (a - ub), b.params + (a - lo_), (e - a) * sizeof(float));
    else
      b.backend->copy_rows(nn::Act{dst + (a - ub)}, int64_t(e - a), nn::Act{b.params + (a - lo_)}, int64_t(e - a), 1,
                           int64_t(e - a));
  }
  grads_comm_.all_gather(dst, part_counts(ub, ue));
}

void DataParallel::reduce_unit(int u, float* src) {
  const auto [ub, ue] = units_[size_t(u)];
  const ParamBlocks b = model_.blocks();
  grads_comm_.reduce_scatter_sum(src, part_counts(ub, ue));
  // This micro-batch's sum over the ranks of this rank's part, added to the step's.
  const size_t a = std::max(ub, lo_), e = std::min(ue, hi_);
  if (a < e) b.backend->add(b.grads + (a - lo_), b.grads + (a - lo_), src + (a - ub), int64_t(e - a));
}

void DataParallel::begin_micro(bool last) {
  if (!stream_ || stage_ >= 2) return;
  armed_ = last;
  next_layer_ = model_.config().n_layer;
}

void DataParallel::after_backward() {
  if (stage_ >= 2) {
    // Every unit's reduction done (the model asked for them during the backward).
    if (!stream_) return;
    const auto t0 = Clock::now();
    const double busy = stream_->drain(), waited = seconds_since(t0);
    comm_.total += busy;
    comm_.exposed += waited;
    comm_.overlapped += busy;
    comm_.overlap_wait += waited;
    return;
  }
  if (host_.size() == 1 || !armed_) return;
  // Layers the backward did not report (a rank with no tokens in this micro-batch runs no backward), in the
  // same descending order as every other rank, then the rest of the block; then wait for the thread.
  for (int l = next_layer_ - 1; l >= 0; l--) {
    const auto [a, e] = layer_range_[size_t(l)];
    stream_->push([this, a, e] { reduce_range(a, e); });
  }
  for (const auto& [a, e] : rest_ranges_) stream_->push([this, a = a, e = e] { reduce_range(a, e); });
  const auto t0 = Clock::now();
  const double busy = stream_->drain(), waited = seconds_since(t0);
  comm_.total += busy;
  comm_.exposed += waited;
  comm_.overlapped += busy;
  comm_.overlap_wait += waited;
  armed_ = false;
  reduced_ = true;
}

void DataParallel::reduce_gradients() {
  if (host_.size() == 1 || stage_ >= 2) return;  // 2, 3: reduced unit by unit in every backward
  const bool done = reduced_;  // reduced during the last backward
  reduced_ = false;
  if (done) return;
  const auto t0 = Clock::now();
  reduce_range(0, n_);
  const double secs = seconds_since(t0);
  comm_.total += secs;
  comm_.exposed += secs;
}

double DataParallel::grad_norm(float unscale) {
  if (host_.size() == 1 && stage_ < 2) return adam_->grad_norm(model_.blocks(), unscale);
  if (stage_ == 0) return adam_->grad_norm(model_.blocks(), unscale);
  // The segments' squared norms, summed over the ranks (an inf or NaN anywhere reaches every rank).
  const ParamBlocks b = model_.blocks();
  const float* g = b.grads + (lo_ - b.offset);
  double sq = hi_ > lo_ ? b.backend->sum_squares(g, int64_t(hi_ - lo_)) : 0.0;
  const auto t0 = Clock::now();
  host_.all_reduce_sum(&sq, 1);
  comm_.total += seconds_since(t0);
  comm_.exposed += seconds_since(t0);
  return std::sqrt(sq) * double(unscale);
}

void DataParallel::update(float lr, int64_t t, double norm, float unscale) {
  const ParamBlocks b = model_.blocks();
  adam_->update(b, lr, t, norm, unscale, /*zero_grads=*/true);
  if (stage_ >= 1 && stage_ <= 2 && host_.size() > 1) {
    if (stage_ == 1) {
      // The update cleared only this rank's segment of the whole gradient block.
      b.backend->memset(b.grads, 0, lo_ * sizeof(float));
      b.backend->memset(b.grads + hi_, 0, (b.n - hi_) * sizeof(float));
    }
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
  // Stage 1: the whole block; stage 2: blocks() is the segment of the model's whole parameter block.
  const ParamBlocks b = model_.blocks();
  float* params = b.params - b.offset;
  uint16_t* params16 = b.params16 ? b.params16 - b.offset : nullptr;
  const auto t0 = Clock::now();
  grads_comm_.all_gather(params, counts_);
  const double secs = seconds_since(t0);
  comm_.total += secs;
  comm_.exposed += secs;
  // The 16-bit copy the products read: refreshed from the gathered fp32 weights (the update wrote only this
  // rank's segment of it).
  if (params16) b.backend->to_lowp(params16, params, int64_t(n_), *b.backend->lowp());
}

void DataParallel::gather_host_params() {
  if (stage_ < 3) return;
  // Segment by segment to rank 0 (as gather_optimizer): only rank 0 makes the whole-block host copy.
  const bool root = host_.rank() == 0;
  float* full = nullptr;
  if (root) {
    model_.sync_to_host();  // its own segment
    full = model_.host_params();
  }
  std::vector<float> part;
  for (int r = 1; r < host_.size(); r++) {
    const size_t off = dist::segment_offset(counts_, r), cnt = counts_[size_t(r)];
    if (cnt == 0) continue;
    float* dst = full ? full + off : nullptr;
    if (!root) {
      part.resize(cnt);
      dst = part.data();
      if (r == host_.rank()) {
        const ParamBlocks b = model_.blocks();
        b.backend->download(dst, b.params, cnt * sizeof(float));
      }
    }
    host_.broadcast(dst, cnt * sizeof(float), r);
  }
}

void DataParallel::gather_optimizer(AdamW* full) {
  adam_->sync_to_host();
  const bool root = host_.rank() == 0;
  if (!adam_->sharded()) {
    if (root) {
      std::copy_n(adam_->m(), adam_->num_floats(), full->m());
      std::copy_n(adam_->v(), adam_->num_floats(), full->v());
    }
    return;
  }
  // Segment by segment: rank r broadcasts its moments and rank 0 keeps them, so no rank but 0 ever holds more
  // than its own part (a broadcast, not a point-to-point send: the communicator's collectives suffice).
  std::vector<float> part;
  for (int r = 0; r < host_.size(); r++) {
    const size_t off = dist::segment_offset(counts_, r), cnt = counts_[size_t(r)];
    if (cnt == 0) continue;
    for (int which = 0; which < 2; which++) {
      float* src = which == 0 ? adam_->m() : adam_->v();
      float* dst = nullptr;
      if (root) dst = (which == 0 ? full->m() : full->v()) + off;
      if (r == host_.rank()) {
        if (root) std::copy_n(src, cnt, dst);
        host_.broadcast(src, cnt * sizeof(float), r);
      } else if (root) {
        host_.broadcast(dst, cnt * sizeof(float), r);
      } else {
        part.resize(cnt);
        host_.broadcast(part.data(), cnt * sizeof(float), r);
      }
    }
  }
}

void DataParallel::scatter_optimizer(AdamW& full) {
  const size_t at = adam_->shard_begin();
  std::copy_n(full.m() + at, adam_->shard_floats(), adam_->m());
  std::copy_n(full.v() + at, adam_->shard_floats(), adam_->v());
  adam_->moments_changed();
}

}  // namespace kiln
