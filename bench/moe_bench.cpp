// MoE layer benchmark: one nn::MoE feed-forward (the Transformer's module, CPU backend) forward + backward
// over N tokens, beside the PyTorch reference's same layer (tests/peer/torch_moe.py, Hugging Face's
// formulation: a loop over experts with index_add_) on the same shapes, threads and inputs' sizes, run by this
// program (bench/torch_moe_bench.py) in the same run. Prints one JSON line per shape: tokens/s of both
// (medians), the ratio, and the share of kiln's layer time spent routing and dispatching (router product,
// routing, counting sort, gather, combine and their backwards) rather than in the experts' products.
//
//   cmake --build build --target moe_bench && ./build/moe_bench [--threads T] [--torch /usr/bin/python3]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/rng.h"
#include "nn/backend.h"
#include "nn/moe.h"
#include "nn/workspace.h"

using namespace kiln;

namespace {

double median_ms(const std::function<void()>& fn, int reps) {
  fn();  // warm-up
  std::vector<double> ms;
  for (int r = 0; r < reps; r++) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Shape {
  int N, C, F, E, K;
};

void bench(const Shape& sh, int threads, const std::string& python, int reps) {
  auto be = nn::make_cpu_backend();
  nn::MoE m;
  m.shape.C = sh.C;
  m.shape.F = sh.F;
  m.shape.routing.E = sh.E;
  m.shape.routing.K = sh.K;
  m.shape.routing.norm_topk = true;
  const int64_t N = sh.N, C = sh.C, F = sh.F, E = sh.E;
  Rng r(1);
  auto randv = [&](size_t n, float s) {
    std::vector<float> v(n);
    for (float& x : v) x = s * r.normal();
    return v;
  };
  std::vector<float> router = randv(size_t(E * C), 0.02f), gate = randv(size_t(E * F * C), 0.02f),
                     up = randv(size_t(E * F * C), 0.02f), down = randv(size_t(E * C * F), 0.02f);
  std::vector<float> drouter(router.size()), dgate(gate.size()), dup(up.size()), ddown(down.size());
  m.router = nn::Weight{router.data(), nullptr, drouter.data(), nullptr, nullptr, int(C), int(E)};
  m.gate = gate.data(), m.up = up.data(), m.down = down.data();
  m.dgate = dgate.data(), m.dup = dup.data(), m.ddown = ddown.data();
  std::vector<float> x = randv(size_t(N * C), 1.0f), res = randv(size_t(N * C), 1.0f), y(size_t(N * C)),
                     dy = randv(size_t(N * C), 1.0f), dx(size_t(N * C));
  auto plan = [&](nn::Workspace& ws, nn::MoEActivations& a, nn::MoEScratch& s) {
    a.allocate(ws, N, m.shape);
    s.allocate(ws, N, m.shape);
  };
  nn::Workspace measure;
  nn::MoEActivations a;
  nn::MoEScratch s;
  plan(measure, a, s);
  nn::Workspace ws(*be, measure.peak(), "moe bench");
  plan(ws, a, s);
  const nn::Act X{x.data(), DType::F32}, DY{dy.data(), DType::F32}, DX{dx.data(), DType::F32};
  const double fb = median_ms([&] {
    m.forward(*be, y.data(), res.data(), X, a, s, N);
    m.backward(*be, DX, DY, X, a, s, N);
  }, reps);
  // Routing and dispatch alone: router product, routing, sort, gather and combine, and their backwards.
  const double routing = median_ms([&] {
    be->linear_forward(nn::Act{s.logits, DType::F32}, X, m.router, N);
    be->moe_route(a.scores, a.idx, a.w, s.logits, nullptr, N, m.shape.routing);
    be->moe_dispatch(a.offsets, a.row_token, a.slot, a.idx, N, sh.K, int(E));
    be->moe_gather(s.xs, X, a.row_token, N * sh.K, int(C));
    be->moe_combine(y.data(), res.data(), a.ys, a.slot, a.w, N, sh.K, int(C));
    be->moe_combine_backward(s.d_ys, s.d_w, DY, a.ys, a.slot, a.w, N, sh.K, int(C));
    be->moe_gather(s.xs, X, a.row_token, N * sh.K, int(C));
    be->moe_route_backward(s.logits, s.d_w, a.scores, a.idx, N, m.shape.routing);
    be->linear_backward(DX, nn::Act{s.logits, DType::F32}, X, m.router, N);
    be->moe_gather_backward(DX, nn::Act{}, s.d_ys, a.slot, N, sh.K, int(C));
  }, reps);
  // The peer: the same layer in PyTorch, same threads.
  double torch_ms = NAN;
  if (!python.empty()) {
    const std::string cmd = python + " bench/torch_moe_bench.py --threads " + std::to_string(threads) + " --N " +
                            std::to_string(N) + " --C " + std::to_string(C) + " --F " + std::to_string(F) + " --E " +
                            std::to_string(E) + " --K " + std::to_string(sh.K) + " --reps " + std::to_string(reps);
    if (FILE* p = popen(cmd.c_str(), "r")) {
      char buf[512] = {0};
      std::string out;
      while (fgets(buf, sizeof buf, p)) out += buf;
      pclose(p);
      auto j = nlohmann::json::parse(out, nullptr, false);
      if (j.is_object() && j.contains("ms")) torch_ms = j["ms"].get<double>();
    }
  }
  nlohmann::json j = {{"bench", "moe_layer_fwd_bwd"}, {"N", N}, {"C", C}, {"F", F}, {"E", E}, {"K", sh.K},
                      {"threads", threads}, {"kiln_ms", fb}, {"kiln_tokens_per_s", 1e3 * double(N) / fb},
                      {"routing_dispatch_ms", routing}, {"routing_dispatch_share", routing / fb},
                      {"torch_ms", torch_ms}, {"torch_tokens_per_s", 1e3 * double(N) / torch_ms},
                      {"speedup_vs_torch", torch_ms / fb}};
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 7;
  std::string python = "/usr/bin/python3";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--torch")) python = argv[i + 1];
    if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
  }
  omp_set_num_threads(threads);
  // Qwen3-MoE-like layers at small widths: 8 of 64 experts (Qwen3-30B-A3B's ratio), and 2 of 8.
  for (const Shape& s : {Shape{1024, 256, 128, 64, 8}, Shape{1024, 256, 256, 8, 2}}) bench(s, threads, python, reps);
}
