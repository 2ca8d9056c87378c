#include "dist/communicator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace kiln::dist {

namespace {

// One process: every collective is the identity.
class SingleCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "single"; }
  void all_reduce_sum(float*, size_t) override {}
  void all_reduce_sum(double*, size_t) override {}
  void reduce_scatter_sum(float*, const std::vector<size_t>&) override {}
  void all_gather(float*, const std::vector<size_t>&) override {}
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::_Exit(code); }
};

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() { return std::make_unique<SingleCommunicator>(); }

bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

#ifdef KILN_HAVE_MPI
std::unique_ptr<Communicator> make_mpi_communicator();  // dist/mpi/mpi_communicator.cpp
#endif

std::unique_ptr<Communicator> make_communicator() {
  if (!launched_by_mpi()) return make_single_communicator();
#ifdef KILN_HAVE_MPI
  return make_mpi_communicator();
#else
  fail("started by an MPI launcher, but this kiln was built without MPI (install libopenmpi-dev and "
       "reconfigure)");
#endif
}

// Builds without NCCL: the CUDA build of `kiln` links dist/nccl/nccl_communicator.cpp, whose definition wins.
__attribute__((weak)) std::unique_ptr<Communicator> make_nccl_communicator(Communicator&, int) { return nullptr; }

std::vector<size_t> segment_counts(size_t n, int ranks, size_t align) {
  const size_t per = (n + size_t(ranks) - 1) / size_t(ranks);
  const size_t seg = (per + align - 1) / align * align;
  std::vector<size_t> counts(static_cast<size_t>(ranks));
  size_t left = n;
  for (auto& c : counts) {
    c = std::min(seg, left);
    left -= c;
  }
  return counts;
}

void agree_on_error(Communicator& comm, const std::string& local_error) {
  if (comm.size() == 1) {
    if (!local_error.empty()) throw AgreedError(local_error);
    return;
  }
  // Who failed: one slot per rank, summed.
  std::vector<double> failed(static_cast<size_t>(comm.size()), 0.0);
  failed[size_t(comm.rank())] = local_error.empty() ? 0.0 : 1.0;
  comm.all_reduce_sum(failed.data(), failed.size());
  int origin = -1;
  for (int r = 0; r < comm.size() && origin < 0; r++)
    if (failed[size_t(r)] > 0) origin = r;
  if (origin < 0) return;
  // The origin's message, its length first.
  uint64_t len = comm.rank() == origin ? local_error.size() : 0;
  comm.broadcast(&len, sizeof len, origin);
  std::string msg = comm.rank() == origin ? local_error : std::string(len, '\0');
  comm.broadcast(msg.data(), len, origin);
  if (comm.rank() != 0) throw RankQuiet();
  throw AgreedError(origin == 0 ? msg : str("rank ", origin, ": ", msg));
}

void fail_together(Communicator& comm, const std::string& message) {
  if (comm.rank() != 0) throw RankQuiet();
  throw AgreedError(message);
}

}  // namespace kiln::dist
