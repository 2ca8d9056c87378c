// bf16 GEMM engines at the GPT-2 124M training shapes (N tokens, default 256), each against fp32
// cblas_sgemm of the same shape measured in the same run (batches interleaved, best batch kept):
//   kiln    cpu::gemm_lowp, BF16: fp32 activations converted while packing, cached bf16 weight
//   dnnl    oneDNN matmul (bf16 × bf16 → f32), with cpu::to_lowp of the fp32 operands timed inside
//   sbgemm  OpenBLAS cblas_sbgemm, looked up at run time (Debian's 0.3.21 build does not export it)
//   emu     cpu::gemm_lowp_sgemm: round to bf16, widen, sgemm (the FP16 path's cost)
// Every engine gets the same operands as the model will pass: the weight already in bf16, activations
// and gradients in fp32. The last lines sum one training step's products (12 layers + LM head).
//
//   ./build-mp/lowp_gemm_bench [--tokens N] [--threads T] [--filter TEXT] [--seconds S] [--emulated 1]
#include <cblas.h>
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/memory.h"
#include "bench/bench_util.h"
#include "kernels/matmul_lowp.h"

#ifdef KILN_HAVE_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif

using namespace kiln;

namespace {


// Fastest batch of each engine, batches interleaved so that interference from other work on the
// machine falls on all engines alike (it only ever adds time, so the minimum is the cleanest figure).
std::vector<double> time_interleaved(const std::vector<std::function<void()>>& fns, double min_s, int batches) {
  std::vector<double> best(fns.size(), 1e30);
  for (auto& f : fns) f();  // warm-up (first-touch, primitive caches)
  for (int b = 0; b < batches; b++)
    for (size_t i = 0; i < fns.size(); i++) best[i] = std::min(best[i], bench::seconds_of_batch(fns[i], min_s));
  return best;
}

struct Case {
  std::string layer, op;  // op: fwd (out = inp·W), dinp (dout·Wᵀ), dW (inpᵀ·dout)
  bool ta, tb;
  int64_t M, N, K;
  bool a_lowp, b_lowp;  // operands that arrive already in bf16 (the cached weight)
  float beta;
  int count;  // times per training step (12 layers, or 1 for the LM head)
};

// The products of one GPT-2 124M layer (Conv1D weight [C, OC]) and of the LM head (tied embedding
// [V, C]) at T tokens.
std::vector<Case> gpt2_cases(int64_t T) {
  std::vector<Case> cs;
  struct L {
    const char* name;
    int64_t C, OC;
  };
  for (L l : {L{"qkv", 768, 2304}, L{"attproj", 768, 768}, L{"fc", 768, 3072}, L{"fcproj", 3072, 768}}) {
    cs.push_back({l.name, "fwd", false, false, T, l.OC, l.C, false, true, 1.0f, 12});
    cs.push_back({l.name, "dinp", false, true, T, l.C, l.OC, false, true, 0.0f, 12});
    cs.push_back({l.name, "dW", true, false, l.C, l.OC, T, false, false, 1.0f, 12});
  }
  const int64_t V = 50257, C = 768;
  cs.push_back({"lmhead", "fwd", false, true, T, V, C, false, true, 0.0f, 1});   // logits = x · wteᵀ
  cs.push_back({"lmhead", "dinp", false, false, T, C, V, false, true, 0.0f, 1});  // dx = dlogits · wte
  cs.push_back({"lmhead", "dW", true, false, V, C, T, false, false, 1.0f, 1});    // dwte += dlogitsᵀ · x
  return cs;
}

using sbgemm_fn = void (*)(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, int, int, int, float, const uint16_t*, int,
                           const uint16_t*, int, float, float*, int);

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 256;
  int threads = 2;
  std::string filter;
  double seconds = 0.1;
  bool emulated = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--tokens") tokens = std::atoll(v.c_str());
    else if (a == "--threads") threads = std::atoi(v.c_str());
    else if (a == "--filter") filter = v;
    else if (a == "--seconds") seconds = std::atof(v.c_str());
    else if (a == "--emulated") emulated = v == "1";
    else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  omp_set_num_threads(threads);
  const auto sbgemm = reinterpret_cast<sbgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sbgemm"));
  std::printf("bf16 GEMM engines, GPT-2 124M training shapes, %lld tokens, %d threads; GFLOP/s, best of 5 "
              "interleaved batches; conversions of fp32 operands included\n",
              (long long)tokens, threads);
  std::printf("kiln AVX512-BF16 kernel: %s; OpenBLAS cblas_sbgemm: %s; oneDNN: %s\n",
              cpu::gemm_lowp_has_bf16_kernel() ? "yes" : "no (emulated)", sbgemm ? "found" : "not exported",
#ifdef KILN_HAVE_DNNL
              "matmul primitive"
#else
              "not built (libdnnl-dev missing)"
#endif
  );
  std::printf("%-8s %-5s %6s %6s %6s | %7s %7s %5s", "layer", "op", "M", "N", "K", "sgemm", "kiln", "x");
#ifdef KILN_HAVE_DNNL
  std::printf(" %7s %5s", "dnnl", "x");
#endif
  if (sbgemm) std::printf(" %7s %5s", "sbgemm", "x");
  if (emulated) std::printf(" %7s %5s", "emu", "x");
  std::printf("\n");

#ifdef KILN_HAVE_DNNL
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
#endif
  Buffer scratch(kLowpScratchBytes);
  double step_f32 = 0, step_kiln = 0, step_dnnl = 0;
  for (const Case& c : gpt2_cases(tokens)) {
    if (!filter.empty() && (c.layer + " " + c.op).find(filter) == std::string::npos) continue;
    const int64_t lda = c.ta ? c.M : c.K, ldb = c.tb ? c.K : c.N;
    const auto A = bench::random_vec(size_t(c.M * c.K), 1), B = bench::random_vec(size_t(c.K * c.N), 2);
    std::vector<uint16_t> Al(A.size()), Bl(B.size());
    cpu::to_lowp(Al.data(), A.data(), int64_t(A.size()), LowpType::BF16);
    cpu::to_lowp(Bl.data(), B.data(), int64_t(B.size()), LowpType::BF16);
    std::vector<float> C(size_t(c.M * c.N), 0.0f);
    const LowpOperand a = c.a_lowp ? lowp_operand(Al.data(), lda) : f32_operand(A.data(), lda);
    const LowpOperand b = c.b_lowp ? lowp_operand(Bl.data(), ldb) : f32_operand(B.data(), ldb);
    // The converted copies the library engines need: what arrives in fp32 is converted every call.
    auto convert_f32_operands = [&] {
      if (!c.a_lowp) cpu::to_lowp(Al.data(), A.data(), int64_t(A.size()), LowpType::BF16);
      if (!c.b_lowp) cpu::to_lowp(Bl.data(), B.data(), int64_t(B.size()), LowpType::BF16);
    };
    std::vector<std::function<void()>> fns;
    fns.push_back([&] {
      cblas_sgemm(CblasRowMajor, c.ta ? CblasTrans : CblasNoTrans, c.tb ? CblasTrans : CblasNoTrans, int(c.M), int(c.N),
                  int(c.K), 1.0f, A.data(), int(lda), B.data(), int(ldb), c.beta, C.data(), int(c.N));
    });
    fns.push_back([&] {
      cpu::gemm_lowp(LowpType::BF16, c.ta, c.tb, c.M, c.N, c.K, 1.0f, a, b, c.beta, C.data(), c.N, scratch.data());
    });
#ifdef KILN_HAVE_DNNL
    using dnnl::memory;
    const memory::desc amd({c.M, c.K}, memory::data_type::bf16, c.ta ? memory::dims{1, lda} : memory::dims{lda, 1});
    const memory::desc bmd({c.K, c.N}, memory::data_type::bf16, c.tb ? memory::dims{1, ldb} : memory::dims{ldb, 1});
    const memory::desc cmd({c.M, c.N}, memory::data_type::f32, memory::dims{c.N, 1});
    dnnl::primitive_attr attr;
    if (c.beta != 0.0f) {
      dnnl::post_ops po;
      po.append_sum(c.beta);
      attr.set_post_ops(po);
    }
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(amd, bmd, cmd), attr, eng);
    dnnl::matmul mm(pd);
    memory am(amd, eng, Al.data()), bm(bmd, eng, Bl.data()), cm(cmd, eng, C.data());
    fns.push_back([&] {
      convert_f32_operands();
      mm.execute(strm, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
      strm.wait();
    });
#endif
    if (sbgemm) {
      fns.push_back([&] {
        convert_f32_operands();
        sbgemm(CblasRowMajor, c.ta ? CblasTrans : CblasNoTrans, c.tb ? CblasTrans : CblasNoTrans, int(c.M), int(c.N),
               int(c.K), 1.0f, Al.data(), int(lda), Bl.data(), int(ldb), c.beta, C.data(), int(c.N));
      });
    }
    if (emulated) {
      fns.push_back([&] {
        cpu::gemm_lowp_sgemm(LowpType::BF16, c.ta, c.tb, c.M, c.N, c.K, 1.0f, a, b, c.beta, C.data(), c.N,
                             scratch.data());
      });
    }
    const auto t = time_interleaved(fns, seconds, 5);
    const double flop = 2.0 * double(c.M) * double(c.N) * double(c.K);
    std::printf("%-8s %-5s %6lld %6lld %6lld | %7.1f", c.layer.c_str(), c.op.c_str(), (long long)c.M, (long long)c.N,
                (long long)c.K, flop / t[0] * 1e-9);
    for (size_t i = 1; i < t.size(); i++) std::printf(" %7.1f %5.2f", flop / t[i] * 1e-9, t[0] / t[i]);
    std::printf("\n");
    std::fflush(stdout);
    step_f32 += c.count * t[0];
    step_kiln += c.count * t[1];
#ifdef KILN_HAVE_DNNL
    step_dnnl += c.count * t[2];
#endif
  }
  std::printf("one training step's products (12 layers x 3 products x 4 linears + LM head x 3):\n");
  std::printf("  sgemm fp32 %.1f ms, kiln bf16 %.1f ms: %.2fx", step_f32 * 1e3, step_kiln * 1e3, step_f32 / step_kiln);
#ifdef KILN_HAVE_DNNL
  std::printf("; oneDNN bf16 %.1f ms: %.2fx", step_dnnl * 1e3, step_f32 / step_dnnl);
#endif
  std::printf("\n");
  return 0;
}
