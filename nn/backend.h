// The device the modules run on. Every module (nn/*.h) is written once against this interface, and a backend
// implements each op with its own kernels (the CPU backend kernels/cpu/, the CUDA backend kernels/cuda/). So the
// same module code serves training and decoding on each backend, and train/ applies the optimizer through the
// same object from outside the model.
//
// Types: the activations that matrix products read and write are `Act` (fp32 on the CPU; a GPU backend keeps
// them in bf16); the residual stream, norm statistics, log-sum-exps, losses, parameters and gradients are fp32
// everywhere (plain float*). Integer inputs (tokens, positions) are device arrays on a device backend.
// Gradient conventions follow kernels/*.h: parameter gradients accumulate (+=); a norm's dinp accumulates into
// the residual stream's gradient; a linear's dinp is overwritten.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "core/dtype.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/adaln.h"
#include "kernels/attention.h"
#include "kernels/decode_attention.h"
#include "kernels/flow.h"
#include "kernels/matmul_lowp.h"
#include "kernels/moe.h"
#include "kernels/narrow_gemv.h"
#include "kernels/rope.h"

namespace kiln::nn {

// An activation buffer in the backend's activation type.
struct Act {
  void* p = nullptr;
  DType dtype = DType::F32;
  explicit operator bool() const { return p != nullptr; }
  Act at(int64_t elems) const {
    return {p ? static_cast<char*>(p) + elems * int64_t(dtype_size(dtype)) : nullptr, dtype};
  }
  float* f32() const;  // checks the type
};

// Storage order of a weight matrix: Conv1D [in, out] (GPT-2's files) or nn.Linear [out, in].
enum class Layout : uint8_t { InOut, OutIn };

// A linear map y = x·W + b as the modules hold it: the fp32 weight and bias, their gradients (null when not
// training), and the 16-bit copy the products read under mixed precision (null: fp32 products).
struct Weight {
  const float* w = nullptr;
  const float* b = nullptr;
  float* dw = nullptr;
  float* db = nullptr;
  const uint16_t* w16 = nullptr;
  int in = 0, out = 0;
  Layout layout = Layout::OutIn;
  const NarrowMatrix* narrow = nullptr;  // decoding: a bf16/f16/q8_0 copy [out, in] the products read instead
};

// The largest shapes a plan will run, for the device scratch some kernels need (the CUDA backend reserves it
// once, at plan time, so a step allocates nothing). Zero fields need nothing.
struct OpScratch {
  int64_t rows = 0;                 // tokens per step (norm rows, embedding rows)
  int C = 0;                        // norm width
  int64_t head_groups = 0;          // per-head norms: rows·heads groups ...
  int HD = 0;                       // ... of HD values
  AttentionParams attention;        // the attention backward's shape (B·T rows; B = 0: none)
  DecodeAttentionParams decode;     // the decode attention's shape (B = 0: none)
  int64_t narrow_rows = 0;          // q8_0 narrow weights: rows of x per product ...
  int narrow_in = 0;                // ... of this many columns at most (cuda::narrow_gemm_scratch_bytes)
};

// Ops a backend does not implement fail with one line naming the op and the backend.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual DType act_dtype() const = 0;
  // The 16-bit type of the matrix products (Weight::w16 copies are in it), or nullopt for fp32 products.
  virtual std::optional<LowpType> lowp() const = 0;

  // Memory on this device.
  virtual void* alloc(size_t bytes, const char* what) = 0;
  virtual void free(void* p) = 0;
  virtual void upload(void* dst, const void* host, size_t bytes) = 0;
  virtual void download(void* host, const void* src, size_t bytes) = 0;
  virtual void memset(void* p, int value, size_t bytes) = 0;
  // True when this device's memory is the host's (the CPU): then the views below are the pointers themselves.
  virtual bool on_host() const { return false; }
  // Host data as the ops read it: on_host, `host` itself (no copy); else copied into `dst` (this device's).
  const void* from_host(void* dst, const void* host, size_t bytes) {
    if (on_host()) return host;
    upload(dst, host, bytes);
    return dst;
  }
  // Device data on the host: on_host, `src` itself; else copied into `host`.
  const void* to_host(void* host, const void* src, size_t bytes) {
    if (on_host()) return src;
    download(host, src, bytes);
    return host;
  }
  // Reserves the ops' scratch for a plan (see OpScratch); scratch_bytes: how much that is.
  virtual size_t scratch_bytes(const OpScratch& s) const { return 0; }
  virtual void reserve_scratch(const OpScratch& s) {}
  // Queries per sequence that one decode_attention call takes (longer prefixes are run in pieces).
  virtual int max_decode_queries() const { return 1 << 30; }

  // Linear layers. forward: y = x·W + b. residual: out = residual + x·W + b (out may alias residual: decoding
  // updates the stream in place). backward: dx = dy·Wᵀ (overwritten; null: not computed), dW += xᵀ·dy,
  // db += colsum(dy). ld: the row stride of y / dy (0: w.out; a GPU pads the LM head's logits rows). y may be an
  // fp32 buffer on any backend (the decoder's logits).
  virtual void linear_forward(Act y, Act x, const Weight& w, int64_t N, int64_t ld = 0);
  virtual void linear_residual(float* out, const float* residual, Act x, const Weight& w, int64_t N);
  virtual void linear_backward(Act dx, Act dy, Act x, const Weight& w, int64_t N, int64_t ld = 0);
  // The residual stream's gradient as a matrix product's operand (a view on the CPU; a cast into `scratch` on a
  // backend whose activations are narrower).
  virtual Act residual_operand(float* dres, Act scratch, int64_t n);

  // Norms over rows of C read the fp32 residual stream and write an activation.
  virtual void layernorm_forward(Act out, float* mean, float* rstd, const float* x, const float* w, const float* b,
                                 int64_t N, int C, float eps);
  virtual void layernorm_backward(float* dx, float* dw, float* db, Act dout, const float* x, const float* w,
                                  const float* mean, const float* rstd, int64_t N, int C);
  virtual void rmsnorm_forward(Act out, float* rstd, const float* x, const float* w, int64_t N, int C, float eps);
  virtual void rmsnorm_backward(float* dx, float* dw, Act dout, const float* x, const float* w, const float* rstd,
                                int64_t N, int C);
  // Per-head RMSNorm on activation rows (Qwen3's q/k norms): `heads` groups of C per row of stride ld.
  // backward overwrites din (which may alias dout).
  virtual void head_rmsnorm_forward(Act out, float* rstd, Act in, const float* w, int64_t N, int C, int heads,
                                    int64_t ld, float eps);
  virtual void head_rmsnorm_backward(Act din, float* dw, Act dout, Act in, const float* w, const float* rstd,
                                     int64_t N, int C, int heads, int64_t ld);
  // Rotary embedding in place (kernels/rope.h); inv_freq and pos live on this device.
  virtual void rope_forward(Act x, const int32_t* pos, int64_t N, const RopeParams& p);
  virtual void rope_backward(Act dx, const int32_t* pos, int64_t N, const RopeParams& p);

  // Activations (kernels/activation.h).
  virtual void activation_forward(Act out, Act in, int64_t n, Activation a);
  virtual void activation_backward(Act din, Act in, Act dout, int64_t n, Activation a);
  virtual void gated_forward(Act out, Act gate_up, int64_t N, int I, Activation a);
  virtual void gated_backward(Act dgate_up, Act gate_up, Act dout, int64_t N, int I, Activation a);
  // out = a + b in fp32.
  virtual void add(float* out, const float* a, const float* b, int64_t n);
  // N rows of `width` values from src (row stride ld_src) to dst (row stride ld_dst).
  virtual void copy_rows(Act dst, int64_t ld_dst, Act src, int64_t ld_src, int64_t N, int64_t width);

  // Normalizing-flow layers (kernels/flow.h), fp32 activations on every backend: actnorm, a coupling's gather of
  // its conditioning values into the MLP's input (xa, in the activation type) and its affine or additive map.
  // The coupling's index arrays, log-dets [B] and loss weights w [B] (double) are this device's.
  virtual void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B,
                               int C, int64_t HW);
  virtual void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x,
                                const float* logs, double wsum, int B, int C, int64_t HW);
  virtual void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C,
                               int64_t HW);
  virtual void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW);
  virtual void flow_gather(Act xa, const float* x, const FlowCoupling& c);
  virtual void flow_gather_backward(float* dx, Act dxa, const FlowCoupling& c);
  virtual void coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale,
                                const FlowCoupling& c);
  virtual void coupling_backward(float* dx, Act dout, float* dscale, const float* dy, const float* x,
                                 const float* out, const float* scale, const double* w, const FlowCoupling& c);
  virtual void coupling_inverse(float* x, const float* y, const float* out, const float* scale,
                                const FlowCoupling& c);
  // Pixel (un)shuffle of fp32 planes (kernels/upsample.h; a flow's squeeze is pixel_unshuffle with r = 2).
  virtual void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r);
  virtual void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r);

  // adaLN modulation (DiT; kernels/adaln.h): per-sample rows (stride ld) over B sequences of T tokens of C.
  // modulate: out = x·(1 + scale) + shift; gate: y = res + gate·u (fp32 stream and branch). Backward outputs
  // are overwritten.
  virtual void modulate_forward(Act out, Act x, Act shift, Act scale, int B, int T, int C, int64_t ld);
  virtual void modulate_backward(Act dx, Act dshift, Act dscale, Act dout, Act x, Act scale, int B, int T, int C,
                                 int64_t ld);
  virtual void gate_forward(float* y, const float* res, const float* u, Act gate, int B, int T, int C, int64_t ld);
  virtual void gate_backward(Act du, Act dgate, const float* dy, const float* u, Act gate, int B, int T, int C,
                             int64_t ld);

  // Attention over packed or fixed rows (kernels/attention.h; cu_seqlens, with max_seqlen and total_tokens set,
  // on this device), and against a KV cache (kernels/decode_attention.h; the q/k/v/out pointers of `p` are this
  // device's arrays in the activation type, past_per_seq is set and max_past bounds past + Tq).
  virtual void attention_forward(Act out, float* lse, Act qkv, const AttentionParams& p);
  virtual void attention_backward(Act dqkv, Act dout, Act qkv, Act out, const float* lse,
                                  const AttentionParams& p);
  virtual void decode_attention(const DecodeAttentionParams& p);
  // Writes the key and value heads of B·Tq fused qkv rows ([NH q | NKV k | NKV v] heads of HD) into a layer's
  // cache ([B][positions][NKV·HD], activation type) at positions past_b .. past_b + Tq − 1 of sequence b
  // (past: this device's [B]); with pages set, into the blocks of a paged cache instead (batch_stride unused).
  virtual void kv_append(Act k_cache, Act v_cache, int64_t batch_stride, Act qkv, int NH, int NKV, int HD, int B,
                         int Tq, const int32_t* past, const KVPages& pages = {});

  // Multi-head latent attention's glue (nn/mla.h). sum_heads: out[n][0, width) = Σ_h in[n·ld_in + h·head_stride
  // + [0, width)] (the shared rotary key's gradient from every head), out of row stride ld_out, overwritten.
  // rows_append: B·Tq rows of `width` values (row stride ld_src) into a per-sequence cache [B][positions][width]
  // (batch_stride between sequences) at positions past_b .. past_b + Tq − 1 (past: this device's [B]); with
  // pages set, into the blocks of a paged cache of rows of `width` instead (batch_stride unused).
  virtual void sum_heads(Act out, int64_t ld_out, Act in, int64_t ld_in, int64_t N, int heads, int64_t head_stride,
                         int width);
  virtual void rows_append(Act cache, int64_t batch_stride, Act src, int64_t ld_src, int width, int B, int Tq,
                           const int32_t* past, const KVPages& pages = {});

  // Mixture of experts (kernels/moe.h). Router logits, affinities and gate weights are fp32; indices, offsets
  // and slots are this device's int32 arrays. The grouped products read W stacked [E, out, in] (nn.Linear).
  virtual void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
                         const MoeRouting& r);
  virtual void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx,
                                  int64_t N, const MoeRouting& r);
  virtual void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N,
                            int K, int E);
  virtual void moe_gather(Act xs, Act x, const int32_t* row_token, int64_t R, int C);
  // dx += extra (may be null) + Σ_k dxs[slot]: the gather's backward.
  virtual void moe_gather_backward(Act dx, Act extra, Act dxs, const int32_t* slot, int64_t N, int K, int C);
  virtual void moe_combine(float* y, const float* residual, Act ys, const int32_t* slot, const float* w, int64_t N,
                           int K, int C);
  virtual void moe_combine_backward(Act dys, float* dw, Act dy, Act ys, const int32_t* slot, const float* w,
                                    int64_t N, int K, int C);
  virtual void grouped_linear_forward(Act y, int64_t ldy, Act x, const float* w, const int32_t* offsets, int E, int in,
                                      int out);
  // dx = beta·dx + dy·W_e (null: not computed); dw += the stacked weight gradient (null: not computed).
  virtual void grouped_linear_backward(Act dx, float beta, float* dw, Act dy, int64_t ldy, Act x, const float* w,
                                       const int32_t* offsets, int E, int in, int out);
  // The sequence-wise balance loss (kernels/moe.h): starts [S + 1] on the host.
  virtual double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                             const MoeRouting& r, float alpha);
  virtual void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                                    const MoeRouting& r, float scale);
  // load[e] += the rows expert e received (offsets[e + 1] − offsets[e]), fp32 on this device.
  virtual void moe_count(float* load, const int32_t* offsets, int E);

  // Embeddings: out[n] = wte[tokens[n]] (+ wpe[pos[n]] when wpe is set); backward accumulates.
  virtual void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte,
                                 const float* wpe, int64_t N, int C);
  virtual void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                                  const int32_t* pos, int64_t N, int C);
  // Fused softmax + cross-entropy (kernels/crossentropy.h); with grad_scale != 0 the logits become their gradient.
  virtual void softmax_crossentropy(Act logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                                    float grad_scale);

  // The optimizer's ops over flat fp32 blocks (kernels/adamw.h); param16, when set, receives the 16-bit copy.
  virtual void adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n,
                            const AdamWHyper& h);
  virtual double sum_squares(const float* x, int64_t n);
  virtual void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t);
  // out[r] = arg max of x[r·ld .. r·ld + n) (kernels/argmax.h's rule), rows on this device.
  virtual void argmax_rows(int32_t* out, const float* x, int64_t rows, int n, int64_t ld);
};

// The CPU backend (kernels/cpu/): fp32 activations; with `lowp` set, 16-bit matrix products.
std::unique_ptr<Backend> make_cpu_backend(std::optional<LowpType> lowp = std::nullopt);
// The GPU backend on the current device (gpu::init first): bf16 activations and products.
std::unique_ptr<Backend> make_cuda_backend();

}  // namespace kiln::nn
