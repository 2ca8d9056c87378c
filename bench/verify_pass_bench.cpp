// What a verification pass costs beside a plain decoding step, on the same decoder in the same run: the target
// of speculative decoding scores K+1 positions in one forward (all logits), Medusa scores a candidate tree of n
// nodes (forward_tree). At batch 1 a step is bound by reading the weights, so a pass over a few positions should
// cost little more than one step; this prints the median time of each pass and its ratio to the 1-token step
// (the peer), per weight format. Each round times every pass once (interleaved, so all see the same load on a
// shared machine), from a cache of `prompt` positions, and truncates back after it. Times are the process's
// CPU time (all threads together), so that a loaded machine's waits for a core are left out; wall time beside.
//
//   ./build/verify_pass_bench [--config /work/bench-models/target.json] [--threads 1] [--rounds 20]
//                             [--formats bf16,f32] [--rows 2,3,5,7,9,16,17] [--tree 16]
//   ./build/verify_pass_bench --gemm 2560,640   (one bf16 matrix's narrow_gemm at 1 .. 16 rows)
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/matmul.h"
#include "kernels/narrow_gemv.h"
#include "models/family.h"
#include "models/model.h"
#include "train/trainer.h"

using namespace kiln;
using Clock = std::chrono::steady_clock;

namespace {

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  for (size_t at = 0; at <= s.size();) {
    size_t e = s.find(',', at);
    if (e == std::string::npos) e = s.size();
    if (e > at) out.push_back(s.substr(at, e - at));
    at = e + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bench::prefer_blas_core(argv);
  std::string config = "/work/bench-models/target.json", formats = "bf16,f32", rows_s = "2,3,5,7,9,16,17";
  std::string gemm;  // "M,K": time one matrix instead of the model
  int threads = 1, rounds = 20, prompt = 32, tree = 16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--config") config = argv[i + 1];
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
    else if (a == "--formats") formats = argv[i + 1];
    else if (a == "--rows") rows_s = argv[i + 1];
    else if (a == "--tree") tree = std::atoi(argv[i + 1]);
    else if (a == "--gemm" && std::strchr(argv[i + 1], ',')) gemm = argv[i + 1];
    else {
      std::fprintf(stderr, "verify_pass_bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  set_threads(threads);
  if (!gemm.empty()) {  // one bf16 matrix M,K alone (hot in the caches): narrow_gemm's time per row count
    const int64_t M = std::atoll(gemm.c_str()), K = std::atoll(std::strchr(gemm.c_str(), ',') + 1);
    std::vector<float> w(size_t(M * K)), x(size_t(64 * K), 0.5f), y(size_t(64 * M));
    for (size_t i = 0; i < w.size(); i++) w[i] = float(int(i % 17) - 8) * 0.01f;
    std::vector<uint16_t> store(narrow_bytes(WeightFormat::BF16, M, K) / 2 + 64);
    const NarrowMatrix A = narrow_convert(store.data(), WeightFormat::BF16, w.data(), M, K, false);
    for (int N : {1, 2, 4, 5, 8, 16}) {
      std::vector<double> t;
      for (int r = 0; r < 200; r++) {
        const double c0 = cpu_seconds();
        cpu::narrow_gemm(y.data(), M, x.data(), K, N, A, nullptr, false);
        t.push_back(cpu_seconds() - c0);
      }
      std::printf("M %ld K %ld N %2d: %8.1f us\n", long(M), long(K), N, median(t) * 1e6);
    }
    return 0;
  }
  const ModelConfig cfg = load_model_config(config);
  ModelOptions mo;
  mo.with_grads = false;
  auto model = make_model(cfg, mo);
  model->init_random(1);
  std::vector<int> rows;
  for (const auto& r : split(rows_s)) rows.push_back(std::atoi(r.c_str()));
  std::vector<WeightFormat> fs;
  for (const auto& name : split(formats)) {
    const auto f = parse_weight_format(name);
    if (!f) {
      std::fprintf(stderr, "verify_pass_bench: unknown format %s\n", name.c_str());
      return 2;
    }
    fs.push_back(*f);
  }
  // A tree of `tree` nodes: a root, then a chain of width 2 (node i's parent is (i - 1) / 2), so depths grow.
  tree = std::clamp(tree, 1, 64);
  std::vector<int32_t> depth(size_t(tree), 0);
  std::vector<uint64_t> mask(size_t(tree), 1);
  for (int i = 1; i < tree; i++) {
    const int p = (i - 1) / 2;
    depth[size_t(i)] = depth[size_t(p)] + 1;
    mask[size_t(i)] = mask[size_t(p)] | (uint64_t(1) << i);
  }
  std::vector<int32_t> toks(64);
  for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 7919 + 13) % size_t(cfg.vocab_size));

  std::printf("verify_pass_bench: %s, %d threads, median of %d rounds from a %d-position cache\n", config.c_str(),
              threads, rounds, prompt);
  std::vector<std::unique_ptr<IncrementalDecoder>> decs;
  for (WeightFormat f : fs) {
    DecoderOptions d;
    d.weights = f;
    decs.push_back(make_decoder(cfg, model->host_params(), d));
    decs.back()->forward(toks.data(), prompt);
  }
  // per[format][0]: the 1-token step; [1 + j]: rows[j] positions with all logits; last: the tree.
  const size_t passes = rows.size() + 2;
  std::vector<std::vector<std::vector<double>>> per(fs.size(), std::vector<std::vector<double>>(passes)), wall = per;
  for (int s = 0; s < rounds; s++)
    for (size_t i = 0; i < fs.size(); i++) {
      IncrementalDecoder& d = *decs[i];
      for (size_t p = 0; p < passes; p++) {
        const auto t0 = Clock::now();
        const double c0 = cpu_seconds();
        if (p == 0)
          d.forward(toks.data(), 1);
        else if (p < passes - 1)
          d.forward(toks.data(), rows[p - 1], /*all_logits=*/true);
        else
          d.forward_tree(toks.data(), tree, depth.data(), mask.data());
        per[i][p].push_back(cpu_seconds() - c0);
        wall[i][p].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        d.truncate(prompt);
      }
    }
  std::printf("%-6s %-16s %10s %10s %10s %10s\n", "format", "pass", "cpu ms", "x step", "wall ms", "x step");
  for (size_t i = 0; i < fs.size(); i++) {
    const double step = median(per[i][0]), wstep = median(wall[i][0]);
    for (size_t p = 0; p < passes; p++) {
      const std::string name = p == 0 ? "step (1 token)"
                               : p < passes - 1 ? std::to_string(rows[p - 1]) + " positions"
                                                : "tree " + std::to_string(tree);
      const double t = median(per[i][p]), w = median(wall[i][p]);
      std::printf("%-6s %-16s %10.3f %10.2f %10.3f %10.2f\n", weight_format_name(fs[i]), name.c_str(), t * 1e3,
                  t / step, w * 1e3, w / wstep);
    }
  }
  return 0;
}
