#include "infer/medusa.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "kernels/argmax.h"

namespace kiln {

namespace {
bool bfs_less(const std::vector<int>& a, const std::vector<int>& b) {
  return a.size() != b.size() ? a.size() < b.size() : a < b;
}
std::string item_str(const std::vector<int>& p) {
  std::string s;
  for (size_t i = 0; i < p.size(); i++) {
    if (i) s += ',';
    s += std::to_string(p[i]);
  }
  return s;
}

}  // namespace

MedusaTree MedusaTree::parse(const std::string& text) {
  MedusaTree t;
  size_t i = 0;
  while (i <= text.size()) {
    size_t j = text.find(';', i);
    if (j == std::string::npos) j = text.size();
    const std::string item = text.substr(i, j - i);
    std::vector<int> path;
    size_t a = 0;
    while (a <= item.size()) {
      size_t b = item.find(',', a);
      if (b == std::string::npos) b = item.size();
      const std::string r = item.substr(a, b - a);
      size_t used = 0;
      int v = -1;
      try {
        v = std::stoi(r, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      KILN_CHECK(used == r.size() && !r.empty() && v >= 0 && v < 64, "--medusa-tree: node '", item,
                 "' is not a path of ranks like 0,1,0");
      path.push_back(v);
      a = b + 1;
    }
    t.nodes.push_back(path);
    i = j + 1;
  }
  std::sort(t.nodes.begin(), t.nodes.end(), bfs_less);
  for (size_t n = 0; n < t.nodes.size(); n++) {
    KILN_CHECK(n == 0 || t.nodes[n] != t.nodes[n - 1], "--medusa-tree: node ", item_str(t.nodes[n]), " repeats a path");
    const std::vector<int>& p = t.nodes[n];
    if (p.size() > 1) {
      const std::vector<int> parent(p.begin(), p.end() - 1);
      KILN_CHECK(std::binary_search(t.nodes.begin(), t.nodes.end(), parent, bfs_less), "--medusa-tree: node ",
                 item_str(p), " has no parent node in the tree");
    }
  }
  KILN_CHECK(t.nodes.size() + 1 <= 64, "--medusa-tree: at most 63 nodes (a pass takes 64 with the root), got ",
             t.nodes.size());
  return t;
}

MedusaTree MedusaTree::default_tree() {
  return parse("0;1;2;3;0,0;0,1;0,2;1,0;1,1;2,0;0,0,0;0,0,1;0,1,0;1,0,0;0,0,0,0");
}

int MedusaTree::depth() const {
  int d = 0;
  for (const auto& p : nodes) d = std::max(d, int(p.size()));
  return d;
}

std::string MedusaTree::str() const {
  std::string s;
  for (size_t i = 0; i < nodes.size(); i++) {
    if (i) s += ';';
    s += item_str(nodes[i]);
  }
  return s;
}

MedusaLayout::MedusaLayout(const MedusaTree& tree, int K) {
  for (const auto& p : tree.nodes)
    if (int(p.size()) <= K) nodes.push_back(p);
  n_all = int(nodes.size()) + 1;
  parent.assign(size_t(n_all), -1);
  depth.assign(size_t(n_all), 0);
  width.assign(size_t(std::max(K, 0)), 0);
  mask.assign(size_t(n_all), 1);
  for (int i = 1; i < n_all; i++) {
    const std::vector<int>& p = nodes[size_t(i - 1)];
    depth[size_t(i)] = int(p.size());
    depth_used = std::max(depth_used, int(p.size()));
    width[p.size() - 1] = std::max(width[p.size() - 1], p.back() + 1);
    if (p.size() > 1) {
      const std::vector<int> up(p.begin(), p.end() - 1);
      parent[size_t(i)] = int(std::find(nodes.begin(), nodes.end(), up) - nodes.begin()) + 1;
    } else {
      parent[size_t(i)] = 0;
    }
    mask[size_t(i)] = mask[size_t(parent[size_t(i)])] | (uint64_t(1) << i);
  }
  children.resize(size_t(n_all));
  for (int i = 1; i < n_all; i++) children[size_t(parent[size_t(i)])].push_back(i);
}

int MedusaLayout::fill(int32_t root, const std::vector<std::vector<int32_t>>& top, int n, int32_t* tokens) const {
  // A prefix of the breadth-first order is a tree too; nodes whose rank the vocabulary lacks are cut with what
  // follows (rare: only with a tiny vocabulary).
  n = std::min(n, n_all);
  for (int i = 1; i < n; i++) {
    const std::vector<int>& p = nodes[size_t(i - 1)];
    if (p.back() >= int(top[p.size() - 1].size())) {
      n = i;
      break;
    }
  }
  tokens[0] = root;
  for (int i = 1; i < n; i++) {
    const std::vector<int>& p = nodes[size_t(i - 1)];
    tokens[i] = top[p.size() - 1][size_t(p.back())];
  }
  return n;
}

int32_t MedusaLayout::greedy_path(const int32_t* tokens, int n, const float* logits, int V, int SV,
                                  std::vector<int32_t>& path) const {
  path.assign(1, 0);
  int cur = 0;
  for (;;) {
    const float* x = logits + size_t(cur) * size_t(V);
    const int32_t want = argmax(x, SV);  // the greedy sampler's rule
    int next = -1;
    for (int c : children[size_t(cur)])
      if (c < n && tokens[c] == want) next = c;
    if (next < 0) return want;
    path.push_back(next);
    cur = next;
  }
}

void MedusaLayout::typical_path(const int32_t* tokens, int n, const float* logits, int V, int SV, float temp,
                                float threshold, float alpha, std::vector<int32_t>& path) const {
  thread_local std::vector<double> prob;
  prob.resize(size_t(SV));
  std::vector<int> best_len(static_cast<size_t>(n));
  path.assign(1, 0);
  int cur = 0;
  // ok[i]: node i's token is typical under its parent's tempered distribution; best_len: the longest chain of
  // such nodes below i (children after parents in the order, so walk backwards).
  std::vector<char> ok(size_t(n), 0);
  for (int p = 0; p < n; p++) {
    bool any = false;
    for (int c : children[size_t(p)]) any |= c < n;
    if (!any) continue;
    const float* x = logits + size_t(p) * size_t(V);
    float mx = x[0];
    for (int v = 1; v < SV; v++) mx = std::max(mx, x[v]);
    double sum = 0, ent = 0;
    for (int v = 0; v < SV; v++) sum += (prob[size_t(v)] = std::exp((x[v] - mx) / temp));
    for (int v = 0; v < SV; v++) {
      const double q = prob[size_t(v)] / sum;
      if (q > 0) ent -= q * std::log(q);
    }
    const double bar = std::min(double(threshold), double(alpha) * std::exp(-ent));
    for (int c : children[size_t(p)])
      if (c < n) ok[size_t(c)] = prob[size_t(tokens[c])] / sum > bar;
  }
  for (int i = n - 1; i >= 0; i--) {
    best_len[size_t(i)] = 0;
    for (int c : children[size_t(i)])
      if (c < n && ok[size_t(c)]) best_len[size_t(i)] = std::max(best_len[size_t(i)], 1 + best_len[size_t(c)]);
  }
  while (best_len[size_t(cur)] > 0) {
    for (int c : children[size_t(cur)])
      if (c < n && ok[size_t(c)] && 1 + best_len[size_t(c)] == best_len[size_t(cur)]) {
        cur = c;
        break;
      }
    path.push_back(cur);
  }
}

FinishReason generate_medusa(IncrementalDecoder& dec, const nn::MedusaHeads& heads, const Sampler& sampler_in,
                             const std::vector<int32_t>& prompt, const GenerateLimits& lim,
                             const MedusaParams& mp, const std::function<bool(int32_t)>& on_token,
                             MedusaStats* stats) {
  using Clock = std::chrono::steady_clock;
  const ModelConfig& cfg = dec.config();
  const nn::MedusaShape& hs = heads.shape;
  KILN_CHECK(dec.batch() == 1, "medusa: the decoder must have batch 1");
  KILN_CHECK(hs.C == cfg.d_model && hs.V == cfg.vocab_size, "medusa: heads of width ", hs.C, " and vocabulary ", hs.V,
             " on a model of ", cfg.d_model, " and ", cfg.vocab_size);
  KILN_CHECK(!prompt.empty(), "generate: the prompt is empty");
  KILN_CHECK(lim.max_new >= 0, "--max-new must be >= 0, got ", lim.max_new);
  KILN_CHECK(mp.typical || sampler_in.params().greedy(), "medusa: sampling (temperature > 0) needs typical "
             "acceptance (--typical-threshold / --typical-alpha); greedy acceptance is for --temperature 0");
  KILN_CHECK(mp.typical_threshold > 0 && mp.typical_alpha > 0, "--typical-threshold and --typical-alpha must be > 0");
  const int V = cfg.vocab_size, C = cfg.d_model;
  const int SV = lim.sample_vocab > 0 ? std::min(lim.sample_vocab, V) : V;
  const int max_len = std::min(lim.max_length > 0 ? lim.max_length : dec.max_positions(), dec.max_positions());
  const int P = int(prompt.size());
  KILN_CHECK(P <= max_len, "the prompt has ", P, " tokens, more than the model's context of ", max_len,
             " positions");

  const MedusaLayout L(mp.tree, hs.K);
  const int n_all = L.n_all, depth_used = L.depth_used;
  const std::vector<int>& width = L.width;

  MedusaStats st;
  st.base.prompt_tokens = P;
  st.depth = depth_used;
  st.tree_nodes = n_all;
  if (stats) *stats = st;
  if (lim.max_new == 0) return FinishReason::Length;
  if (P == max_len) return FinishReason::Context;

  Sampler sampler = sampler_in;
  const float temp = sampler.params().temperature;
  dec.reset();
  const auto t0 = Clock::now();
  const float* lg = dec.forward(prompt.data(), P);
  std::vector<float> h(dec.hidden(), dec.hidden() + C);  // the last position's hidden state
  int32_t root = sampler.sample(lg, SV);

  std::vector<float> head_logits(static_cast<size_t>(V)), u(static_cast<size_t>(C)), z(static_cast<size_t>(C));
  std::vector<std::vector<int32_t>> top(static_cast<size_t>(hs.K));
  std::vector<int32_t> tokens(static_cast<size_t>(n_all)), ids(static_cast<size_t>(V)), path;
  FinishReason why = FinishReason::Length;
  bool first = true;
  auto emit = [&](int32_t t, FinishReason& r) {  // false: generation ends at t
    st.base.new_tokens++;
    if (first) {
      st.base.prefill_s = std::chrono::duration<double>(Clock::now() - t0).count();
      first = false;
    }
    if (!on_token(t)) return r = FinishReason::Stop, false;
    if (lim.eot && t == *lim.eot) return r = FinishReason::EndOfText, false;
    if (st.base.new_tokens >= lim.max_new) return r = FinishReason::Length, false;
    if (P + st.base.new_tokens >= max_len) return r = FinishReason::Context, false;
    return true;
  };
  for (;;) {
    if (!emit(root, why)) break;
    const int base = dec.length();  // the cache holds every token before root
    // Candidates: each head's top choices on h, most likely first (ids below the sample vocabulary).
    for (int k = 0; k < depth_used; k++) {
      if (width[size_t(k)] == 0) continue;
      heads.forward_head(k, h.data(), 1, head_logits.data(), u.data(), z.data());
      for (int v = 0; v < SV; v++) ids[size_t(v)] = v;
      const int w = std::min(width[size_t(k)], SV);
      std::partial_sort(ids.begin(), ids.begin() + w, ids.begin() + SV, [&](int32_t a, int32_t b) {
        return head_logits[size_t(a)] > head_logits[size_t(b)] || (head_logits[size_t(a)] == head_logits[size_t(b)] && a < b);
      });
      top[size_t(k)].assign(ids.begin(), ids.begin() + w);
    }
    const int n = L.fill(root, top, std::min(n_all, max_len - base), tokens.data());
    const float* tl = dec.forward_tree(tokens.data(), n, L.depth.data(), L.mask.data());
    st.base.decode_steps++;
    st.rounds++;
    // Acceptance: the path from the root.
    path.assign(1, 0);
    int cur = 0;
    if (!mp.typical || sampler.params().greedy()) {
      root = L.greedy_path(tokens.data(), n, tl, V, SV, path);
      cur = path.back();
    } else {
      L.typical_path(tokens.data(), n, tl, V, SV, temp, mp.typical_threshold, mp.typical_alpha, path);
      cur = path.back();
      root = sampler.sample(tl + size_t(cur) * V, SV);
    }
    h.assign(dec.hidden() + size_t(cur) * C, dec.hidden() + size_t(cur + 1) * C);
    dec.keep_path(base, path.data(), int(path.size()));
    st.accepted += int64_t(path.size()) - 1;
    bool done = false;
    for (size_t i = 1; i < path.size() && !done; i++) done = !emit(tokens[size_t(path[i])], why);
    if (done) break;
  }
  st.base.decode_s = std::chrono::duration<double>(Clock::now() - t0).count() - st.base.prefill_s;
  if (stats) *stats = st;
  return why;
}

}  // namespace kiln
