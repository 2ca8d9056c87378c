// GPU matrix products (kernels/matmul.h): bf16 operands, fp32 accumulation.
//
// Every product is one column-major call, LtCall: D[m, n] = epilogue(alpha · op(A) · op(B) + beta · C + bias),
// exactly the contract of cublasLtMatmul. A row-major C[M, N] = op(A) · op(B) is, read column-major, C^T =
// op(B)^T · op(A)^T: swap the operands and their flags, m = N, n = M (row_major below). On the GPU the call goes
// to cuBLASLt with a cached plan; in the emulated build (no cuBLAS headers) lt_emulated runs the same call as
// plain loops, so everything above run() is shared and tested on the CPU.
//
// GELU: cuBLASLt's GELU epilogue is the tanh approximation (what GPT-2 uses; NVIDIA's Transformer Engine and
// llm.c fuse their tanh GELU through it); its input is written to the aux matrix (bf16, D's type, as cuBLASLt
// requires). The aux leading dimension must be a multiple of 8, so other widths take a separate GELU pass.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "core/error.h"
#include "core/gpu.h"
#include "kernels/cuda/simt.cuh"
#include "kernels/matmul.h"

#if !KILN_EMULATED
#include <cublasLt.h>
#endif

namespace kiln::cuda {
namespace {

using simt::bf16_to_f32;
using simt::f32_to_bf16;

enum class Ty : int { bf16 = 0, f32 = 1 };
enum class Epi : int { none = 0, bias = 1, gelu_aux = 2, gelu_aux_bias = 3 };

// One cublasLtMatmul call, column-major. C and D share type and leading dimension (C may be D, or null when
// beta == 0). bias has D's type and m entries; aux (bf16, ld aux_ld) receives the GELU input.
struct LtCall {
  const char* op = "";
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const uint16_t* A = nullptr;
  int64_t lda = 0;
  const uint16_t* B = nullptr;
  int64_t ldb = 0;
  float alpha = 1, beta = 0;
  Ty cd = Ty::bf16;
  const void* C = nullptr;
  void* D = nullptr;
  int64_t ldc = 0;
  Epi epi = Epi::none;
  const void* bias = nullptr;
  uint16_t* aux = nullptr;
  int64_t aux_ld = 0;
};

std::string describe(const LtCall& c) {
  return str("column-major m=", c.m, " n=", c.n, " k=", c.k, " op(A)=", c.trans_a ? "T" : "N",
             " op(B)=", c.trans_b ? "T" : "N", " lda=", c.lda, " ldb=", c.ldb, " ldc=", c.ldc,
             " D=", c.cd == Ty::bf16 ? "bf16" : "fp32", " epilogue=", int(c.epi));
}

bool has_bias(Epi e) { return e == Epi::bias || e == Epi::gelu_aux_bias; }
bool has_gelu(Epi e) { return e == Epi::gelu_aux || e == Epi::gelu_aux_bias; }

// The checks cuBLASLt makes (and reports as CUBLAS_STATUS_INVALID_VALUE), made here for both builds so a bad
// translation fails the same way on the emulator.
void validate(const LtCall& c) {
  const int64_t a_rows = c.trans_a ? c.k : c.m, b_rows = c.trans_b ? c.n : c.k;
  KILN_CHECK(c.m > 0 && c.n > 0 && c.k > 0, "cuda::", c.op, ": empty product (", describe(c), ")");
  KILN_CHECK(c.lda >= a_rows && c.ldb >= b_rows && c.ldc >= c.m, "cuda::", c.op,
             ": a leading dimension is below its matrix's rows (", describe(c), ")");
  KILN_CHECK(c.A && c.B && c.D && (c.beta == 0 || c.C), "cuda::", c.op, ": null operand (", describe(c), ")");
  KILN_CHECK(!has_bias(c.epi) || c.bias, "cuda::", c.op, ": bias epilogue without a bias (", describe(c), ")");
  if (has_gelu(c.epi))
    KILN_CHECK(c.cd == Ty::bf16 && c.aux && c.aux_ld >= c.m && c.aux_ld % 8 == 0, "cuda::", c.op,
               ": GELU aux needs a bf16 output and ld >= m, a multiple of 8 (aux ld ", c.aux_ld, ", ",
               describe(c), ")");
}

// Row-major C[M, N] = alpha · op(A)[M, K] · op(B)[K, N] + beta · C as the column-major call on C^T.
LtCall row_major(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, Ty cd, const void* C,
                 void* D, int64_t ldc) {
  LtCall c;
  c.op = op;
  c.trans_a = trans_b, c.trans_b = trans_a;
  c.m = N, c.n = M, c.k = K;
  c.A = B, c.lda = ldb;
  c.B = A, c.ldb = lda;
  c.alpha = alpha, c.beta = beta;
  c.cd = cd, c.C = C, c.D = D, c.ldc = ldc;
  return c;
}

KILN_DEVICE float gelu_tanh(float x) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// ---- small kernels (both builds) ----

KILN_GLOBAL void round_bias_kernel(uint16_t* out, const float* in, int n) {
  int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = f32_to_bf16(in[i]);
}

KILN_GLOBAL void gelu_kernel(uint16_t* out, const uint16_t* in, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = f32_to_bf16(gelu_tanh(bf16_to_f32(in[i])));
}

// dbias[o] += sum over rows of dout[:, o]. Block (32, kBiasRows): x picks the column, y strides the rows; the
// per-thread sums meet in shared memory and are added in a fixed order, so the result is deterministic.
constexpr int kBiasRows = 16;
KILN_GLOBAL void bias_grad_kernel(float* dbias, const uint16_t* dout, int64_t N, int OC) {
  float* part = simt::dynamic_smem<float>();
  const int o = int(blockIdx.x) * 32 + int(threadIdx.x);
  float s = 0;
  if (o < OC)
    for (int64_t r = threadIdx.y; r < N; r += kBiasRows) s += bf16_to_f32(dout[r * OC + o]);
  part[threadIdx.y * 32 + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && o < OC) {
    float t = 0;
    for (int y = 0; y < kBiasRows; y++) t += part[y * 32 + threadIdx.x];
    dbias[o] += t;
  }
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// ---- the column-major call ----

#if KILN_EMULATED
// cuBLASLt's contract as plain loops: one block per column of D, fp32 sums of exact bf16 products.
KILN_GLOBAL void lt_emulated_kernel(LtCall c) {
  const int64_t j = blockIdx.x;
  auto A = c.A;
  auto B = c.B;
  for (int64_t i = 0; i < c.m; i++) {
    float acc = 0;
    for (int64_t p = 0; p < c.k; p++) {
      float a = bf16_to_f32(c.trans_a ? A[p + i * c.lda] : A[i + p * c.lda]);
      float b = bf16_to_f32(c.trans_b ? B[j + p * c.ldb] : B[p + j * c.ldb]);
      acc += a * b;
    }
    const int64_t at = i + j * c.ldc;
    float v = c.alpha * acc;
    if (c.beta != 0)  // BLAS: with beta == 0, C is not read
      v += c.beta * (c.cd == Ty::bf16 ? bf16_to_f32(static_cast<const uint16_t*>(c.C)[at])
                                       : static_cast<const float*>(c.C)[at]);
    if (has_bias(c.epi))
      v += c.cd == Ty::bf16 ? bf16_to_f32(static_cast<const uint16_t*>(c.bias)[i]) : static_cast<const float*>(c.bias)[i];
    if (has_gelu(c.epi)) {
      c.aux[i + j * c.aux_ld] = f32_to_bf16(v);
      v = gelu_tanh(v);
    }
    if (c.cd == Ty::bf16)
      static_cast<uint16_t*>(c.D)[at] = f32_to_bf16(v);
    else
      static_cast<float*>(c.D)[at] = v;
  }
}
#else
void lt_check(cublasStatus_t s, const char* call, const LtCall& c) {
  KILN_CHECK(s == CUBLAS_STATUS_SUCCESS, "cuda::", c.op, ": ", call, " failed (", cublasLtGetStatusString(s), ") for ",
             describe(c));
}

// What cuBLASLt's algorithm choice depends on: shape, layouts, types, epilogue and pointer alignments.
using PlanKey = std::array<int64_t, 15>;
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, cd = nullptr;
  cublasLtMatmulAlgo_t algo;
};

uint32_t alignment(const void* p) {
  uintptr_t u = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && (u % a) != 0) a >>= 1;
  return a;
}

cublasLtHandle_t g_handle = nullptr;
std::map<PlanKey, Plan> g_plans;
std::mutex g_mu;  // guards the handle and the plan cache
#endif

// One workspace for the process: cuBLASLt's 32 MiB (none on the emulator), then the bf16 copy of a bias.
constexpr size_t kLtWorkspace = KILN_EMULATED ? 0 : size_t(32) << 20;
constexpr int kMaxBias = 65536;

char* workspace() {
  static char* ws = static_cast<char*>(gpu::malloc(kLtWorkspace + kMaxBias * sizeof(uint16_t), "cuBLASLt workspace"));
  return ws;
}

// The fp32 bias rounded to bf16 in the workspace's bias slot (stream-ordered before the matmul that reads it).
const uint16_t* bias_bf16(const char* op, const float* bias, int OC, void* stream) {
  KILN_CHECK(OC <= kMaxBias, "cuda::", op, ": bias of ", OC, " entries (the bf16 bias copy holds ", kMaxBias, ")");
  auto* out = reinterpret_cast<uint16_t*>(workspace() + kLtWorkspace);
  simt::launch(round_bias_kernel, dim3(unsigned((OC + 255) / 256)), dim3(256), 0, as_stream(stream), out, bias, OC);
  return out;
}

void run(const LtCall& c, void* stream) {
  validate(c);
#if KILN_EMULATED
  KILN_CHECK(c.n <= 0x7fffffff, "cuda::", c.op, ": too many columns (", describe(c), ")");
  simt::launch(lt_emulated_kernel, dim3(unsigned(c.n)), dim3(1), 0, as_stream(stream), c);
#else
  char* ws = workspace();
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_handle) lt_check(cublasLtCreate(&g_handle), "cublasLtCreate", c);
  const void* C = c.beta != 0 ? c.C : c.D;
  PlanKey key{c.trans_a,   c.trans_b, c.m,     c.n,         c.k,         c.lda,       c.ldb,      c.ldc,
              int(c.cd),   int(c.epi), c.aux_ld, alignment(c.A), alignment(c.B), alignment(C), alignment(c.D)};
  auto it = g_plans.find(key);
  const bool fresh = it == g_plans.end();
  if (fresh) {
    Plan p;
    lt_check(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate", c);
    cublasOperation_t ta = c.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = c.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "set TRANSA", c);
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "set TRANSB", c);
    cublasLtEpilogue_t epi = c.epi == Epi::bias            ? CUBLASLT_EPILOGUE_BIAS
                             : c.epi == Epi::gelu_aux      ? CUBLASLT_EPILOGUE_GELU_AUX
                             : c.epi == Epi::gelu_aux_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                                                           : CUBLASLT_EPILOGUE_DEFAULT;
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), "set EPILOGUE",
             c);
    if (has_gelu(c.epi)) {
      int64_t ld = c.aux_ld;
      lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof ld),
               "set EPILOGUE_AUX_LD", c);
    }
    const cudaDataType cd = c.cd == Ty::bf16 ? CUDA_R_16BF : CUDA_R_32F;
    lt_check(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, c.trans_a ? c.k : c.m, c.trans_a ? c.m : c.k, c.lda),
             "cublasLtMatrixLayoutCreate(A)", c);
    lt_check(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, c.trans_b ? c.n : c.k, c.trans_b ? c.k : c.n, c.ldb),
             "cublasLtMatrixLayoutCreate(B)", c);
    lt_check(cublasLtMatrixLayoutCreate(&p.cd, cd, c.m, c.n, c.ldc), "cublasLtMatrixLayoutCreate(C/D)", c);
    it = g_plans.emplace(key, p).first;
  }
  Plan& p = it->second;
  // Pointers change from call to call; setting them on the cached descriptor is a host-side store.
  if (has_bias(c.epi))
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof c.bias),
             "set BIAS_POINTER", c);
  if (has_gelu(c.epi))
    lt_check(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &c.aux, sizeof c.aux),
             "set EPILOGUE_AUX_POINTER", c);
  if (fresh) {
    cublasLtMatmulPreference_t pref;
    lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate", c);
    uint64_t ws_bytes = kLtWorkspace;
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                  sizeof ws_bytes),
             "set MAX_WORKSPACE_BYTES", c);
    // The heuristic otherwise assumes 256-byte aligned operands; slices (attention heads, padded rows) are not.
    const cublasLtMatmulPreferenceAttributes_t which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) {
      uint32_t a = uint32_t(key[11 + i]);
      lt_check(cublasLtMatmulPreferenceSetAttribute(pref, which[i], &a, sizeof a), "set MIN_ALIGNMENT", c);
    }
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(g_handle, p.desc, p.a, p.b, p.cd, p.cd, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    lt_check(s, "cublasLtMatmulAlgoGetHeuristic", c);
    if (found == 0) {
      g_plans.erase(it);
      fail("cuda::", c.op, ": cuBLASLt has no algorithm for ", describe(c));
    }
    p.algo = result.algo;
  }
  lt_check(cublasLtMatmul(g_handle, p.desc, &c.alpha, c.A, p.a, c.B, p.b, &c.beta, C, p.cd, c.D, p.cd, &p.algo, ws,
                          kLtWorkspace, as_stream(stream)),
           "cublasLtMatmul", c);
#endif
}

}  // namespace

void matmul_forward(uint16_t* out, const uint16_t* inp, const uint16_t* weight, const float* bias, int64_t N, int C,
                    int OC, void* stream, uint16_t* gelu_pre) {
  if (N == 0) return;
  const uint16_t* b16 = bias ? bias_bf16("matmul_forward", bias, OC, stream) : nullptr;
  matmul_forward_bf16_bias(out, inp, weight, b16, N, C, OC, stream, gelu_pre);
}

void matmul_forward_bf16_bias(uint16_t* out, const uint16_t* inp, const uint16_t* weight, const uint16_t* bias,
                              int64_t N, int C, int OC, void* stream, uint16_t* gelu_pre) {
  if (N == 0) return;
  LtCall c = row_major("matmul_forward", false, false, N, OC, C, 1.0f, inp, C, weight, OC, 0.0f, Ty::bf16, nullptr,
                       out, OC);
  if (bias) c.bias = bias;
  if (gelu_pre && OC % 8 == 0) {
    c.epi = bias ? Epi::gelu_aux_bias : Epi::gelu_aux;
    c.aux = gelu_pre, c.aux_ld = OC;
    run(c, stream);
    return;
  }
  c.epi = bias ? Epi::bias : Epi::none;
  if (gelu_pre) c.D = gelu_pre;
  run(c, stream);
  if (gelu_pre) {
    const int64_t n = N * OC;
    const unsigned blocks = unsigned(std::min<int64_t>((n + 255) / 256, 65535));
    simt::launch(gelu_kernel, dim3(blocks), dim3(256), 0, as_stream(stream), out, gelu_pre, n);
  }
}

void matmul_forward_residual(float* out, const float* residual, const uint16_t* inp, const uint16_t* weight,
                             const float* bias, int64_t N, int C, int OC, void* stream) {
  if (N == 0) return;
  LtCall c = row_major("matmul_forward_residual", false, false, N, OC, C, 1.0f, inp, C, weight, OC, 1.0f, Ty::f32,
                       residual, out, OC);
  if (bias) c.epi = Epi::bias, c.bias = bias;  // fp32 D: the fp32 bias is D's type
  run(c, stream);
}

void matmul_backward(uint16_t* dinp, float* dweight, float* dbias, const uint16_t* dout, const uint16_t* inp,
                     const uint16_t* weight, int64_t N, int C, int OC, void* stream) {
  if (N == 0) return;
  if (dinp)
    run(row_major("matmul_backward (dinp)", false, true, N, C, OC, 1.0f, dout, OC, weight, OC, 0.0f, Ty::bf16,
                  nullptr, dinp, C),
        stream);
  if (dweight)
    run(row_major("matmul_backward (dweight)", true, false, C, OC, N, 1.0f, inp, C, dout, OC, 1.0f, Ty::f32, dweight,
                  dweight, OC),
        stream);
  if (dbias)
    simt::launch(bias_grad_kernel, dim3(unsigned((OC + 31) / 32)), dim3(32, kBiasRows),
                 size_t(32 * kBiasRows) * sizeof(float), as_stream(stream), dbias, dout, N, OC);
}

void linear_forward(uint16_t* out, int64_t ld_out, const uint16_t* inp, const uint16_t* weight, bool w_oc_c,
                    const float* bias, int64_t N, int C, int OC, void* stream) {
  if (N == 0) return;
  LtCall c = row_major("linear_forward (bf16)", false, w_oc_c, N, OC, C, 1.0f, inp, C, weight, w_oc_c ? C : OC, 0.0f,
                       Ty::bf16, nullptr, out, ld_out);
  if (bias) c.epi = Epi::bias, c.bias = bias_bf16("linear_forward", bias, OC, stream);
  run(c, stream);
}

void linear_forward(float* out, int64_t ld_out, const float* residual, const uint16_t* inp, const uint16_t* weight,
                    bool w_oc_c, const float* bias, int64_t N, int C, int OC, void* stream) {
  if (N == 0) return;
  LtCall c = row_major("linear_forward (fp32)", false, w_oc_c, N, OC, C, 1.0f, inp, C, weight, w_oc_c ? C : OC,
                       residual ? 1.0f : 0.0f, Ty::f32, residual, out, ld_out);
  if (bias) c.epi = Epi::bias, c.bias = bias;  // fp32 D: the fp32 bias is D's type
  run(c, stream);
}

void linear_backward(uint16_t* dinp, float* dweight, float* dbias, const uint16_t* dout, int64_t ld_dout,
                     const uint16_t* inp, const uint16_t* weight, bool w_oc_c, int64_t N, int C, int OC, void* stream) {
  if (N == 0) return;
  // dinp[N, C] = dout · Wᵀ: W [C, OC] is read transposed, W [OC, C] as stored.
  if (dinp)
    run(row_major("linear_backward (dinp)", false, !w_oc_c, N, C, OC, 1.0f, dout, ld_dout, weight, w_oc_c ? C : OC,
                  0.0f, Ty::bf16, nullptr, dinp, C),
        stream);
  // dW [C, OC] += inpᵀ · dout, or dW [OC, C] += doutᵀ · inp.
  if (dweight && !w_oc_c)
    run(row_major("linear_backward (dweight)", true, false, C, OC, N, 1.0f, inp, C, dout, ld_dout, 1.0f, Ty::f32,
                  dweight, dweight, OC),
        stream);
  if (dweight && w_oc_c)
    run(row_major("linear_backward (dweight)", true, false, OC, C, N, 1.0f, dout, ld_dout, inp, C, 1.0f, Ty::f32,
                  dweight, dweight, C),
        stream);
  if (dbias) {
    KILN_CHECK(ld_dout == OC, "cuda::linear_backward: a bias gradient needs dout rows of stride OC (", OC, "), got ",
               ld_dout);
    simt::launch(bias_grad_kernel, dim3(unsigned((OC + 31) / 32)), dim3(32, kBiasRows),
                 size_t(32 * kBiasRows) * sizeof(float), as_stream(stream), dbias, dout, N, OC);
  }
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
          const uint16_t* B, int64_t ldb, float beta, uint16_t* C, int64_t ldc, void* stream) {
  if (M == 0 || N == 0) return;
  run(row_major("gemm (bf16)", trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, Ty::bf16, C, C, ldc), stream);
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A, int64_t lda,
          const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc, void* stream) {
  if (M == 0 || N == 0) return;
  run(row_major("gemm (fp32)", trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, Ty::f32, C, C, ldc), stream);
}

}  // namespace kiln::cuda
