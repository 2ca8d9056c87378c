// cuda::argmax_rows against the host rule (kiln::argmax in infer/sampler.h): ties to the lowest index, NaN
// never wins, -inf rows, all-NaN rows, a limit below the row stride.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "infer/sampler.h"
#include "kernels/argmax.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {

TEST(ArgmaxGpu, MatchesTheHostRule) {
  KILN_REQUIRE_GPU();
  const int rows = 7, ld = 1000, n = 937;
  std::vector<float> x = test::randn(size_t(rows) * ld, 12);
  x[1 * ld + 500] = x[1 * ld + 20] = 50.0f;                      // a tie: the lower index wins
  x[2 * ld + 936] = 60.0f;                                        // the last counted column
  x[2 * ld + 990] = 99.0f;                                        // past the limit: ignored
  for (int i = 0; i < n; i++) x[3 * ld + i] = -INFINITY;         // all -inf: the first
  for (int i = 0; i < n; i++) x[4 * ld + i] = NAN;               // all NaN: 0
  x[5 * ld + 3] = NAN;                                            // NaN beside real values never wins
  x[5 * ld + 700] = 70.0f;
  for (int i = 0; i < n; i++) x[6 * ld + i] = 1.0f;               // all equal: 0
  test::DeviceVec<float> dx(x);
  test::DeviceVec<int32_t> out(rows);
  cuda::argmax_rows(out.get(), dx.get(), rows, n, ld, gpu::stream());
  const auto got = out.download();
  for (int r = 0; r < rows; r++) EXPECT_EQ(got[size_t(r)], argmax(x.data() + size_t(r) * ld, n)) << "row " << r;
  EXPECT_EQ(got[1], 20);
  EXPECT_EQ(got[2], 936);
}

}  // namespace
}  // namespace kiln
