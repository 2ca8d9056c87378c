// The MPI communicator (OpenMPI): host buffers, MPI_COMM_WORLD. Compiled when CMake finds MPI.
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>

#include "core/error.h"
#include "dist/communicator.h"

namespace kiln::dist {

namespace {

// MPI counts are int: collectives over larger buffers go in pieces.
constexpr size_t kMaxCount = size_t(1) << 30;

class MpiCommunicator : public Communicator {
 public:
  MpiCommunicator() {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      // One thread at a time calls MPI: the main thread, or the gradient thread during the backward
      // (train/data_parallel.cpp); OpenMP threads only compute.
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided_);
      owns_ = true;
    } else {
      MPI_Query_thread(&provided_);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local);
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_rank(local, &local_rank_);
    MPI_Comm_free(&local);
  }
  ~MpiCommunicator() override {
    if (owns_) MPI_Finalize();
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  int local_size() const override { return local_size_; }
  int local_rank() const override { return local_rank_; }
  bool thread_serialized() const override { return provided_ >= MPI_THREAD_SERIALIZED; }

  void all_reduce_sum(float* data, size_t n) override { all_reduce(data, n, MPI_FLOAT); }
  void all_reduce_sum(double* data, size_t n) override { all_reduce(data, n, MPI_DOUBLE); }

  void reduce_scatter_sum(float* data, const std::vector<size_t>& counts) override {
    KILN_CHECK(int(counts.size()) == size_, "reduce_scatter: ", counts.size(), " segments for ", size_, " ranks");
    // One reduce per segment, in place at its owner: the standard's in-place form, no receive buffer.
    size_t off = 0;
    for (int r = 0; r < size_; r++) {
      const size_t n = counts[size_t(r)];
      for (size_t done = 0; done < n; done += kMaxCount) {
        const int c = int(std::min(kMaxCount, n - done));
        float* p = data + off + done;
        if (r == rank_)
          MPI_Reduce(MPI_IN_PLACE, p, c, MPI_FLOAT, MPI_SUM, r, MPI_COMM_WORLD);
        else
          MPI_Reduce(p, nullptr, c, MPI_FLOAT, MPI_SUM, r, MPI_COMM_WORLD);
      }
      off += n;
    }
  }

  void all_gather(float* data, const std::vector<size_t>& counts) override {
    KILN_CHECK(int(counts.size()) == size_, "all_gather: ", counts.size(), " segments for ", size_, " ranks");
    size_t total = 0;
    for (size_t c : counts) total += c;
    KILN_CHECK(total <= size_t(INT_MAX), "all_gather: ", total, " elements exceed MPI's int counts");
    std::vector<int> cnt(static_cast<size_t>(size_)), disp(static_cast<size_t>(size_));
    size_t off = 0;
    for (int r = 0; r < size_; r++) {
      cnt[size_t(r)] = int(counts[size_t(r)]);
      disp[size_t(r)] = int(off);
      off += counts[size_t(r)];
    }
    MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, cnt.data(), disp.data(), MPI_FLOAT, MPI_COMM_WORLD);
  }

  void broadcast(void* data, size_t bytes, int root) override {
    char* p = static_cast<char*>(data);
    for (size_t done = 0; done < bytes; done += kMaxCount)
      MPI_Bcast(p + done, int(std::min(kMaxCount, bytes - done)), MPI_BYTE, root, MPI_COMM_WORLD);
  }
  void barrier() override { MPI_Barrier(MPI_COMM_WORLD); }
  [[noreturn]] void abort(int code) override {
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  int rank_ = 0, size_ = 1, provided_ = 0, local_size_ = 1, local_rank_ = 0;
  bool owns_ = false;

  template <class T>
  void all_reduce(T* data, size_t n, MPI_Datatype type) {
    for (size_t done = 0; done < n; done += kMaxCount)
      MPI_Allreduce(MPI_IN_PLACE, data + done, int(std::min(kMaxCount, n - done)), type, MPI_SUM, MPI_COMM_WORLD);
  }
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

}  // namespace kiln::dist
