// Collective communication between the ranks of a data-parallel job, on the existing engines: MPI
// (OpenMPI, CPU ranks; dist/mpi/) and NCCL (GPU ranks, bootstrapped over MPI; dist/nccl/), with a
// single-process default where every collective is the identity. dist/ sits below train/: the trainer
// sees only this interface.
//
// Segments. reduce_scatter and all_gather split a buffer of sum(counts) elements into one segment per
// rank, rank r's at offset counts[0] + ... + counts[r-1] (uneven counts allowed: a parameter block is
// rarely divisible by the ranks). Both work in place, so ZeRO needs no second gradient or parameter buffer.
//
// Failures. A collective either completes on every rank or ends the job: MPI's default error handler
// aborts, and mpirun ends every rank when one dies. Errors a rank finds itself (its data, a bad flag) are
// agreed on with agree_on_error() so every rank stops together with one message.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"

namespace kiln::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "single", "mpi", "nccl"
  // Ranks on this rank's machine (sharing its cores, memory and GPUs), and this rank's place among them.
  virtual int local_size() const { return size(); }
  virtual int local_rank() const { return rank(); }
  // True when buffers are device memory (NCCL), false for host memory.
  virtual bool device_buffers() const { return false; }
  // True when collectives may be called from another thread than the one that made the communicator (one
  // thread at a time): a communication thread may reduce gradients during the backward.
  virtual bool thread_serialized() const { return true; }

  // In-place sum over the ranks.
  virtual void all_reduce_sum(float* data, size_t n) = 0;
  virtual void all_reduce_sum(double* data, size_t n) = 0;
  // In place: on return this rank's segment holds the sum over the ranks of that segment; the other
  // segments are left undefined.
  virtual void reduce_scatter_sum(float* data, const std::vector<size_t>& counts) = 0;
  // In place: every rank's segment is copied to every rank.
  virtual void all_gather(float* data, const std::vector<size_t>& counts) = 0;
  // Rank root's bytes to every rank.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Ends every rank of the job at once with this exit code.
  [[noreturn]] virtual void abort(int code) = 0;
};

// The single-process communicator (also what a build without MPI runs).
std::unique_ptr<Communicator> make_single_communicator();

// Whether this process was started by an MPI launcher (OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK set).
bool launched_by_mpi();

// The job's communicator: MPI when launched by mpirun (a kiln::Error if this build has no MPI), else
// single-process. MPI is initialised once per process and finalised when the communicator is destroyed.
std::unique_ptr<Communicator> make_communicator();

// A NCCL communicator over the same ranks on CUDA device `device`, its unique id broadcast through
// `bootstrap`. Null in builds without NCCL (only the CUDA build of `kiln` links it).
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device);

// Segment sizes of n elements over `ranks` ranks: equal, a multiple of `align` elements each, the last
// shorter (possibly empty).
std::vector<size_t> segment_counts(size_t n, int ranks, size_t align = 16);
inline size_t segment_offset(const std::vector<size_t>& counts, int rank) {
  size_t off = 0;
  for (int r = 0; r < rank; r++) off += counts[size_t(r)];
  return off;
}

// Collective: every rank passes its error message ("" for none). If any rank has one, rank 0 throws a
// dist::AgreedError (a kiln::Error) holding the message of the lowest such rank (prefixed "rank R: " when
// R != 0) and every other rank throws RankQuiet. Returns normally on every rank otherwise.
void agree_on_error(Communicator& comm, const std::string& local_error);

// For an error every rank finds at the same point (a check on values that are the same on every rank): rank 0
// throws it as an AgreedError, the others throw RankQuiet. No communication.
[[noreturn]] void fail_together(Communicator& comm, const std::string& message);

// The agreed error, as rank 0 throws it (every other rank throws RankQuiet at the same point).
struct AgreedError : Error {
  using Error::Error;
};
// Thrown on ranks other than 0 instead of the agreed error, so one line is printed, by rank 0 (kiln::train
// prints it there before MPI is finalised, then throws this too); the CLI exits non-zero without printing.
struct RankQuiet : std::exception {
  const char* what() const noexcept override { return "error reported by rank 0"; }
};

}  // namespace kiln::dist
