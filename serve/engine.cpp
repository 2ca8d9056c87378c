#include "serve/engine.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <unordered_map>

#include "core/error.h"
#include "infer/sampler.h"
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
  Seq(const SamplingParams& sp, std::vector<std::string> stop) : sampler(sp), text(std::move(stop)) {}
};

Engine::Engine(BatchDecoder& dec, const Tokenizer& tok, const EngineOptions& opt, Metrics& metrics)
    : dec_(dec), tok_(tok), opt_(opt), metrics_(metrics),
      pool_(dec.num_blocks(), dec.block_size(), opt.prefix_cache) {
  if (opt_.sample_vocab <= 0 || opt_.sample_vocab > dec.config().vocab_size) opt_.sample_vocab = dec.config().vocab_size;
  metrics_.kv_total_blocks = pool_.num_blocks();
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

void Engine::sample(Seq& s, const float* logits) {
  if (!s.published) {  // the prompt's KV is complete: its full blocks may serve later prompts
    pool_.publish(std::vector<int32_t>(s.tokens.begin(), s.tokens.begin() + s.prompt_len), s.blocks);
    s.published = true;
  }
  const int V = opt_.sample_vocab;
  const JobParams& p = s.job->params();
  thread_local std::vector<float> adj;
  if (p.presence_penalty != 0 || p.frequency_penalty != 0) {
    adj.assign(logits, logits + V);
    for (const auto& [t, c] : s.counts)
      if (t < V) adj[size_t(t)] -= p.frequency_penalty * float(c) + p.presence_penalty;
    logits = adj.data();
  }
  const int32_t t = s.sampler.sample(logits, V);
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

void Engine::step() {
  for (auto& s : running_)
    if (s->job->cancelled()) finish(*s, "cancelled");
  std::erase_if(running_, [](const std::unique_ptr<Seq>& s) { return s->done; });
  if (running_.empty()) return;
  std::vector<BatchRow> rows;
  std::vector<Seq*> who;
  int budget = opt_.prefill_chunk;
  for (auto& s : running_) {
    const int avail = int(s->tokens.size()) - s->cached;
    int n = 1;
    if (avail > 1) {  // prompt positions: within the step's prefill budget
      n = std::min(avail, budget);
      if (n <= 0) continue;
      budget -= n;
    }
    BatchRow r;
    r.tokens = s->tokens.data() + s->cached;
    r.n = n;
    r.past = s->cached;
    r.blocks = s->blocks.data();
    r.n_blocks = int(s->blocks.size());
    rows.push_back(r);
    who.push_back(s.get());
  }
  const float* logits = dec_.forward(rows);
  metrics_.steps++;
  const size_t V = size_t(dec_.config().vocab_size);
  for (size_t i = 0; i < rows.size(); i++) {
    Seq& s = *who[i];
    s.cached += rows[i].n;
    if (s.cached == int(s.tokens.size())) sample(s, logits + i * V);
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
