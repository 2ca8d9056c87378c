// The scheduler: one thread that runs the model for every request at once (continuous batching).
//
// Each step it admits queued requests while there are free slots (--parallel sequences) and KV blocks for
// them (serve/kv_blocks.h), then runs one BatchDecoder::forward over every running sequence: one token for
// each decoding sequence and, within a budget of prefill_chunk positions a step, the next chunk of any prompt
// still being read, so a long prompt never stalls the others for more than a chunk. Sequences sample their
// token from their own logits (infer/sampler.h, after the presence / frequency penalties), stream its text
// through their stop strings (serve/stop_text.h), and leave the batch as soon as they finish or their client
// goes away, their blocks returning to the pool at once.
//
// Determinism: greedy decoding depends only on the logits, which are the same alone or batched up to the
// floating-point order of the batched matrix products (the CPU's fp32 GEMM and the single-row product may
// differ in the last bits; no test prompt here meets a near-tie). A seeded sample draws from choice i's own
// Philox stream (seed + i), so a seed reproduces a sample alone; batched, the draws are the same and only a
// draw within those last bits of a boundary could differ.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "models/model.h"
#include "serve/kv_blocks.h"
#include "serve/metrics.h"
#include "tokenizer/bpe.h"

namespace kiln::serve {

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // the most probable tokens, best first
};

// What a choice produced in one step (or how it ended).
struct ChoiceEvent {
  int index = 0;
  std::string text;
  std::vector<TokenLogprob> logprobs;
  std::string finish;  // "" while running, then "stop" or "length"
  int tokens = 0;      // tokens generated so far
};

struct JobParams {
  float temperature = 1.0f, top_p = 1.0f;
  int top_k = 0;
  std::optional<uint64_t> seed;
  float presence_penalty = 0, frequency_penalty = 0;
  bool logprobs = false;
  int top_logprobs = 0;
  std::vector<std::string> stop;
};

// One request: its choices (a prompt each, n per prompt) run as sequences; the HTTP thread reads their
// events. Everything here is safe to call from any thread.
class Job {
 public:
  Job(std::vector<std::vector<int32_t>> prompts, std::vector<int> max_new, JobParams params);
  // Waits up to `timeout` for events; moves them to `out`. False when none came.
  bool wait(std::vector<ChoiceEvent>& out, std::chrono::milliseconds timeout);
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  bool done() const;            // every choice finished, or failed
  std::string error() const;    // why it failed ("" if it did not)
  int choices() const { return int(prompts_.size()); }

  const std::vector<std::vector<int32_t>>& prompts() const { return prompts_; }
  const std::vector<int>& max_new() const { return max_new_; }
  const JobParams& params() const { return params_; }
  std::chrono::steady_clock::time_point arrived;

  // The scheduler's side.
  void push(ChoiceEvent e);
  void fail(const std::string& why);

 private:
  std::vector<std::vector<int32_t>> prompts_;
  std::vector<int> max_new_;
  JobParams params_;
  std::atomic<bool> cancelled_{false};
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::deque<ChoiceEvent> events_;
  int finished_ = 0;
  std::string error_;
};

struct EngineOptions {
  int parallel = 16;         // sequences in the batch at once
  int max_queue = 64;        // requests waiting beyond which submit() refuses (503)
  int prefill_chunk = 256;   // prompt positions run per step, over all sequences
  bool prefix_cache = true;
  int sample_vocab = 0;      // sample among ids [0, sample_vocab) (the tokenizer's); 0: the model's
  std::optional<int32_t> eot;
};

class Engine {
 public:
  Engine(BatchDecoder& dec, const Tokenizer& tok, const EngineOptions& opt, Metrics& metrics);
  ~Engine();
  void start();
  // Ends the loop; every unfinished job fails with "the server is shutting down".
  void stop();
  // Queues a job. Throws ApiError: 503 when the queue is full, 400 when it could never fit the cache.
  void submit(const std::shared_ptr<Job>& job);
  const EngineOptions& options() const { return opt_; }
  int max_positions() const { return dec_.max_positions(); }

 private:
  struct Seq;
  BatchDecoder& dec_;
  const Tokenizer& tok_;
  EngineOptions opt_;
  Metrics& metrics_;
  BlockPool pool_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> waiting_;
  bool stop_ = false;
  std::vector<std::unique_ptr<Seq>> running_;  // the scheduler thread's own
  std::thread thread_;

  void loop();
  void admit();
  void step();
  void finish(Seq& s, const std::string& reason);
  void sample(Seq& s, const float* logits);
};

}  // namespace kiln::serve
