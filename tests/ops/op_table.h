// One table of op test cases (after ggml's test-backend-ops): every op's cases are declared once, in
// tests/ops/op_table.cpp, and tests/ops/op_runner.cpp runs each on every backend present (cpu::, and cuda:: on
// the SIMT emulator or on a real GPU) against the ref:: kernels.
//
// A case is a function from named float tensors to named float tensors, given three times: ref (the naive
// double-accumulating kernels of kernels/reference/), cpu and cuda (either may be absent: the CPU kernels are
// fp32 only, some CUDA kernels take only some shapes). Integer inputs (tokens, positions, targets, cu_seqlens)
// are fixed by the case and live in its closures. Tensor values are already representable in their storage
// type (bf16 inputs are rounded once when the case is built), so every side reads the same numbers.
//
// Tolerance: the runner evaluates the reference a second time on inputs perturbed by one rounding of their
// storage type (relative u·2^-24 for fp32, u·2^-9 for bf16, u uniform in [-1, 1]) and rounds that result to
// each output's storage type: the error a naive implementation at that precision makes from its inputs'
// rounding. Element i passes when
//   |backend − ref| <= k · (|yard_i − ref_i| + u·(|ref_i| + rms(ref)) + rms(yard − ref)):
// u·|ref_i| is one rounding of the output itself (u the unit roundoff of the backend's output type), u·rms(ref)
// the same at the tensor's typical magnitude (outputs that come from cancellation, exact zeros), rms(yard −
// ref) the floor where one element happens to be insensitive to its inputs; k (per case, default 4) is the
// number of such roundings a kernel may make in its chain of operations (sums of K terms: 4 + sqrt(K)).
// Cases with exact = true must match bit for bit.
//
// Gradient mode: the case's outputs are gradients. Besides the element-wise comparison with ref:: backward
// (above), each gradient is checked against a central finite difference of the case's loss (the double sum
// of the ref:: forward's outputs times fixed weights, usually dout) along a random direction.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace kiln::ops {

enum class DType { F32, BF16 };
enum class Mode { Forward, Gradient };

struct Tensor {
  std::string name;
  std::vector<float> v;
  DType dt = DType::F32;  // what the backend reads or writes it as
};
using Tensors = std::vector<Tensor>;
using OpFn = std::function<Tensors(const Tensors&)>;

// A finite-difference check: output `out` is the gradient of the loss with respect to input `in`, added
// onto input `init`'s values (-1: overwritten, starts from zero).
struct GradOf {
  int out, in, init = -1;
};

struct OpCase {
  std::string op;    // "layernorm", "rope", ...
  std::string name;  // the shape and variant, e.g. "N37 C72 bf16"
  Mode mode = Mode::Forward;
  Tensors inputs;
  OpFn ref, cpu, cuda;  // cpu / cuda empty: not run there
  double k = 4;         // tolerance factor over the yardstick
  bool exact = false;   // outputs must equal ref's bit for bit (copies, single additions) ...
  std::vector<int> exact_outputs;  // ... or just these ones
  // Gradient mode.
  std::function<double(const Tensors&, double* sq_sum)> loss;  // sq_sum: Σ terms² (rounding noise scale)
  std::vector<GradOf> grads;
  double fd_step = 1e-2;  // finite-difference step relative to the input's rms ...
  double fd_h = 0;        // ... or this absolute step when set
};

std::vector<OpCase> op_table();
void add_moe_cases(std::vector<OpCase>& t);  // tests/ops/op_table_moe.cpp

// Helpers for building cases (op_table.cpp) and backends.
float round_bf16(float x);
std::vector<float> round_to(std::vector<float> v, DType dt);
std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f, DType dt = DType::F32);
const char* dtype_name(DType dt);

}  // namespace kiln::ops
