// The NCCL communicator: device buffers on one CUDA device per rank, the ranks of a bootstrap (MPI)
// communicator, the unique id broadcast over it. Linked into the CUDA build of `kiln` only (CMakeLists.txt);
// its make_nccl_communicator replaces the weak null one in dist/communicator.cpp.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>

#include "core/error.h"
#include "dist/communicator.h"

namespace kiln::dist {

namespace {

void check(ncclResult_t r, const char* what) {
  KILN_CHECK(r == ncclSuccess, "NCCL ", what, ": ", ncclGetErrorString(r));
}
void check(cudaError_t r, const char* what) {
  KILN_CHECK(r == cudaSuccess, "CUDA ", what, ": ", cudaGetErrorString(r));
}

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(Communicator& bootstrap, int device) : bootstrap_(bootstrap) {
    rank_ = bootstrap.rank();
    size_ = bootstrap.size();
    check(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id;
    if (rank_ == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    bootstrap.broadcast(&id, sizeof id, 0);
    check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~NcclCommunicator() override {
    ncclCommDestroy(comm_);
    cudaStreamDestroy(stream_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  int local_size() const override { return bootstrap_.local_size(); }
  int local_rank() const override { return bootstrap_.local_rank(); }
  bool device_buffers() const override { return true; }
  bool thread_serialized() const override { return false; }  // the device context belongs to the main thread

  // Every collective is synchronous towards the caller: the device's queued work first (the gradients were
  // written on the default stream), then the collective on our stream, then wait for it.
  void all_reduce_sum(float* data, size_t n) override {
    begin();
    check(ncclAllReduce(data, data, n, ncclFloat32, ncclSum, comm_, stream_), "ncclAllReduce");
    end();
  }
  void all_reduce_sum(double* data, size_t n) override {
    begin();
    check(ncclAllReduce(data, data, n, ncclFloat64, ncclSum, comm_, stream_), "ncclAllReduce");
    end();
  }
  // Uneven segments: one in-place reduce per segment to its owner, grouped into one launch.
  void reduce_scatter_sum(float* data, const std::vector<size_t>& counts) override {
    begin();
    check(ncclGroupStart(), "ncclGroupStart");
    size_t off = 0;
    for (int r = 0; r < size_; r++) {
      check(ncclReduce(data + off, data + off, counts[size_t(r)], ncclFloat32, ncclSum, r, comm_, stream_),
            "ncclReduce");
      off += counts[size_t(r)];
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
    end();
  }
  // Uneven segments: one broadcast per segment from its owner, grouped.
  void all_gather(float* data, const std::vector<size_t>& counts) override {
    begin();
    check(ncclGroupStart(), "ncclGroupStart");
    size_t off = 0;
    for (int r = 0; r < size_; r++) {
      check(ncclBroadcast(data + off, data + off, counts[size_t(r)], ncclFloat32, r, comm_, stream_),
            "ncclBroadcast");
      off += counts[size_t(r)];
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
    end();
  }
  void broadcast(void* data, size_t bytes, int root) override {
    begin();
    check(ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_), "ncclBroadcast");
    end();
  }
  void barrier() override { bootstrap_.barrier(); }
  [[noreturn]] void abort(int code) override {
    ncclCommAbort(comm_);
    bootstrap_.abort(code);
    std::_Exit(code);  // not reached: the bootstrap ends the job
  }

 private:
  Communicator& bootstrap_;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;

  void begin() { check(cudaDeviceSynchronize(), "synchronize before a collective"); }
  void end() { check(cudaStreamSynchronize(stream_), "collective"); }
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device) {
  return std::make_unique<NcclCommunicator>(bootstrap, device);
}

}  // namespace kiln::dist
