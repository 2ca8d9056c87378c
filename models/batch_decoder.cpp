#include "models/batch_decoder.h"

#include <algorithm>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gpu.h"
#include "models/family.h"

namespace kiln {

const float* BatchDecoder::hidden() const {
  fail("decoder: this batch decoder keeps no hidden states (BatchDecoderOptions::keep_hidden)");
}

void BatchDecoder::keep_path(const int32_t*, int, int, const int32_t*, int) {
  fail("decoder: this batch decoder has no tree attention");
}

const float* BatchDecoder::stream() const {
  fail("decoder: this batch decoder keeps no streams (BatchDecoderOptions::keep_stream)");
}

const float* BatchDecoder::self_draft(int, const std::vector<DraftRow>&) {
  fail("decoder: this batch decoder has no multi-token-prediction modules to draft with");
}

const float* BatchDecoder::draft_hidden() const {
  fail("decoder: this batch decoder has no multi-token-prediction modules to draft with");
}

namespace {

// The passes of the rows not yet done (forward() and self_draft() share them): rows of one length share a pass,
// fresh prompts that fit a chunk (B rows through FlashAttention) and short continuations of cached sequences
// (speculative checks of K+1 tokens: the decode attention, per-sequence lengths), so the weights are read once
// for all of them; any other row runs in the pieces TransformerDecoder runs: whole chunks through FlashAttention
// while the cache is empty, then as many queries as the backend's decode attention takes.
// pass(indices, from, Tq, last) runs Tq positions of each of those rows from offset `from`.
template <class Row, class Pass>
void passes_by_length(const std::vector<Row>& rows, std::vector<bool>& done, int short_limit, const Pass& pass) {
  constexpr int kChunk = PagedDecoder::kMaxChunk;
  for (size_t i = 0; i < rows.size(); i++) {
    const Row& r = rows[i];
    const bool fresh = r.past == 0 && r.n <= kChunk, cont = r.past > 0 && r.n <= short_limit;
    if (done[i] || !(fresh || cont)) continue;
    std::vector<int> group;
    for (size_t j = i; j < rows.size(); j++)
      if (!done[j] && (rows[j].past == 0) == fresh && rows[j].n == r.n) {
        group.push_back(int(j));
        done[j] = true;
      }
    pass(group, 0, r.n, true);
  }
  for (size_t i = 0; i < rows.size(); i++) {
    if (done[i]) continue;
    const Row& r = rows[i];
    for (int d = 0; d < r.n;) {
      const int m = std::min(r.past + d == 0 ? kChunk : short_limit, r.n - d);
      pass(std::vector<int>{int(i)}, d, m, d + m == r.n);
      d += m;
    }
  }
}

}  // namespace

PagedDecoder::PagedDecoder(const ModelConfig& cfg, const float* params, const BatchDecoderOptions& opt)
    : cfg_(cfg), table_(model_param_table(cfg)), be_(make_backend_for(cfg, opt.cuda, std::nullopt)), block_size_(opt.block_size) {
  cfg_.validate("decoder config");
  max_pos_ = opt.max_positions > 0 ? opt.max_positions : cfg_.max_positions;
  KILN_CHECK(max_pos_ <= cfg_.max_positions, "decoder: max_positions ", max_pos_, " exceeds the model's context of ",
             cfg_.max_positions);
  KILN_CHECK(block_size_ >= 1, "decoder: the KV block size must be at least 1, got ", block_size_);
  KILN_CHECK(!opt.cuda || block_size_ % 64 == 0, "--device cuda: the KV block size must be a multiple of 64, got ",
             block_size_);
  const int per_seq = (max_pos_ + block_size_ - 1) / block_size_;
  num_blocks_ = opt.num_blocks > 0 ? opt.num_blocks : 8 * per_seq;
  keep_hidden_ = opt.keep_hidden;
  keep_stream_ = opt.keep_stream;
  if (opt.self_draft) {
    KILN_CHECK(cfg_.mtp_depth > 0, "MTP self-drafting: the model (", cfg_.family,
               ") has no multi-token-prediction modules (num_nextn_predict_layers)");
    mtp_ = cfg_.mtp_depth;
  }
  KILN_CHECK(!keep_hidden_ || !be_->on_host() || be_->act_dtype() == DType::F32,
             "decoder: hidden states (Medusa heads) need fp32 activations on the CPU");
  weights_.load(*be_, cfg_, table_, params, w_, opt.weights);
  // Latent attention caches c_KV and the rotary key per position in k_ (no values); the others keys and values.
  const size_t pool = size_t(cfg_.n_layer + mtp_) * size_t(num_blocks_) * size_t(block_size_) * size_t(cache_width()) *
                      dtype_size(be_->act_dtype());
  k_ = nn::DeviceBlock(*be_, pool, "KV cache blocks (keys)");
  // Zeroed: a GPU kernel reads whole tiles past the cached length (masked), which must not be NaN patterns.
  be_->memset(k_.data(), 0, pool);
  if (!cfg_.mla.on()) {
    v_ = nn::DeviceBlock(*be_, pool, "KV cache blocks (values)");
    be_->memset(v_.data(), 0, pool);
  }
}

int64_t PagedDecoder::cache_width() const {
  return cfg_.mla.on() ? cfg_.mla.kv_lora_rank + cfg_.mla.qk_rope_dim : cfg_.kv_dim();
}

void PagedDecoder::ensure(int64_t rows, int64_t B, int64_t table_entries, int64_t logit_rows) {
  if (rows <= rows_ && B <= max_b_ && table_entries <= table_cap_ && logit_rows <= logit_rows_) return;
  rows_ = std::max(rows_, rows);
  max_b_ = std::max(max_b_, B);
  table_cap_ = std::max(table_cap_, table_entries);
  logit_rows_ = std::max({logit_rows_, max_b_, logit_rows});
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  const bool device = !be_->on_host();
  const nn::BlockShape S = block_shape_all(cfg_);
  auto carve = [&](nn::Workspace& ws) {
    x_ = ws.f32(rows_ * C);
    last_ = ws.f32(max_b_ * C);
    ln_ = ws.act(std::max(rows_, max_b_) * C);
    mean_ = ws.f32(std::max(rows_, max_b_));
    rstd_ = ws.f32(std::max(rows_, max_b_));
    a_.allocate(ws, rows_, S, /*selective=*/false, /*decoding=*/true);
    if (S.moe) s_.moe.allocate(ws, rows_, S.moe);  // the router logits and gathered rows
    a_.h = nullptr;  // the stream is updated in place
    if (mtp_) {
      mtp_a_.allocate(ws, rows_, block_shape(cfg_, cfg_.n_layer), /*decoding=*/true);
      mtp_zeros_ = ws.f32(rows_ * C);
      prev_d_ = device ? ws.f32(rows_ * C) : nullptr;
    }
    logits_d_ = ws.f32(logit_rows_ * V);
    inputs_d_ = device ? ws.i32(2 * rows_ + max_b_ + table_cap_) : nullptr;
  };
  nn::Workspace measure(be_->act_dtype());
  carve(measure);
  ws_ = nn::Workspace(*be_, measure.peak(), "batch decoder activations");
  carve(ws_);
  nn::OpScratch ops;  // the decode attention's scratch for this many sequences against a whole context
  ops.decode.B = int(max_b_);
  ops.decode.Tq = int(std::min<int64_t>(rows_, std::min(kMaxChunk, be_->max_decode_queries())));
  ops.decode.max_past = max_pos_;
  ops.decode.NH = cfg_.n_head;
  ops.decode.NKV = cfg_.n_kv_head;
  ops.decode.HD = cfg_.head_dim;
  if (cfg_.mla.on()) {  // the absorbed form: one shared head of the cached latent row, values its first r floats
    ops.decode.NKV = 1;
    ops.decode.HD = int(cache_width());
    ops.decode.HDv = cfg_.mla.kv_lora_rank;
  }
  weights_.narrow.plan(ops, std::max(rows_, logit_rows_));
  be_->reserve_scratch(ops);
}

nn::KVLayer PagedDecoder::cache_layer(int layer, const int32_t* past_d, const int32_t* table_d, int64_t stride, int B,
                                      int Tq, bool fresh) const {
  const int64_t layer_pool = int64_t(num_blocks_) * block_size_ * cache_width();
  nn::KVLayer cache;
  cache.k = nn::Act{k_.data(), be_->act_dtype()}.at(layer * layer_pool);
  cache.v = nn::Act{v_.data(), be_->act_dtype()}.at(layer * layer_pool);  // null with latent attention
  cache.past = past_d;
  cache.max_positions = max_pos_;
  cache.B = B;
  cache.Tq = Tq;
  cache.fresh = fresh;
  cache.pages = KVPages{table_d, block_size_, stride};
  return cache;
}

int PagedDecoder::stage_row(int b, int B, int Tq, int64_t stride, int from, int past, const int32_t* tokens,
                            const int32_t* depth, const int32_t* blocks, int n_blocks) {
  const int64_t N = int64_t(B) * Tq;
  const int V = cfg_.vocab_size;
  int32_t *tok = inputs_.data(), *pos = tok + N, *pasts = pos + N, *table = pasts + B;
  const int p0 = past + from;
  KILN_CHECK(past >= 0 && int64_t(p0) + Tq <= max_pos_, "decoder: ", p0, " cached + ", Tq,
             " new positions exceed the context of ", max_pos_, " positions");
  KILN_CHECK(int64_t(n_blocks) * block_size_ >= int64_t(p0) + Tq, "decoder: ", n_blocks, " blocks of ", block_size_,
             " hold fewer than the ", p0 + Tq, " positions of a sequence");
  pasts[b] = p0;
  for (int i = 0; i < Tq; i++) {
    const int32_t t = tokens[from + i];
    KILN_CHECK(t >= 0 && t < V, "token id ", t, " is outside the model's vocabulary [0, ", V, ")");
    tok[b * Tq + i] = t;
    pos[b * Tq + i] = p0 + (depth ? depth[from + i] : i);  // a tree node's position is its depth's
  }
  for (int i = 0; i < n_blocks; i++) {
    KILN_CHECK(blocks[i] >= 0 && blocks[i] < num_blocks_, "decoder: block id ", blocks[i], " is outside the pool of ",
               num_blocks_, " blocks");
    table[b * stride + i] = blocks[i];
  }
  return p0;
}

const int32_t* PagedDecoder::stage(const std::vector<int32_t>& host) {
  return static_cast<const int32_t*>(be_->from_host(inputs_d_, host.data(), host.size() * sizeof(int32_t)));
}

const float* PagedDecoder::host_hidden(int64_t rows) {
  if (be_->on_host()) return ln_.f32();
  KILN_CHECK(be_->act_dtype() == DType::BF16, "decoder: a device's hidden states are bf16");
  // A device's final-norm rows are bf16: brought over and widened for the host heads (Medusa).
  const size_t n = size_t(rows) * size_t(cfg_.d_model);
  hidden16_.resize(n);
  hidden32_.resize(n);
  const uint16_t* h = static_cast<const uint16_t*>(be_->to_host(hidden16_.data(), ln_.p, n * sizeof(uint16_t)));
  for (size_t i = 0; i < n; i++) hidden32_[i] = bf16_to_f32(h[i]);
  return hidden32_.data();
}

void PagedDecoder::run_pass(const std::vector<BatchRow>& rows, const std::vector<int>& idx, int from, int Tq,
                            bool last) {
  const int B = int(idx.size()), C = cfg_.d_model, V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * Tq;
  int64_t stride = 1;
  bool all = false;  // some row wants every position's logits: the head runs over all N rows
  for (int i : idx) {
    stride = std::max<int64_t>(stride, rows[size_t(i)].n_blocks);
    all = all || rows[size_t(i)].all_logits;
  }
  ensure(N, B, B * stride, all ? N : B);
  // [tokens N | positions N | cached lengths B | block table B·stride]: one copy brings them to a device.
  inputs_.assign(size_t(2 * N + B + B * stride), 0);
  bool fresh = Tq > 1;
  const uint64_t* tree = rows[size_t(idx[0])].tree;  // one mask array for the pass (forward groups by it)
  for (int b = 0; b < B; b++) {
    const BatchRow& r = rows[size_t(idx[size_t(b)])];
    KILN_CHECK(r.tree == tree, "decoder: a pass mixes tree rows of different masks");
    fresh = stage_row(b, B, Tq, stride, from, r.past, r.tokens, tree ? r.depth : nullptr, r.blocks, r.n_blocks) == 0 &&
            fresh;
  }
  const int32_t* in = stage(inputs_);
  const int32_t *tok_d = in, *pos_d = in + N, *past_d = in + 2 * N, *table_d = in + 2 * N + B;
  const uint64_t* tree_d = tree;  // the masks in the backend's memory
  if (tree && !be_->on_host()) {
    if (!tree_d_.data()) tree_d_ = nn::DeviceBlock(*be_, 64 * sizeof(uint64_t), "tree masks");
    tree_d = static_cast<const uint64_t*>(be_->from_host(tree_d_.data(), tree, size_t(Tq) * sizeof(uint64_t)));
  }
  be_->embedding_forward(x_, tok_d, pos_d, w_.wte, w_.wpe, N, C);
  const AttentionParams flash = attention_params(cfg_, B, Tq);
  for (int l = 0; l < cfg_.n_layer; l++) {
    nn::KVLayer cache = cache_layer(l, past_d, table_d, stride, B, Tq, fresh);
    cache.tree = tree_d;
    w_.blocks[size_t(l)].forward(*be_, x_, x_, a_, s_, pos_d, flash, N, &cache);
  }
  if (keep_stream_) {  // x_ is fp32 in the backend's memory
    if (!be_->on_host()) pass_stream_.resize(size_t(N) * C);
    const float* xs = static_cast<const float*>(be_->to_host(pass_stream_.data(), x_, sizeof(float) * size_t(N) * C));
    for (int b = 0; b < B; b++)
      std::memcpy(stream_.data() + (stream_off_[size_t(idx[size_t(b)])] + size_t(from)) * C,
                  xs + int64_t(b) * Tq * C, sizeof(float) * size_t(Tq) * C);
  }
  if (!last && !all) return;
  const size_t bytes = sizeof(float) * size_t(V);
  if (all) {
    // Every row through the final norm and the head; each sequence takes all its rows or (not all_logits, last
    // piece) its last.
    w_.final_norm.forward(*be_, ln_, mean_, rstd_, x_, N);
    be_->linear_forward(nn::Act{logits_d_, DType::F32}, ln_, w_.head, N);
    if (keep_hidden_) {
      const float* h = host_hidden(N);
      for (int b = 0; b < B; b++) {
        const int i = idx[size_t(b)];
        const float* hb = h + size_t(b) * size_t(Tq) * C;
        if (rows[size_t(i)].all_logits)
          std::memcpy(hidden_.data() + (off_[size_t(i)] + size_t(from)) * C, hb, sizeof(float) * size_t(Tq) * C);
        else if (last)
          std::memcpy(hidden_.data() + off_[size_t(i)] * C, hb + size_t(Tq - 1) * C, sizeof(float) * C);
      }
    }
    if (!be_->on_host()) pass_logits_.resize(size_t(N) * size_t(V));
    const float* lg = static_cast<const float*>(be_->to_host(pass_logits_.data(), logits_d_, bytes * size_t(N)));
    for (int b = 0; b < B; b++) {
      const int i = idx[size_t(b)];
      const float* rb = lg + size_t(b) * size_t(Tq) * size_t(V);
      if (rows[size_t(i)].all_logits)
        std::memcpy(logits_.data() + (off_[size_t(i)] + size_t(from)) * V, rb, bytes * size_t(Tq));
      else if (last)
        std::memcpy(logits_.data() + off_[size_t(i)] * V, rb + size_t(Tq - 1) * V, bytes);
    }
    return;
  }
  // Each sequence's last row, through the final norm and the head.
  be_->copy_rows(nn::Act{last_, DType::F32}, C, nn::Act{x_ + int64_t(Tq - 1) * C, DType::F32}, int64_t(Tq) * C, B, C);
  w_.final_norm.forward(*be_, ln_, mean_, rstd_, last_, B);
  be_->linear_forward(nn::Act{logits_d_, DType::F32}, ln_, w_.head, B);
  if (keep_hidden_) {
    const float* h = host_hidden(B);
    for (int b = 0; b < B; b++)
      std::memcpy(hidden_.data() + off_[size_t(idx[size_t(b)])] * C, h + size_t(b) * C, sizeof(float) * C);
  }
  if (!be_->on_host()) pass_logits_.resize(size_t(B) * size_t(V));
  const float* lg = static_cast<const float*>(be_->to_host(pass_logits_.data(), logits_d_, bytes * size_t(B)));
  for (int b = 0; b < B; b++)
    std::memcpy(logits_.data() + off_[size_t(idx[size_t(b)])] * V, lg + size_t(b) * V, bytes);
}

const float* PagedDecoder::forward(const std::vector<BatchRow>& rows) {
  const int V = cfg_.vocab_size;
  // Where each row's logits go: one [V] vector, or n of them with all_logits.
  off_.resize(rows.size());
  size_t total = 0;
  for (size_t i = 0; i < rows.size(); i++) {
    KILN_CHECK(rows[i].n >= 1, "decoder: row ", i, " has no new tokens");
    off_[i] = total;
    total += rows[i].all_logits ? size_t(rows[i].n) : 1;
  }
  logits_.resize(total * size_t(V));
  if (keep_hidden_) hidden_.resize(total * size_t(cfg_.d_model));
  if (keep_stream_) {
    stream_off_.resize(rows.size());
    size_t n = 0;
    for (size_t i = 0; i < rows.size(); i++) stream_off_[i] = n, n += size_t(rows[i].n);
    stream_.resize(n * size_t(cfg_.d_model));
  }
  for (size_t i = 0; i < rows.size(); i++) {
    const BatchRow& r = rows[i];
    if (!r.tree) continue;
    KILN_CHECK(!cfg_.mla.on(), "decoder: tree attention is not written for latent attention (", cfg_.family, ")");
    KILN_CHECK(r.depth && r.all_logits && r.past > 0 && r.n >= 1 && r.n <= 64, "decoder: row ", i,
               " is a tree of ", r.n, " nodes (1 to 64, after a cached prefix, with depths and all logits)");
    KILN_CHECK(cfg_.sliding_window == 0, "decoder: tree attention has no sliding window (", cfg_.family, ")");
    for (int j = 0; j < r.n; j++)
      KILN_CHECK(r.depth[j] >= 0 && r.depth[j] <= j && ((r.tree[j] >> j) & 1) && (r.tree[j] >> j) == 1,
                 "decoder: tree node ", j, " of row ", i, " has a bad depth or mask (a node sees itself and earlier "
                 "nodes only)");
  }
  std::vector<bool> done_rows(rows.size(), false);
  // Tree rows: those of one size and mask array in one pass (the masks are the same for every sequence).
  for (size_t i = 0; i < rows.size(); i++) {
    if (!rows[i].tree || done_rows[i]) continue;
    std::vector<int> group;
    for (size_t j = i; j < rows.size(); j++)
      if (!done_rows[j] && rows[j].tree == rows[i].tree && rows[j].n == rows[i].n) {
        group.push_back(int(j));
        done_rows[j] = true;
      }
    run_pass(rows, group, 0, rows[i].n, true);
  }
  // Every single-token row in one pass, whatever its cached length.
  std::vector<int> singles;
  for (size_t i = 0; i < rows.size(); i++)
    if (rows[i].n == 1 && !rows[i].tree) {
      singles.push_back(int(i));
      done_rows[i] = true;
    }
  if (!singles.empty()) run_pass(rows, singles, 0, 1, true);
  passes_by_length(rows, done_rows, std::min(kMaxChunk, be_->max_decode_queries()),
                   [&](const std::vector<int>& idx, int from, int Tq, bool last) { run_pass(rows, idx, from, Tq, last); });
  return logits_.data();
}

// Module k over rows[idx] from `from`: each position's previous-depth hidden state and token, its key and value
// into the module's cache layer; the module's output to draft_hidden_, and with `last` each row's last position
// through the head norm (in the module) and the shared head.
void PagedDecoder::module_pass(int k, const std::vector<DraftRow>& rows, const std::vector<int>& idx, int from, int Tq,
                               bool last) {
  const int B = int(idx.size()), C = cfg_.d_model, V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * Tq;
  int64_t stride = 1;
  for (int i : idx) stride = std::max<int64_t>(stride, rows[size_t(i)].n_blocks);
  ensure(N, B, B * stride, B);
  inputs_.assign(size_t(2 * N + B + B * stride), 0);
  prev_.resize(size_t(N) * size_t(C));
  bool fresh = Tq > 1;
  for (int b = 0; b < B; b++) {
    const DraftRow& r = rows[size_t(idx[size_t(b)])];
    fresh = stage_row(b, B, Tq, stride, from, r.past, r.tokens, nullptr, r.blocks, r.n_blocks) == 0 && fresh;
    std::memcpy(prev_.data() + size_t(b) * size_t(Tq) * C, r.hidden + size_t(from) * C, sizeof(float) * size_t(Tq) * C);
  }
  const int32_t* in = stage(inputs_);
  const int32_t *tok_d = in, *pos_d = in + N, *past_d = in + 2 * N, *table_d = in + 2 * N + B;
  const nn::KVLayer cache = cache_layer(cfg_.n_layer + k - 1, past_d, table_d, stride, B, Tq, fresh);
  const size_t hidden_bytes = sizeof(float) * size_t(N) * C;
  const float* prev = static_cast<const float*>(be_->from_host(prev_d_, prev_.data(), hidden_bytes));
  be_->memset(mtp_zeros_, 0, hidden_bytes);
  w_.mtp[size_t(k - 1)].forward(*be_, mtp_a_, s_, prev, tok_d, w_.wte, pos_d, attention_params(cfg_, B, Tq), N,
                                mtp_zeros_, &cache);
  // The module's output (fp32 in the backend's memory) is the next depth's input.
  if (!be_->on_host()) pass_stream_.resize(size_t(N) * C);
  const float* h = static_cast<const float*>(be_->to_host(pass_stream_.data(), mtp_a_.h, hidden_bytes));
  for (int b = 0; b < B; b++)
    std::memcpy(draft_hidden_.data() + (draft_off_[size_t(idx[size_t(b)])] + size_t(from)) * C,
                h + int64_t(b) * Tq * C, sizeof(float) * size_t(Tq) * C);
  if (!last) return;
  be_->copy_rows(ln_, C, mtp_a_.ln.at(int64_t(Tq - 1) * C), int64_t(Tq) * C, B, C);
  be_->linear_forward(nn::Act{logits_d_, DType::F32}, ln_, w_.head, B);
  if (!be_->on_host()) pass_logits_.resize(size_t(B) * size_t(V));
  const float* lg = static_cast<const float*>(
      be_->to_host(pass_logits_.data(), logits_d_, sizeof(float) * size_t(B) * size_t(V)));
  for (int b = 0; b < B; b++)
    std::memcpy(draft_logits_.data() + size_t(idx[size_t(b)]) * V, lg + int64_t(b) * V, sizeof(float) * V);
}

const float* PagedDecoder::self_draft(int k, const std::vector<DraftRow>& rows) {
  KILN_CHECK(mtp_ > 0, "decoder: self-drafting needs BatchDecoderOptions::self_draft and a model with MTP modules");
  KILN_CHECK(k >= 1 && k <= mtp_, "decoder: draft ", k, " of a model with ", mtp_, " multi-token-prediction modules");
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  draft_off_.resize(rows.size());
  size_t total = 0;
  for (size_t i = 0; i < rows.size(); i++) {
    KILN_CHECK(rows[i].n >= 1 && rows[i].tokens && rows[i].hidden, "decoder: draft row ", i,
               " has no positions, tokens or hidden states");
    draft_off_[i] = total;
    total += size_t(rows[i].n);
  }
  draft_logits_.resize(rows.size() * size_t(V));
  draft_hidden_.resize(total * size_t(C));
  std::vector<bool> done(rows.size(), false);
  passes_by_length(rows, done, std::min(kMaxChunk, be_->max_decode_queries()),
                   [&](const std::vector<int>& idx, int from, int Tq, bool last) {
                     module_pass(k, rows, idx, from, Tq, last);
                   });
  return draft_logits_.data();
}

void PagedDecoder::keep_path(const int32_t* blocks, int n_blocks, int base, const int32_t* nodes, int m) {
  KILN_CHECK(base >= 0 && m >= 0 && int64_t(base) + m <= max_pos_, "decoder: keep_path of ", m, " nodes past ", base,
             " outside the context of ", max_pos_);
  const int64_t W = cache_width();
  const int64_t layer_pool = int64_t(num_blocks_) * block_size_ * W;
  // Slot j of the sequence: row blocks[j / block_size] * block_size + j % block_size of each layer's pool.
  auto slot = [&](int64_t j) {
    KILN_CHECK(j / block_size_ < n_blocks, "decoder: keep_path reads slot ", j, " past the sequence's ", n_blocks,
               " blocks");
    const int32_t blk = blocks[j / block_size_];
    KILN_CHECK(blk >= 0 && blk < num_blocks_, "decoder: block id ", blk, " is outside the pool of ", num_blocks_, " blocks");
    return (int64_t(blk) * block_size_ + j % block_size_) * W;
  };
  const nn::Act k{k_.data(), be_->act_dtype()}, v{v_.data(), be_->act_dtype()};
  for (int i = 0; i < m; i++) {
    KILN_CHECK(nodes[i] >= i && nodes[i] < 64 && (i == 0 || nodes[i] > nodes[i - 1]),
               "decoder: keep_path's nodes must increase within the tree");
    if (nodes[i] == i) continue;
    // One copy moves the slot's row in every layer (the layers' pools are layer_pool apart). dst < src in slot
    // order, and the backend runs copies in order: an earlier move never overwrites a later source.
    const int64_t dst = slot(base + i), src = slot(base + nodes[i]);
    be_->copy_rows(k.at(dst), layer_pool, k.at(src), layer_pool, cfg_.n_layer, W);
    if (v.p) be_->copy_rows(v.at(dst), layer_pool, v.at(src), layer_pool, cfg_.n_layer, W);
  }
}

std::unique_ptr<BatchDecoder> make_batch_decoder(const ModelConfig& cfg, const float* params,
                                                 const BatchDecoderOptions& opt) {
  return std::make_unique<PagedDecoder>(cfg, params, opt);
}

}  // namespace kiln
