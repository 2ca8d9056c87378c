#include "serve/engine.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <unordered_map>

#include "core/error.h"
#include "infer/sampler.h"
#include "infer/speculative.h"
#include "serve/request.h"
#include "serve/stop_text.h"

namespace kiln::serve {

using Clock = std::chrono::steady_clock;

// ---- Job ----

Job::Job(std::vector<std::vector<int32_t>> prompts, std::vector<int> max_new, JobParams params)
    : arrived(Clock::now()), prompts_(std::move(prompts)), max_new_(std::move(max_new)), params_(std::move(params)) {}

bool Job::wait(std::vector<ChoiceEvent>& out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(m_);
  cv_.wait_for(lk, timeout, [&] { return !events_.empty() || finished_ == int(prompts_.size()) || !error_.empty(); });
  if (events_.empty()) return false;
  while (!events_.empty()) {
    out.push_back(std::move(events_.front()));
    events_.pop_front();
  }
  return true;
}

bool Job::done() const {
  std::lock_guard<std::mutex> lk(m_);
  return (finished_ == int(prompts_.size()) || !error_.empty()) && events_.empty();
}

std::string Job::error() const {
  std::lock_guard<std::mutex> lk(m_);
  return error_;
}

void Job::push(ChoiceEvent e) {
  {
    std::lock_guard<std::mutex> lk(m_);
    if (!e.finish.empty()) finished_++;
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

void Job::fail(const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(m_);
    if (error_.empty()) error_ = why.empty() ? "failed" : why;
  }
  cv_.notify_all();
}

// ---- Engine ----

struct Engine::Seq {
  std::shared_ptr<Job> job;
  int index = 0;
  std::vector<int32_t> tokens;  // prompt, then the generated tokens
  int prompt_len = 0, cached = 0, generated = 0, max_new = 0;
  std::vector<int32_t> blocks;
  Sampler sampler;
  StopText text;
  std::unordered_map<int32_t, int> counts;  // generated tokens (the penalties)
  bool published = false, done = false;
  Clock::time_point last;
  // Speculative decoding: the draft's cache holds tokens[0, dcached); this step's k proposals, the draft's
  // distribution at each, and what the target checks ([last token, proposals]). rng: the acceptance draws.
  int dcached = 0, k = 0, n = 0;  // n: this step's new target positions
  int tn = 0;                     // Medusa tree: this step's nodes (0: no tree row)
  std::vector<int32_t> drafts, feed, produced;
  std::vector<std::vector<double>> qs;
  std::vector<float> hid;  // Medusa: the hidden state behind the newest token
  LookupState lookup;      // prompt lookup: the adaptive proposal length
  // MTP self-drafting: per module k (0-based) its cached length and the token its entry at each position read;
  // per depth d the hidden states of positions [hbase[d], hbase[d] + rows) (d = 0: the target's stream).
  std::vector<int> mlen, hbase;
  std::vector<std::vector<int32_t>> mused;
  std::vector<std::vector<float>> hrows;
  Rng rng;
  Seq(const SamplingParams& sp, std::vector<std::string> stop)
      : sampler(sp), text(std::move(stop)), rng(sp.seed ^ 0x5bd1e995ull) {}
};

Engine::Engine(BatchDecoder& dec, const Tokenizer& tok, const EngineOptions& opt, Metrics& metrics)
    : dec_(dec), tok_(tok), opt_(opt), metrics_(metrics),
      pool_(dec.num_blocks(), dec.block_size(), opt.prefix_cache && !opt.mtp) {
  if (opt_.sample_vocab <= 0 || opt_.sample_vocab > dec.config().vocab_size) opt_.sample_vocab = dec.config().vocab_size;
  metrics_.kv_total_blocks = pool_.num_blocks();
  if (BatchDecoder* d = opt_.draft) {
    KILN_CHECK(d->block_size() == dec.block_size() && d->num_blocks() == dec.num_blocks(),
               "--draft-model: its KV pool (", d->num_blocks(), " blocks of ", d->block_size(),
               ") differs from the target's (", dec.num_blocks(), " of ", dec.block_size(), ")");
    KILN_CHECK(d->max_positions() >= dec.max_positions(), "--draft-model: its context of ", d->max_positions(),
               " positions is shorter than the served context of ", dec.max_positions());
    KILN_CHECK(d->config().vocab_size >= opt_.sample_vocab, "--draft-model: its vocabulary has ",
               d->config().vocab_size, " tokens, fewer than the ", opt_.sample_vocab, " the server samples from");
    KILN_CHECK(opt_.draft_tokens >= 1 && opt_.draft_tokens <= kMaxDraftTokens, "--draft-tokens must be in [1, ",
               kMaxDraftTokens, "], got ", opt_.draft_tokens);
  }
  if (const nn::MedusaHeads* h = opt_.medusa) {
    KILN_CHECK(!opt_.draft, "give at most one of --medusa and --draft-model");
    KILN_CHECK(h->shape.C == dec.config().d_model && h->shape.V == dec.config().vocab_size,
               "--medusa: the heads' shape (C ", h->shape.C, ", V ", h->shape.V, ") does not match the model's");
    KILN_CHECK(opt_.draft_tokens >= 1 && opt_.draft_tokens <= h->shape.K, "--medusa-tokens must be in [1, ",
               h->shape.K, "] (the heads), got ", opt_.draft_tokens);
    dec.hidden();  // throws unless the decoder keeps hidden states
    if (opt_.medusa_tree) layout_.emplace(*opt_.medusa_tree, h->shape.K);
  }
  if (opt_.mtp) {
    KILN_CHECK(!opt_.draft && !opt_.medusa, "give at most one of MTP self-drafting, --medusa and --draft-model");
    const int D = dec.self_draft_depth();
    KILN_CHECK(D > 0, "MTP self-drafting: the decoder has no multi-token-prediction modules (", dec.config().family,
               " model; BatchDecoderOptions::self_draft)");
    KILN_CHECK(opt_.draft_tokens >= 1 && opt_.draft_tokens <= std::min(D, kMaxDraftTokens), "--draft-tokens ",
               opt_.draft_tokens, ": the model has ", D, " multi-token-prediction module", D == 1 ? "" : "s",
               ", so MTP self-drafting proposes 1 to ", std::min(D, kMaxDraftTokens), " tokens a round");
    dec.stream();  // throws unless the decoder keeps the streams
  }
  if (const auto& lp = opt_.prompt_lookup) {
    KILN_CHECK(!opt_.draft && !opt_.medusa && !opt_.mtp,
               "give at most one of --prompt-lookup, --draft-model, --medusa and MTP self-drafting");
    KILN_CHECK(opt_.draft_tokens >= 1 && opt_.draft_tokens <= kMaxDraftTokens, "--draft-tokens must be in [1, ",
               kMaxDraftTokens, "], got ", opt_.draft_tokens);
    lp->validate();
  }
  KILN_CHECK(!opt_.medusa_tree || opt_.medusa, "--medusa-tree needs --medusa");
  KILN_CHECK(!opt_.medusa_typical || opt_.medusa_tree, "--typical-threshold / --typical-alpha need --medusa-tree");
  KILN_CHECK(opt_.typical_threshold > 0 && opt_.typical_alpha > 0, "--typical-threshold and --typical-alpha must be > 0");
}

Engine::~Engine() { stop(); }

void Engine::start() { thread_ = std::thread([this] { loop(); }); }

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lk(m_);
  for (auto& j : waiting_) j->fail("the server is shutting down");
  waiting_.clear();
  for (auto& s : running_) {
    s->job->fail("the server is shutting down");
    pool_.release(s->blocks);
  }
  running_.clear();
}

void Engine::submit(const std::shared_ptr<Job>& job) {
  int need = 0;
  for (int i = 0; i < job->choices(); i++)
    need += pool_.blocks_for(int(job->prompts()[size_t(i)].size()) + job->max_new()[size_t(i)]);
  if (job->choices() > opt_.parallel)
    throw ApiError(400, str("the request has ", job->choices(), " choices (prompts times n), more than the ",
                            opt_.parallel, " sequences the server runs at once (--parallel)"),
                   "invalid_request_error", "too_many_choices", "n");
  if (need > pool_.num_blocks())
    throw ApiError(400, str("the request needs ", need, " KV-cache blocks of ", pool_.block_size(),
                            " positions, more than the cache's ", pool_.num_blocks(),
                            " (lower max_tokens or n, or start the server with more --kv-blocks)"),
                   "invalid_request_error", "context_length_exceeded", "max_tokens");
  {
    std::lock_guard<std::mutex> lk(m_);
    if (stop_) throw ApiError(503, "the server is shutting down", "server_error", "shutting_down");
    if (int(waiting_.size()) >= opt_.max_queue)
      throw ApiError(503, str("the server is busy: ", waiting_.size(), " requests are queued (--max-queue)"),
                     "server_error", "server_overloaded");
    waiting_.push_back(job);
    metrics_.queued = int64_t(waiting_.size());
  }
  cv_.notify_all();
}

// Under m_: moves queued jobs into the batch, first come first served, while slots and blocks allow.
void Engine::admit() {
  while (!waiting_.empty()) {
    std::shared_ptr<Job> job = waiting_.front();
    if (job->cancelled()) {
      waiting_.pop_front();
      continue;
    }
    if (int(running_.size()) + job->choices() > opt_.parallel) break;
    std::vector<std::unique_ptr<Seq>> seqs;
    bool ok = true;
    for (int i = 0; i < job->choices() && ok; i++) {
      const JobParams& p = job->params();
      SamplingParams sp;
      sp.temperature = p.temperature;
      sp.top_k = p.top_k;
      sp.top_p = p.top_p;
      // Choice i draws from seed + i; without a seed, from the system's entropy.
      sp.seed = p.seed ? *p.seed + uint64_t(i) : (uint64_t(std::random_device{}()) << 32 | std::random_device{}());
      auto s = std::make_unique<Seq>(sp, p.stop);
      s->job = job;
      s->index = i;
      s->tokens = job->prompts()[size_t(i)];
      s->prompt_len = int(s->tokens.size());
      s->max_new = job->max_new()[size_t(i)];
      ok = pool_.acquire(s->tokens, s->prompt_len + s->max_new, s->blocks, s->cached);
      s->dcached = s->cached;  // shared prompt blocks hold the draft's keys too
      if (opt_.mtp && p.presence_penalty == 0 && p.frequency_penalty == 0) {  // a sequence that may draft
        const int D = dec_.self_draft_depth();
        s->mlen.assign(size_t(D), 0);
        s->hbase.assign(size_t(D), 0);
        s->mused.assign(size_t(D), std::vector<int32_t>(size_t(s->prompt_len + s->max_new), -1));
        s->hrows.assign(size_t(D), {});
      }
      if (ok) seqs.push_back(std::move(s));
    }
    if (!ok) {
      for (auto& s : seqs) pool_.release(s->blocks);
      break;
    }
    waiting_.pop_front();
    for (auto& s : seqs) {
      metrics_.prompt_tokens += s->prompt_len;
      metrics_.prefix_cached_tokens += s->cached;
      running_.push_back(std::move(s));
    }
  }
  metrics_.queued = int64_t(waiting_.size());
}

void Engine::finish(Seq& s, const std::string& reason) {
  if (s.done) return;
  s.done = true;
  pool_.release(s.blocks);
  s.blocks.clear();
  (void)reason;
}

const float* Engine::penalised(const Seq& s, const float* logits) {
  const JobParams& p = s.job->params();
  if (p.presence_penalty == 0 && p.frequency_penalty == 0) return logits;
  const int V = opt_.sample_vocab;
  thread_local std::vector<float> adj;
  adj.assign(logits, logits + V);
  for (const auto& [t, c] : s.counts)
    if (t < V) adj[size_t(t)] -= p.frequency_penalty * float(c) + p.presence_penalty;
  return adj.data();
}

void Engine::sample(Seq& s, const float* logits) {
  logits = penalised(s, logits);
  const int32_t t = s.sampler.sample(logits, opt_.sample_vocab);
  emit(s, t, logits);
}

void Engine::emit(Seq& s, int32_t t, const float* logits) {
  if (!s.published) {  // the prompt's KV is complete: its full blocks may serve later prompts
    pool_.publish(std::vector<int32_t>(s.tokens.begin(), s.tokens.begin() + s.prompt_len), s.blocks);
    s.published = true;
  }
  const int V = opt_.sample_vocab;
  const JobParams& p = s.job->params();
  ChoiceEvent e;
  e.index = s.index;
  if (p.logprobs) {
    // log softmax of the (penalised) logits, the model's own distribution before temperature and filters.
    double m = -INFINITY;
    for (int i = 0; i < V; i++) m = std::max(m, double(logits[i]));
    double z = 0;
    for (int i = 0; i < V; i++) z += std::exp(double(logits[i]) - m);
    const double lz = m + std::log(z);
    TokenLogprob lp;
    lp.id = t;
    lp.logprob = float(double(logits[t]) - lz);
    if (p.top_logprobs > 0) {
      std::vector<int32_t> ids(static_cast<size_t>(V));
      for (int i = 0; i < V; i++) ids[size_t(i)] = i;
      const int k = std::min(p.top_logprobs, V);
      std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
      });
      for (int i = 0; i < k; i++) lp.top.push_back({ids[size_t(i)], float(double(logits[ids[size_t(i)]]) - lz)});
    }
    e.logprobs.push_back(std::move(lp));
  }
  s.generated++;
  s.tokens.push_back(t);
  s.counts[t]++;
  e.tokens = s.generated;
  const auto now = Clock::now();
  metrics_.generation_tokens++;
  if (s.generated == 1)
    metrics_.ttft.observe(std::chrono::duration<double>(now - s.job->arrived).count());
  else
    metrics_.itl.observe(std::chrono::duration<double>(now - s.last).count());
  s.last = now;
  if (opt_.eot && t == *opt_.eot) {  // the end-of-text token has no text
    e.text = s.text.finish();
    e.finish = "stop";
  } else {
    e.text = s.text.push(tok_.decode_token(uint32_t(t)));
    if (s.text.stopped()) {
      e.finish = "stop";
    } else if (s.generated >= s.max_new) {
      e.text += s.text.finish();
      e.finish = "length";
    }
  }
  const bool last = !e.finish.empty();
  s.job->push(std::move(e));
  if (last) finish(s, "done");
}

// The draft's side of a step: the prompt chunks the target reads this step (so both caches hold every prompt,
// and a published prompt block holds both models' keys), then k proposals for each drafting sequence, one
// batched forward per proposal: the first takes in the committed tokens the draft has not seen (the newest, or
// two when every proposal of the last round passed), the others one proposal each.
void Engine::propose(const std::vector<Seq*>& prefill, const std::vector<Seq*>& drafting) {
  BatchDecoder& d = *opt_.draft;
  const int DV = d.config().vocab_size, V = opt_.sample_vocab;
  int kmax = 0;
  for (Seq* s : drafting) {
    kmax = std::max(kmax, s->k);
    s->drafts.clear();
    if (int(s->qs.size()) < s->k) s->qs.resize(size_t(s->k));
  }
  std::vector<BatchRow> rows;
  std::vector<Seq*> who;
  for (int i = 0; i < std::max(kmax, prefill.empty() ? 0 : 1); i++) {
    rows.clear();
    who.clear();
    auto add = [&](Seq* s, const int32_t* t, int n, int past) {
      BatchRow r;
      r.tokens = t;
      r.n = n;
      r.past = past;
      r.blocks = s->blocks.data();
      r.n_blocks = int(s->blocks.size());
      rows.push_back(r);
      who.push_back(s);
    };
    if (i == 0)
      for (Seq* s : prefill) {
        add(s, s->tokens.data() + s->dcached, s->n, s->dcached);
        s->dcached += s->n;
      }
    const size_t first_proposal = rows.size();
    for (Seq* s : drafting) {
      if (s->k <= i) continue;
      const int T = int(s->tokens.size());
      if (i == 0)
        add(s, s->tokens.data() + s->dcached, T - s->dcached, s->dcached);
      else
        add(s, &s->drafts[size_t(i - 1)], 1, T + i - 1);
    }
    if (rows.empty()) continue;
    const float* logits = d.forward(rows);
    for (size_t r = first_proposal; r < rows.size(); r++) {
      Seq& s = *who[r];
      std::vector<double>& q = s.qs[size_t(i)];
      dense_distribution(s.sampler, logits + r * size_t(DV), V, q);
      s.drafts.push_back(sample_dense(q, s.rng));
    }
  }
}

namespace {

// Depth d's hidden states from position `at` on: the rows from `at` are replaced by n new ones (at is at most one
// past the last row kept).
void put_rows(std::vector<float>& rows, int base, int at, const float* src, int n, int C) {
  KILN_CHECK(at >= base && size_t(at - base) * size_t(C) <= rows.size(), "engine: MTP hidden states of position ", at,
             " do not follow those kept (", base, " + ", rows.size() / size_t(C), ")");
  rows.resize(size_t(at - base) * size_t(C));
  rows.insert(rows.end(), src, src + size_t(n) * size_t(C));
}

}  // namespace

void Engine::mtp_commit(Seq& s, const float* stream, int past, int valid) {
  if (s.mlen.empty()) return;  // a sequence that never drafts
  const int C = dec_.config().d_model, D = int(s.mlen.size()), T = int(s.tokens.size());
  put_rows(s.hrows[0], s.hbase[0], past, stream, valid, C);
  int bound = past;  // depth k's hidden states changed from here on
  for (int k = 0; k < D; k++) {
    int& m = s.mlen[size_t(k)];
    m = std::min(m, bound);
    // Only the last entries can have read a draft: module k + 1 at position i reads token i + k + 1.
    for (int i = std::max(0, m - D - 1); i < m; i++) {
      const int at = i + k + 1;
      if (at >= T || s.mused[size_t(k)][size_t(i)] != s.tokens[size_t(at)]) {
        m = i;
        break;
      }
    }
    if (k + 1 < D) {  // the module's outputs (depth k + 1) are valid where its entries are
      std::vector<float>& h = s.hrows[size_t(k + 1)];
      h.resize(std::min(h.size(), size_t(std::max(0, m - s.hbase[size_t(k + 1)])) * size_t(C)));
    }
    bound = m;
  }
}

// Draft j of every drafting sequence from module j in one batched pass: the module first takes in the positions
// it has not cached (or holds stale entries for) up to the newest cached one, whose output is the guess.
void Engine::propose_mtp(const std::vector<Seq*>& drafting) {
  const int C = dec_.config().d_model, D = dec_.self_draft_depth(), V = opt_.sample_vocab;
  const size_t TV = size_t(dec_.config().vocab_size);
  int kmax = 0;
  for (Seq* s : drafting) {
    kmax = std::max(kmax, s->k);
    s->drafts.clear();
    if (int(s->qs.size()) < s->k) s->qs.resize(size_t(s->k));
  }
  std::vector<DraftRow> rows;
  std::vector<Seq*> who;
  std::vector<std::vector<int32_t>> toks(drafting.size());
  for (int j = 1; j <= kmax; j++) {
    const size_t d = size_t(j - 1);  // module j reads depth j − 1
    rows.clear();
    who.clear();
    for (Seq* s : drafting) {
      if (s->k < j) continue;
      const int L = s->cached, T = int(s->tokens.size());
      const int start = std::min(s->mlen[d], L - 1);
      // Depth d's rows before `start` are no longer needed (entries below it read committed tokens only).
      std::vector<float>& h = s->hrows[d];
      const int drop = std::min(start - s->hbase[d], int(h.size() / size_t(C)));
      h.erase(h.begin(), h.begin() + std::ptrdiff_t(drop) * C);
      s->hbase[d] += drop;
      KILN_CHECK(s->hbase[d] <= start && s->hbase[d] + int(h.size() / size_t(C)) >= L, "engine: MTP depth ", d,
                 " holds positions ", s->hbase[d], " + ", h.size() / size_t(C), ", not ", start, " .. ", L - 1);
      std::vector<int32_t>& t = toks[who.size()];
      t.resize(size_t(L - start));
      for (int i = start; i < L; i++) {
        const int at = i + j;  // this round's drafts follow the tokens
        t[size_t(i - start)] = at < T ? s->tokens[size_t(at)] : s->drafts[size_t(at - T)];
      }
      DraftRow r;
      r.tokens = t.data();
      r.hidden = h.data() + size_t(start - s->hbase[d]) * size_t(C);
      r.n = L - start;
      r.past = start;
      r.blocks = s->blocks.data();
      r.n_blocks = int(s->blocks.size());
      rows.push_back(r);
      who.push_back(s);
    }
    if (rows.empty()) break;
    const float* lg = dec_.self_draft(j, rows);
    const float* out = dec_.draft_hidden();
    size_t off = 0;
    for (size_t r = 0; r < rows.size(); r++) {
      Seq& s = *who[r];
      for (int i = 0; i < rows[r].n; i++) s.mused[d][size_t(rows[r].past + i)] = rows[r].tokens[i];
      s.mlen[d] = s.cached;
      if (j < D) put_rows(s.hrows[d + 1], s.hbase[d + 1], rows[r].past, out + off * size_t(C), rows[r].n, C);
      off += size_t(rows[r].n);
      dense_distribution(s.sampler, lg + r * TV, V, s.qs[d]);
      s.drafts.push_back(sample_dense(s.qs[d], s.rng));
    }
  }
}

void Engine::propose_medusa(const std::vector<Seq*>& drafting) {
  const nn::MedusaHeads& h = *opt_.medusa;
  const int C = h.shape.C, HV = h.shape.V, V = opt_.sample_vocab;
  thread_local std::vector<float> in, out, u, z;
  std::vector<Seq*> who;
  for (Seq* s : drafting) s->drafts.clear();
  for (int j = 0; j < opt_.draft_tokens; j++) {
    who.clear();
    for (Seq* s : drafting)
      if (s->k > j) who.push_back(s);
    if (who.empty()) break;
    const int64_t n = int64_t(who.size());
    in.resize(size_t(n) * C);
    out.resize(size_t(n) * HV);
    u.resize(size_t(n) * C);
    z.resize(size_t(n) * C);
    for (int64_t b = 0; b < n; b++) std::copy(who[size_t(b)]->hid.begin(), who[size_t(b)]->hid.end(), in.begin() + b * C);
    h.forward_head(j, in.data(), n, out.data(), u.data(), z.data());
    for (int64_t b = 0; b < n; b++) {
      Seq& s = *who[size_t(b)];
      const float* lg = out.data() + b * HV;
      int32_t best = 0;  // the arg max, the lowest id among equal maxima (the sampler's rule)
      for (int32_t i = 1; i < V; i++)
        if (lg[i] > lg[best]) best = i;
      s.drafts.push_back(best);
      if (int(s.qs.size()) <= j) s.qs.resize(size_t(j) + 1);
      s.qs[size_t(j)].assign(size_t(V), 0.0);  // a deterministic proposal: q is one-hot
      s.qs[size_t(j)][size_t(best)] = 1.0;
    }
  }
}

// Each drafting sequence's proposals from its own tokens; k becomes their number (0: a plain step).
void Engine::propose_lookup(const std::vector<Seq*>& drafting) {
  for (Seq* s : drafting) {
    lookup_draft(s->tokens.data(), int(s->tokens.size()), *opt_.prompt_lookup, s->k, opt_.sample_vocab, s->lookup,
                 s->drafts, s->qs);
    s->k = int(s->drafts.size());
  }
}

void Engine::propose_tree(const std::vector<Seq*>& trees) {
  const nn::MedusaHeads& h = *opt_.medusa;
  const MedusaLayout& L = *layout_;
  const int C = h.shape.C, HV = h.shape.V, V = opt_.sample_vocab;
  thread_local std::vector<float> in, out, u, z;
  thread_local std::vector<int32_t> ids;
  const int64_t n = int64_t(trees.size());
  in.resize(size_t(n) * C);
  for (int64_t b = 0; b < n; b++) std::copy(trees[size_t(b)]->hid.begin(), trees[size_t(b)]->hid.end(), in.begin() + b * C);
  out.resize(size_t(n) * HV);
  u.resize(size_t(n) * C);
  z.resize(size_t(n) * C);
  ids.resize(size_t(V));
  // Each head once over every sequence's hidden state; its top choices (the ranks the tree names) per sequence.
  std::vector<std::vector<std::vector<int32_t>>> top(size_t(n), std::vector<std::vector<int32_t>>(size_t(h.shape.K)));
  for (int k = 0; k < L.depth_used; k++) {
    const int w = std::min(L.width[size_t(k)], V);
    if (w == 0) continue;
    h.forward_head(k, in.data(), n, out.data(), u.data(), z.data());
    for (int64_t b = 0; b < n; b++) {
      const float* lg = out.data() + b * HV;
      for (int v = 0; v < V; v++) ids[size_t(v)] = v;
      std::partial_sort(ids.begin(), ids.begin() + w, ids.end(), [&](int32_t a, int32_t c) {
        return lg[a] > lg[c] || (lg[a] == lg[c] && a < c);
      });
      top[size_t(b)][size_t(k)].assign(ids.begin(), ids.begin() + w);
    }
  }
  for (int64_t b = 0; b < n; b++) {
    Seq& s = *trees[size_t(b)];
    s.feed.resize(size_t(L.n_all));
    s.tn = L.fill(s.tokens.back(), top[size_t(b)], s.tn, s.feed.data());
  }
}

void Engine::step() {
  for (auto& s : running_)
    if (s->job->cancelled()) finish(*s, "cancelled");
  std::erase_if(running_, [](const std::unique_ptr<Seq>& s) { return s->done; });
  if (running_.empty()) return;
  std::vector<Seq*> who, prefill, drafting, trees;
  int budget = opt_.prefill_chunk;
  for (auto& s : running_) {
    const int avail = int(s->tokens.size()) - s->cached;
    s->k = 0;
    s->tn = 0;
    if (avail > 1) {  // prompt positions: within the step's prefill budget
      s->n = std::min(avail, budget);
      if (s->n <= 0) continue;
      budget -= s->n;
      prefill.push_back(s.get());
    } else {
      s->n = 1;
      const JobParams& p = s->job->params();
      // Proposals: at most K, and no more than max_tokens leaves room to produce after them (which also keeps
      // every position checked inside the sequence's blocks and the context).
      if ((opt_.draft || opt_.medusa || opt_.mtp || opt_.prompt_lookup) && p.presence_penalty == 0 &&
          p.frequency_penalty == 0)
        s->k = std::max(0, std::min(opt_.draft_tokens, s->max_new - s->generated - 1));
      if (opt_.medusa && s->hid.empty()) s->k = 0;  // a one-token prompt: no hidden state yet
      if (opt_.mtp && s->cached == 0) s->k = 0;     // the modules draft from a cached position
      if (s->k > 0 && layout_ && (s->sampler.params().greedy() || opt_.medusa_typical)) {
        // A tree instead of the chain: its nodes take slots cached .. cached + tn - 1, within the blocks held
        // (prompt + max_tokens) and the context.
        const int room = std::min(s->prompt_len + s->max_new, dec_.max_positions()) - s->cached;
        s->tn = std::min(layout_->n_all, room);
        s->k = 0;
        if (s->tn >= 2) trees.push_back(s.get());
        else s->tn = 0;
      }
      if (s->k > 0) drafting.push_back(s.get());
    }
    who.push_back(s.get());
  }
  if (opt_.draft) propose(prefill, drafting);
  if (opt_.medusa) propose_medusa(drafting);
  if (opt_.mtp) propose_mtp(drafting);
  if (opt_.prompt_lookup) propose_lookup(drafting);
  if (!trees.empty()) propose_tree(trees);
  std::vector<BatchRow> rows;
  for (Seq* s : who) {
    BatchRow r;
    if (s->tn > 0) {  // the newest token as the root and its candidate tree, every node's logits
      r.tokens = s->feed.data();
      r.n = s->tn;
      r.all_logits = true;
      r.depth = layout_->depth.data();
      r.tree = layout_->mask.data();
    } else if (s->k > 0) {  // the newest token and the proposals, every position's logits
      s->feed.assign(1, s->tokens.back());
      s->feed.insert(s->feed.end(), s->drafts.begin(), s->drafts.end());
      r.tokens = s->feed.data();
      r.n = s->k + 1;
      r.all_logits = true;
    } else {
      r.tokens = s->tokens.data() + s->cached;
      r.n = s->n;
    }
    r.past = s->cached;
    r.blocks = s->blocks.data();
    r.n_blocks = int(s->blocks.size());
    rows.push_back(r);
  }
  const float* logits = dec_.forward(rows);
  metrics_.steps++;
  const size_t TV = size_t(dec_.config().vocab_size);
  const int C = dec_.config().d_model;
  size_t off = 0, soff = 0;  // the row's first logits row and first stream row
  for (size_t i = 0; i < rows.size(); i++) {
    Seq& s = *who[i];
    const float* lg = logits + off * TV;
    off += rows[i].all_logits ? size_t(rows[i].n) : 1;
    const float* st = opt_.mtp ? dec_.stream() + soff * size_t(C) : nullptr;
    soff += size_t(rows[i].n);
    auto keep_hidden = [&](size_t row) {  // Medusa's next proposals read the state behind the newest token
      if (!opt_.medusa) return;
      const float* hd = dec_.hidden() + row * size_t(C);
      s.hid.assign(hd, hd + C);
    };
    if (s.tn > 0) {
      // Greedy acceptance down the tree; the path's entries compacted in place before anything is emitted (a
      // finish releases the blocks).
      const size_t first = off - size_t(rows[i].n);
      thread_local std::vector<int32_t> path;
      int32_t next;
      if (s.sampler.params().greedy()) {
        next = layout_->greedy_path(s.feed.data(), s.tn, lg, int(TV), opt_.sample_vocab, path);
      } else {
        layout_->typical_path(s.feed.data(), s.tn, lg, int(TV), opt_.sample_vocab, s.sampler.params().temperature,
                              opt_.typical_threshold, opt_.typical_alpha, path);
        next = s.sampler.sample(lg + size_t(path.back()) * TV, opt_.sample_vocab);
      }
      keep_hidden(first + size_t(path.back()));
      dec_.keep_path(s.blocks.data(), int(s.blocks.size()), s.cached, path.data(), int(path.size()));
      s.cached += int(path.size());
      int depth = 0;
      for (int j = 0; j < s.tn; j++) depth = std::max(depth, layout_->depth[size_t(j)]);
      metrics_.spec_drafted += depth;  // acceptance = accepted / (rounds · depth), as kiln generate reports
      metrics_.spec_accepted += int64_t(path.size()) - 1;
      metrics_.spec_rounds++;
      for (size_t j = 1; j < path.size() && !s.done; j++)
        emit(s, s.feed[size_t(path[j])], lg + size_t(path[j - 1]) * TV);
      if (!s.done) emit(s, next, lg + size_t(path.back()) * TV);
      continue;
    }
    if (s.k == 0) {
      if (opt_.mtp) mtp_commit(s, st, s.cached, rows[i].n);
      s.cached += rows[i].n;
      if (s.cached == int(s.tokens.size())) {
        keep_hidden(off - 1);
        sample(s, lg);
      }
      continue;
    }
    // Verify: the exact acceptance rule (infer/speculative.h), then the tokens one by one as plain decoding
    // reports them; a finish inside the run drops the rest.
    const int T = int(s.tokens.size());
    const int accepted = verify_proposals(s.sampler, lg, int(TV), opt_.sample_vocab, s.qs.data(), s.drafts.data(),
                                          s.k, s.rng, s.produced);
    metrics_.spec_drafted += s.k;
    metrics_.spec_accepted += accepted;
    metrics_.spec_rounds++;
    for (size_t j = 0; j < s.produced.size() && !s.done; j++) emit(s, s.produced[j], lg + j * TV);
    keep_hidden(off - size_t(rows[i].n) + size_t(accepted));
    // Roll back past the rejection: the target keeps the newest token and the accepted proposals; the draft
    // took in proposals 0 .. k-2 after the committed tokens, so it keeps as many of them as were accepted.
    s.cached = T + accepted;
    s.dcached = T + std::min(accepted, s.k - 1);
    if (opt_.mtp) mtp_commit(s, st, T - 1, accepted + 1);
  }
  std::erase_if(running_, [](const std::unique_ptr<Seq>& s) { return s->done; });
}

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait_for(lk, std::chrono::milliseconds(100), [&] { return stop_ || !waiting_.empty() || !running_.empty(); });
      if (stop_) return;
      admit();
    }
    metrics_.running = int64_t(running_.size());
    metrics_.kv_used_blocks = pool_.used_blocks();
    metrics_.kv_cached_blocks = pool_.cached_blocks();
    if (running_.empty()) continue;
    try {
      step();
    } catch (const std::exception& e) {
      // A failed step fails the sequences in it; the server goes on.
      for (auto& s : running_) {
        s->job->fail(e.what());
        finish(*s, "error");
      }
      running_.clear();
    }
  }
}

}  // namespace kiln::serve
