// The decoding batch's products (kernels/gemv.h vecmat_batch / matvec_batch) on the GPT-2 124M shapes at R rows,
// beside the peer measured in the same run: OpenBLAS's sgemm through cpu::gemm (what the decoder ran before). Prints ms per call, GFLOP/s, the weight's read rate in GB/s,
// and the ratio to sgemm. Median of 7 batches of calls lasting >= 50 ms each.
//
//   ./build/batch_gemv_bench [--rows 1,2,4,8,16] [--threads T]
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/gemv.h"
#include "kernels/matmul.h"

using namespace kiln;

namespace {

double median_call(const std::function<void()>& fn) {
  fn();
  std::vector<double> per;
  for (int b = 0; b < 7; b++) per.push_back(bench::seconds_of_batch(fn, 0.05));
  std::sort(per.begin(), per.end());
  return per[per.size() / 2];
}

struct Shape {
  const char* name;
  int64_t K, N;    // y[R, N] = x[R, K] · W
  bool out_in;     // W stored [N, K] (the tied LM head), else [K, N] (GPT-2's Conv1D)
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> rows = {1, 2, 4, 8, 16};
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      omp_set_num_threads(std::atoi(argv[++i]));
    } else if (a == "--rows" && i + 1 < argc) {
      rows.clear();
      for (char* s = argv[++i]; *s;) {
        rows.push_back(std::strtol(s, &s, 10));
        if (*s == ',') s++;
      }
    } else {
      std::fprintf(stderr, "batch_gemv_bench: unknown argument '%s' (--rows LIST, --threads T)\n", a.c_str());
      return 2;
    }
  }
  const Shape shapes[] = {{"attn.qkv 768->2304", 768, 2304, false},
                          {"attn.proj 768->768", 768, 768, false},
                          {"mlp.fc 768->3072", 768, 3072, false},
                          {"mlp.proj 3072->768", 3072, 768, false},
                          {"lm_head 768->50257", 768, 50257, true}};
  std::printf("batch_gemv_bench: %d threads; kiln = vecmat_batch / matvec_batch, peer = OpenBLAS sgemm (same run)\n",
              omp_get_max_threads());
  std::printf("%-20s %3s %10s %10s %8s %8s %8s\n", "shape", "R", "kiln ms", "sgemm ms", "GFLOP/s", "GB/s", "x sgemm");
  double sum_k = 0, sum_s = 0;
  for (const Shape& s : shapes) {
    const std::vector<float> W = bench::random_vec(size_t(s.K * s.N), 1), bias = bench::random_vec(size_t(s.N), 2);
    for (int64_t R : rows) {
      const std::vector<float> x = bench::random_vec(size_t(R * s.K), 3);
      std::vector<float> y(size_t(R * s.N));
      const double tk = median_call([&] {
        if (s.out_in)
          cpu::matvec_batch(y.data(), s.N, x.data(), s.K, R, W.data(), nullptr, s.N, s.K, false);
        else
          cpu::vecmat_batch(y.data(), s.N, x.data(), s.K, R, W.data(), bias.data(), s.K, s.N, false);
      });
      const double ts = median_call([&] {
        cpu::gemm(false, s.out_in, R, s.N, s.K, 1.0f, x.data(), s.K, W.data(), s.out_in ? s.K : s.N, 0.0f, y.data(),
                  s.N);
      });
      sum_k += tk;
      sum_s += ts;
      const double flops = 2.0 * double(R) * double(s.K) * double(s.N);
      std::printf("%-20s %3lld %10.3f %10.3f %8.1f %8.1f %7.2fx\n", s.name, (long long)R, tk * 1e3, ts * 1e3,
                  flops / tk * 1e-9, double(s.K * s.N) * 4.0 / tk * 1e-9, ts / tk);
    }
  }
  std::printf("all shapes and rows: kiln %.2f ms, sgemm %.2f ms, %.2fx\n", sum_k * 1e3, sum_s * 1e3, sum_s / sum_k);
  return 0;
}
