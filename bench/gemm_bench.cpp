// GEMM throughput through cpu::gemm for the GPT-2 124M training shapes at N tokens (default 256), printed
// next to a peer measured in the same run: a large square sgemm (the machine's practical sgemm rate).
// A second table times the other CPU kernels at the same shapes against their naive ref:: versions.
//
//   ./build-kernels/gemm_bench [--tokens N] [--threads T] [--square S] [--gemm-filter TEXT] [--gemm-only 1]
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/crossentropy.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"

using namespace kiln;

namespace {

// Seconds per call of the fastest batch: one warm-up, then batches of calls each lasting >= min_s. The
// minimum, not the median: the build machine is shared, and interference only ever adds time.
double time_call(const std::function<void()>& fn, double min_s = 0.1, int batches = 5) {
  fn();
  std::vector<double> per_call;
  for (int b = 0; b < batches; b++) per_call.push_back(bench::seconds_of_batch(fn, min_s));
  return *std::min_element(per_call.begin(), per_call.end());
}

struct GemmCase {
  std::string name;
  bool ta, tb;
  int64_t M, N, K;
  float beta;
};

double gemm_gflops(const GemmCase& c) {
  // Stored shapes: A is [M,K] (or [K,M] transposed), B is [K,N] (or [N,K]).
  const int64_t lda = c.ta ? c.M : c.K, ldb = c.tb ? c.K : c.N;
  auto A = bench::random_vec(size_t(c.M * c.K), 1), B = bench::random_vec(size_t(c.K * c.N), 2);
  std::vector<float> C(size_t(c.M * c.N), 0.0f);
  double s = time_call([&] {
    cpu::gemm(c.ta, c.tb, c.M, c.N, c.K, 1.0f, A.data(), lda, B.data(), ldb, c.beta, C.data(), c.N);
  });
  return 2.0 * double(c.M) * double(c.N) * double(c.K) / s * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 256;
  int threads = 2;
  int64_t square = 2048;
  std::string filter;  // run only the gemm cases whose name contains this
  bool skip_kernels = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--tokens")) tokens = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--square")) square = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--gemm-filter")) filter = argv[i + 1];
    else if (!std::strcmp(argv[i], "--gemm-only")) skip_kernels = std::atoi(argv[i + 1]) != 0;
    else {
      std::fprintf(stderr,
                   "usage: gemm_bench [--tokens N] [--threads T] [--square S] [--gemm-filter TEXT] [--gemm-only 1]\n");
      return 2;
    }
  }
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
  std::printf("# %s\n# threads %d, tokens N = %lld\n", openblas_get_config(), threads, (long long)tokens);


  // Each Linear layer [C -> OC] (Hugging Face Conv1D layout, W [C, OC]): the forward and its two backward
  // products, as cpu::matmul_forward / matmul_backward issue them.
  const int64_t N = tokens;
  std::vector<GemmCase> cases;
  const struct {
    const char* name;
    int64_t C, OC;
  } layers[] = {{"attn qkv 768->2304", 768, 2304},
                {"attn proj 768->768", 768, 768},
                {"mlp fc 768->3072", 768, 3072},
                {"mlp proj 3072->768", 3072, 768},
                {"lm head 768->50257 [C,V]", 768, 50257}};
  for (auto& l : layers) {
    cases.push_back({std::string(l.name) + " fwd", false, false, N, l.OC, l.C, 1.0f});
    cases.push_back({std::string(l.name) + " dinp", false, true, N, l.C, l.OC, 0.0f});
    cases.push_back({std::string(l.name) + " dW", true, false, l.C, l.OC, N, 1.0f});
  }
  // GPT-2 ties the LM head to wte, stored [V, C]: logits = x·wteᵀ, dx = dlogits·wte, dwte += dlogitsᵀ·x.
  const int64_t V = 50257, C = 768;
  cases.push_back({"lm head tied wte[V,C] fwd", false, true, N, V, C, 0.0f});
  cases.push_back({"lm head tied wte[V,C] dinp", false, false, N, C, V, 0.0f});
  cases.push_back({"lm head tied wte[V,C] dW", true, false, V, C, N, 1.0f});

  // The peer (a square sgemm) is re-measured between the cases and each case is compared with the mean
  // of the peers just before and after it, so a burst of load elsewhere moves both numbers together.
  const GemmCase peer_case{"square", false, false, square, square, square, 0.0f};
  std::printf("\n%-34s %6s %6s %6s %9s %9s %7s\n", "gemm (row-major, C = op(A)·op(B))", "M", "N", "K", "GFLOP/s",
              "peer", "ratio");
  std::printf("%-34s %6lld %6lld %6lld\n", "peer: square sgemm", (long long)square, (long long)square,
              (long long)square);
  double peer_prev = gemm_gflops(peer_case);
  for (auto& c : cases) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    const double g = gemm_gflops(c);
    const double peer_next = gemm_gflops(peer_case), peer = 0.5 * (peer_prev + peer_next);
    std::printf("%-34s %6lld %6lld %6lld %9.1f %9.1f %7.2f\n", c.name.c_str(), (long long)c.M, (long long)c.N,
                (long long)c.K, g, peer, g / peer);
    std::fflush(stdout);
    peer_prev = peer_next;
  }
  if (skip_kernels) return 0;

  // Other kernels at the same shapes: optimized cpu:: against the naive ref:: (the ratio is the speed-up).
  std::printf("\n%-34s %12s %12s %8s\n", "kernel", "cpu ms", "ref ms", "speed-up");
  auto row = [&](const char* name, const std::function<void()>& fc, const std::function<void()>& fr) {
    const double tc = time_call(fc), tr = time_call(fr, 0.3, 1);
    std::printf("%-34s %12.3f %12.3f %8.1f\n", name, tc * 1e3, tr * 1e3, tr / tc);
  };
  {
    std::vector<int32_t> targets(N);
    for (int64_t n = 0; n < N; n++) targets[n] = int32_t((n * 7919) % V);
    std::vector<float> logits = bench::random_vec(size_t(N * V), 3, 4.0f), losses(N);
    // The kernel overwrites the logits with their gradient; later calls run on those values, which are as
    // good an input as any (finite, same shape), so no copy is timed.
    auto ce = [&](bool use_cpu) {
      (use_cpu ? cpu::softmax_crossentropy : ref::softmax_crossentropy)(logits.data(), losses.data(),
                                                                         targets.data(), N, int(V), V, 1.0f / N);
    };
    row("crossentropy N x 50257", [&] { ce(true); }, [&] { ce(false); });
  }
  {
    const int64_t n = N * 3072;
    auto x = bench::random_vec(size_t(n), 4, 3.0f), d = bench::random_vec(size_t(n), 5);
    std::vector<float> y(n);
    row("gelu forward N x 3072", [&] { cpu::gelu_forward(y.data(), x.data(), n); },
        [&] { ref::gelu_forward(y.data(), x.data(), n); });
    row("gelu backward N x 3072", [&] { cpu::gelu_backward(y.data(), x.data(), d.data(), n); },
        [&] { ref::gelu_backward(y.data(), x.data(), d.data(), n); });
  }
  {
    auto x = bench::random_vec(size_t(N * C), 6), w = bench::random_vec(C, 7), b = bench::random_vec(C, 8), d = bench::random_vec(N * C, 9);
    std::vector<float> y(N * C), mean(N), rstd(N), dx(N * C), dw(C), db(C);
    row("layernorm forward N x 768",
        [&] { cpu::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f); },
        [&] { ref::layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C, 1e-5f); });
    row("layernorm backward N x 768",
        [&] {
          cpu::layernorm_backward(dx.data(), dw.data(), db.data(), d.data(), x.data(), w.data(), mean.data(),
                                  rstd.data(), N, C);
        },
        [&] {
          ref::layernorm_backward(dx.data(), dw.data(), db.data(), d.data(), x.data(), w.data(), mean.data(),
                                  rstd.data(), N, C);
        });
  }
  {
    const int64_t n = 124'000'000 / 8;  // an eighth of GPT-2 124M (memory-bound; the ratio carries over)
    auto p = bench::random_vec(size_t(n), 10), g = bench::random_vec(size_t(n), 11);
    std::vector<float> m(n, 0.0f), v(n, 0.0f);
    AdamWHyper h;
    h.weight_decay = 0.1f;
    row("adamw 15.5M params", [&] { cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, h); },
        [&] { ref::adamw_update(p.data(), g.data(), m.data(), v.data(), n, h); });
    row("sum_squares 15.5M", [&] { (void)cpu::sum_squares(g.data(), n); }, [&] { (void)ref::sum_squares(g.data(), n); });
  }
  return 0;
}
