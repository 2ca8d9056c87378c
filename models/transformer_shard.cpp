// The Transformer's sharded storage (ZeRO stages 2 and 3, models/model.h ShardOptions): the units, their working
// slots, and the calls into the ShardExchange that the forward and backward make (the same on every rank, and the
// same again in idle_pass for a rank without tokens).
#include <algorithm>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "models/family.h"
#include "models/transformer.h"

namespace kiln {

std::vector<size_t> shard_unit_bounds(const ModelConfig& cfg, const ParamTable& t) {
  const int L = cfg.n_layer;
  if (L < 1) return {};
  std::vector<size_t> first(size_t(L), SIZE_MAX), end(size_t(L), 0);
  for (const ParamSpec& s : t.specs) {
    int l = -1;
    if (std::sscanf(s.key.c_str(), "blk.%d.", &l) != 1 || l < 0 || l >= L) continue;
    first[size_t(l)] = std::min(first[size_t(l)], s.offset);
    end[size_t(l)] = std::max(end[size_t(l)], s.offset + size_t(s.numel()));
  }
  // The back starts at the first other tensor past the last layer (its MTP modules or the final norm).
  size_t back = t.total;
  for (const ParamSpec& s : t.specs) {
    int l = -1;
    const bool layer = std::sscanf(s.key.c_str(), "blk.%d.", &l) == 1 && l >= 0 && l < L;
    if (!layer && s.offset >= end[size_t(L - 1)]) back = std::min(back, s.offset);
  }
  std::vector<size_t> b(size_t(L) + 3);
  b[0] = 0;
  for (int l = 0; l < L; l++) b[size_t(l) + 1] = first[size_t(l)];
  b[size_t(L) + 1] = back;
  b[size_t(L) + 2] = t.total;
  for (int l = 0; l < L; l++)
    if (first[size_t(l)] == SIZE_MAX || end[size_t(l)] > b[size_t(l) + 2] || b[size_t(l) + 1] < b[size_t(l)]) return {};
  // Every other tensor lies wholly in the front or the back.
  for (const ParamSpec& s : t.specs) {
    int l = -1;
    if (std::sscanf(s.key.c_str(), "blk.%d.", &l) == 1 && l >= 0 && l < L) continue;
    if (!(s.offset + size_t(s.numel()) <= b[1] || s.offset >= back)) return {};
  }
  return b;
}

namespace {

struct SlotSizes {
  size_t front = 0, back = 0, layer = 0;
  int layer_slots = 0;
};

SlotSizes slot_sizes(const ModelConfig& cfg, const std::vector<size_t>& b) {
  SlotSizes s;
  const int L = cfg.n_layer;
  s.front = b[1] - b[0];
  s.back = b[size_t(L) + 2] - b[size_t(L) + 1];
  for (int l = 0; l < L; l++) s.layer = std::max(s.layer, b[size_t(l) + 2] - b[size_t(l) + 1]);
  s.layer_slots = std::min(L, 2);
  return s;
}

}  // namespace

size_t shard_buffer_bytes(const ModelConfig& cfg, int stage, bool lowp) {
  if (stage < 2) return 0;
  const std::vector<size_t> b = shard_unit_bounds(cfg, model_param_table(cfg));
  if (b.empty()) return 0;
  const SlotSizes s = slot_sizes(cfg, b);
  const size_t floats = s.front + s.back + size_t(s.layer_slots) * s.layer;
  size_t bytes = floats * sizeof(float);                                           // gradients
  if (stage >= 3) bytes += floats * (sizeof(float) + (lowp ? sizeof(uint16_t) : 0));  // parameters
  return bytes;
}

int Transformer::slot_of(int u) const {
  if (u == 0) return 0;
  if (u == cfg_.n_layer + 1) return 1;
  return 2 + (u - 1) % 2;
}

std::vector<std::pair<size_t, size_t>> Transformer::units() const {
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t u = 0; u + 1 < unit_.size(); u++) out.emplace_back(unit_[u], unit_[u + 1]);
  return out;
}

void Transformer::shard_setup(const ModelOptions& opt) {
  shard_ = opt.shard;
  const size_t n = table_.total;
  KILN_CHECK(shard_.stage <= 3, "ZeRO stage ", shard_.stage, ": stages 2 and 3 shard a model's storage");
  KILN_CHECK(shard_.begin <= shard_.end && shard_.end <= n, "ZeRO segment [", shard_.begin, ", ", shard_.end,
             ") is outside the parameter block of ", n, " floats");
  unit_ = shard_unit_bounds(cfg_, table_);
  KILN_CHECK(!unit_.empty(), "ZeRO stage ", shard_.stage, ": the parameter table of this ", cfg_.family,
             " model does not hold its layers as contiguous ranges in order");
  const size_t seg = shard_.end - shard_.begin;
  auto zeroed = [&](size_t bytes, const char* what) {
    nn::DeviceBlock d;
    if (bytes == 0) return d;
    d = nn::DeviceBlock(*be_, bytes, what);
    be_->memset(d.data(), 0, bytes);
    return d;
  };
  gshard_buf_ = zeroed(seg * sizeof(float), "gradient shard");
  if (shard_.stage >= 3) {
    pshard_buf_ = zeroed(seg * sizeof(float), "parameter shard");
  } else {
    params_buf_ = zeroed(n * sizeof(float), "parameters");
    params_ = params_buf_.as<float>();
    if (be_->lowp()) {
      params16_buf_ = zeroed(n * sizeof(uint16_t), "16-bit weight copy");
      params16_ = params16_buf_.as<uint16_t>();
    }
  }
  const SlotSizes s = slot_sizes(cfg_, unit_);
  const size_t floats[4] = {s.front, s.back, s.layer_slots > 0 ? s.layer : 0, s.layer_slots > 1 ? s.layer : 0};
  for (int i = 0; i < 4; i++) {
    Slot& sl = slots_[i];
    sl.floats = floats[i];
    sl.g = zeroed(floats[i] * sizeof(float), "gradient buffer");
    if (shard_.stage >= 3) {
      sl.p = zeroed(floats[i] * sizeof(float), "parameter buffer");
      if (be_->lowp()) sl.p16 = zeroed(floats[i] * sizeof(uint16_t), "16-bit parameter buffer");
    }
  }
  shard_bind();
}

// Every tensor in its unit's slot (gradients; at stage 3 also parameters), or in the whole block.
void Transformer::shard_bind() {
  w_.bind(cfg_, table_, [&](size_t off) {
    const int u = int(std::upper_bound(unit_.begin(), unit_.end(), off) - unit_.begin()) - 1;
    Slot& s = slots_[slot_of(u)];
    const size_t at = off - unit_[size_t(u)];
    TensorHome h;
    h.g = s.g.as<float>() + at;
    if (shard_.stage >= 3) {
      h.p = s.p.as<float>() + at;
      h.p16 = s.p16.data() ? s.p16.as<uint16_t>() + at : nullptr;
    } else {
      h.p = params_ + off;
      h.p16 = params16_ ? params16_ + off : nullptr;
    }
    return h;
  }, inv_freq_buf_.as<float>());
}

void Transformer::use_params(int u, int next) {
  if (shard_.stage < 3) return;
  KILN_CHECK(ex_, "ZeRO stage 3: the model has no shard exchange (data parallelism sets it)");
  Slot& s = slots_[slot_of(u)];
  if (s.holds != u) {
    if (s.fetching != u) {
      if (s.fetching >= 0) ex_->wait_fetch(s.fetching);
      ex_->fetch(u, s.p.as<float>());
    }
    ex_->wait_fetch(u);
    s.fetching = -1;
    s.holds = u;
    // The 16-bit copy of the unit's matrices (not the learned positions, which no product reads).
    if (s.p16.data())
      for (const ParamSpec& sp : table_.specs)
        if (sp.offset >= unit_[size_t(u)] && sp.offset < unit_[size_t(u) + 1] && sp.shape.ndim == 2 &&
            sp.key != "position_embd.weight") {
          const size_t at = sp.offset - unit_[size_t(u)];
          be_->to_lowp(s.p16.as<uint16_t>() + at, s.p.as<float>() + at, sp.numel(), *be_->lowp());
        }
  }
  if (next < 0 || next == u) return;
  Slot& t = slots_[slot_of(next)];
  if (&t == &s || t.holds == next || t.fetching == next) return;
  if (t.fetching >= 0) ex_->wait_fetch(t.fetching);
  t.holds = -1;
  ex_->fetch(next, t.p.as<float>());
  t.fetching = next;
}

void Transformer::grad_begin(int u) {
  if (!sharded()) return;
  Slot& s = slots_[slot_of(u)];
  if (s.reducing >= 0) ex_->wait_reduce(s.reducing);
  s.reducing = -1;
  be_->memset(s.g.data(), 0, unit_size(u) * sizeof(float));
}

void Transformer::grad_end(int u) {
  if (!sharded()) return;
  KILN_CHECK(ex_, "ZeRO stage ", shard_.stage, ": the model has no shard exchange (data parallelism sets it)");
  Slot& s = slots_[slot_of(u)];
  ex_->reduce(u, s.g.as<float>());
  s.reducing = u;
}

void Transformer::shard_forward_begin(bool train) {
  const int L = cfg_.n_layer;
  // Parameters may have changed since the last forward (an optimizer step): every unit is fetched again.
  for (Slot& s : slots_) {
    if (s.fetching >= 0) ex_->wait_fetch(s.fetching);
    s.fetching = s.holds = -1;
  }
  use_params(0, L + 1);
  use_params(L + 1, 1);
  if (!train) return;
  // The front and back gradients are written from the forward on (the LM head's backward runs there).
  grad_begin(0);
  grad_begin(L + 1);
}

void Transformer::shard_backward_end() {
  grad_end(0);
  grad_end(cfg_.n_layer + 1);
}

std::vector<std::pair<int, bool>> Transformer::backward_visits() const {
  const int L = cfg_.n_layer;
  std::vector<std::pair<int, bool>> v;
  if (a_.policy.kind != RecomputePolicy::Every) {
    for (int l = L - 1; l >= 0; l--) v.emplace_back(l, true);
    return v;
  }
  const int K = a_.policy.k;
  for (int seg = (L - 1) / K; seg >= 0; seg--) {
    const int s = seg * K, e = std::min(L, s + K);
    for (int l = s; l < e; l++) v.emplace_back(l, false);
    for (int l = e - 1; l >= s; l--) v.emplace_back(l, true);
  }
  return v;
}

// The forward's and backward's exchange calls without their computation, in the same order.
void Transformer::idle_pass(bool train) {
  if (!sharded()) return;
  const int L = cfg_.n_layer;
  shard_forward_begin(train);
  for (int l = 0; l < L; l++) use_params(1 + l, l + 1 < L ? 2 + l : -1);
  if (!train) return;
  const std::vector<std::pair<int, bool>> visits = backward_visits();
  for (size_t i = 0; i < visits.size(); i++) {
    const auto [l, back] = visits[i];
    use_params(1 + l, i + 1 < visits.size() ? 1 + visits[i + 1].first : -1);
    if (!back) continue;
    grad_begin(1 + l);
    grad_end(1 + l);
  }
  shard_backward_end();
}

}  // namespace kiln
