// Data-parallel training: which share of a global micro-batch a rank trains on, and the gradient reduction
// and optimizer step of ZeRO stages 0-3 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
// Trillion Parameter Models"), over a dist::Communicator.
//
// Batches. --batch is global: every rank reads the same global micro-batch (the loaders are cheap views of
// mmapped shards, and one loader state serves any number of ranks, so --resume works with a different N)
// and trains on its share of it (take_share). The loss is normalised by the global count of targets, so the
// gradients summed over the ranks are the single-process gradients, and a run's loss curve does not depend
// on N beyond the order of floating-point sums.
//
// Stages (the flat parameter block is cut into one segment per rank, dist::segment_counts):
//   0: gradients all-reduced in buckets; every rank runs the whole AdamW update.
//   1: gradients reduce-scattered: a rank owns its segment's summed gradient and its optimizer state (AdamW
//      moments for that segment only), updates its parameter segment, and the parameters are all-gathered.
//   2: the model keeps gradients for its segment only (ModelOptions::shard, models/model.h ShardExchange): each
//      unit's gradient (a layer; the embeddings; the final norm and head) is produced in a working buffer,
//      reduce-scattered as soon as the backward finishes it and added into the segment, so the whole
//      gradient block never exists. Parameters are whole and all-gathered after the update as at stage 1.
//   3: as 2, and the model keeps parameters for its segment only: each unit's parameters are all-gathered into
//      a working buffer just before its forward and again before its backward (two alternating layer
//      buffers: the next layer's gather is started before the current one computes), the embeddings and head
//      for the whole forward and backward. AdamW updates the segment; nothing is gathered after it.
// Stages 2 and 3 sum a micro-batch's gradient over the ranks before adding it to the step's running sum (the
// single process adds each micro-batch inside the products): the losses then differ from one process's in the
// order of floating-point sums only.
//
// Overlap. With host buffers and more than one rank, the collectives run on a communication thread: at stages
// 0 and 1 the model reports each layer's gradients complete (Model::set_layer_grads_hook) and the thread
// all-reduces (0) or reduce-scatters (1) that layer's range while the backward goes on (the embeddings, final
// norm and head follow when backward() returns), in the step's last micro-batch; at stages 2 and 3 the thread
// runs the exchange's reductions and gathers while the model computes, and the model waits for one only when it
// needs its result or its buffer. It is on when each rank has a spare core for that thread (local ranks x
// (threads + 1) <= cores); KILN_DIST_OVERLAP=1 or 0 forces it. Without it each collective runs when it is
// asked for (stages 2, 3), or after the backward in buckets of KILN_DIST_BUCKET_MB (25 by default; 0, 1).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "models/model.h"
#include "train/batch.h"
#include "train/optimizer.h"

namespace kiln {

// This rank's share of a global micro-batch: rows [r·B/N, (r+1)·B/N) of fixed rows (B divisible by N), or a
// contiguous run of whole sequences of a packed batch, cut where the running token count passes r·n/N (a
// rank may get none: local.n_tokens == 0).
void take_share(const Batch& global, int rank, int ranks, Batch& local);

class DataParallel {
 public:
  // grads: the communicator of the gradient and parameter buffers (NCCL for device models), host: the one
  // for scalars (MPI); the same for CPU ranks.
  DataParallel(dist::Communicator& host, dist::Communicator& grads, Model& model, const AdamWConfig& cfg,
               int zero_stage);
  ~DataParallel();

  int stage() const { return stage_; }
  AdamW& optimizer() { return *adam_; }

  // Before each micro-batch's forward, on every rank (also one that has no tokens in it): `last` when it is the
  // step's last.
  void begin_micro(bool last);
  // After each micro-batch's backward, on every rank (stages 2, 3: waits for the exchange; with overlap, waits for
  // the communication thread).
  void after_backward();
  // After the step's last backward: the gradients are summed over the ranks (stage 0: everywhere; 1-3: in
  // this rank's segment).
  void reduce_gradients();
  // Global norm of the summed gradients · unscale (inf or NaN on every rank if any rank overflowed).
  double grad_norm(float unscale);
  // One AdamW step on the summed gradients (this rank's segment at stages 1-3, then all-gathered at 1, 2); clears
  // the gradients.
  void update(float lr, int64_t t, double norm, float unscale);
  // A skipped step: clears the gradients.
  void skip();

  // Checkpoints in the single-process format. gather_optimizer (collective) fills `full`'s host moments on
  // rank 0 (a whole-block host AdamW; only rank 0 needs one, the others pass null): the segments come to rank 0
  // one by one. scatter_optimizer takes this rank's part of a whole-block one.
  void gather_optimizer(AdamW* full);
  void scatter_optimizer(AdamW& full);
  // Stage 3 (collective): the model's whole-block host copy of the parameters filled on rank 0 from the
  // segments, one at a time (a checkpoint's weights); drop it after with Model::drop_host_params().
  void gather_host_params();

  // The model options of a rank's model at this stage: its segment at stages 2 and 3.
  static ShardOptions shard_options(const ParamTable& table, int stage, int rank, int ranks);

  // Seconds spent in the gradient and parameter collectives since the last call (waiting for the slowest
  // rank included), and the part of them the step waited for (the rest was hidden behind the backward).
  // overlapped: the part of total run by the communication thread during the backward, overlap_wait: how long
  // the step waited for it after the backward (so 1 - overlap_wait / overlapped of it was hidden).
  struct CommTime {
    double total = 0, exposed = 0, overlapped = 0, overlap_wait = 0;
  };
  CommTime take_comm_seconds();
  bool overlapping() const { return stream_ != nullptr; }

  // Bytes of optimizer state this rank holds (AdamW moments: all, or its segment's).
  size_t optimizer_bytes() const;

 private:
  dist::Communicator &host_, &grads_comm_;
  Model& model_;
  int stage_;
  std::vector<size_t> counts_;  // segment of each rank, in floats
  size_t lo_ = 0, hi_ = 0;      // this rank's segment
  size_t n_ = 0;                // floats in the whole block
  std::unique_ptr<AdamW> adam_;
  CommTime comm_;
  // Overlap: the float range of each layer's tensors, the ranges outside every layer, the thread.
  std::vector<std::pair<size_t, size_t>> layer_range_, rest_ranges_;
  class Stream;
  std::unique_ptr<Stream> stream_;
  // Stages 2 and 3: the model's units and the exchange it calls.
  std::vector<std::pair<size_t, size_t>> units_;
  class Exchange;
  std::unique_ptr<Exchange> exchange_;
  bool armed_ = false, reduced_ = false;
  int next_layer_ = 0;  // layers below this one are not yet queued (descending)

  void reduce_range(size_t begin, size_t end);  // stage 0: all-reduce; 1: reduce-scatter of the range
  bool find_layer_ranges();
  void gather_params();
  // Every rank's part of [begin, end), in rank order (the segments are).
  std::vector<size_t> part_counts(size_t begin, size_t end) const;
  void fetch_unit(int unit, float* dst);   // stage 3: the unit's parameters all-gathered into dst
  void reduce_unit(int unit, float* src);  // 2, 3: the unit's gradient reduce-scattered and added into the segment
};

}  // namespace kiln
