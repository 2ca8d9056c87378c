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
// Speculative decoding (EngineOptions::draft, Leviathan et al.): a draft model with its own paged cache over the
// same block ids (a second pool of the same shape, so a sequence's block table serves both and a shared prompt
// block holds both models' keys). Each step the draft proposes up to draft_tokens tokens for every decoding
// sequence, one batched draft forward per proposal; the target then checks every sequence's last token and
// proposals in one batched forward (all their logits), and each sequence keeps what infer/speculative.h's exact
// rule accepts, plus the target's resampled or bonus token. Emission is token by token as without drafting
// (stop strings, end of text and max_tokens cut the run where plain decoding would stop). Rolling back is only
// moving a sequence's cached lengths: every block it can need (prompt + max_tokens) is its own from admission,
// and proposals never reach past that, so a rollback neither frees nor takes blocks. Sequences with presence or
// frequency penalties decode without drafting (their distribution would change with each accepted token).
//
// Medusa heads (EngineOptions::medusa) draft instead of a model: the chain of heads 1..K's most likely tokens from
// the hidden state behind the sequence's newest token, batched across sequences per head. Tree candidates
// would need tree attention through the paged cache; a chain is a single path, so the target checks it like a
// draft model's proposals, with the same exact rule: the proposal distribution is one-hot (the draft is
// deterministic), so greedy output is plain greedy output and samples follow the target's distribution.
//
// Prompt lookup (EngineOptions::prompt_lookup) drafts from the sequence itself: the tokens after the latest
// earlier occurrence of its last n tokens, one-hot proposals checked as a draft model's.
//
// MTP self-drafting (EngineOptions::mtp): module k of the model proposes draft k of a round from the previous
// depth's hidden state (module 1: the target's stream, which the decoder keeps for every new token) and the
// token before it, through its own layer of the paged cache; like Medusa's chain, the proposals are checked as
// a draft model's. Each sequence keeps per module its cached length and the token each entry read, and per depth
// the hidden states of the positions the next module has yet to take in; a rejected draft invalidates the
// entries that read it (and every later module's from there), which the next round runs again.
//
// Medusa trees (EngineOptions::medusa_tree, as kiln generate's --medusa-tree): greedy sequences (temperature 0,
// no penalties) check a static tree of the heads' top choices instead (infer/medusa.h MedusaLayout), one tree row
// each in the batched forward (tree attention through the paged cache); the longest path of the target's own
// arg maxes is kept, its nodes' cache entries compacted in place (BatchDecoder::keep_path), and the arg max
// after it is the next token: every token is the target's greedy choice on its exact prefix, so the output is
// plain greedy's. Sampled sequences keep the chain and its exact rule, or with medusa_typical take the tree
// with typical acceptance as kiln generate does when sampling. The tree is cut (a breadth-first prefix)
// to the positions left in the sequence's blocks and context.
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

#include "infer/medusa.h"
#include "infer/prompt_lookup.h"
#include "models/model.h"
#include "nn/medusa.h"
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

inline constexpr int kMaxDraftTokens = 15;  // K + 1 positions fit the GPU decode attention's 16 queries

struct EngineOptions {
  int parallel = 16;         // sequences in the batch at once
  int max_queue = 64;        // requests waiting beyond which submit() refuses (503)
  int prefill_chunk = 256;   // prompt positions run per step, over all sequences
  bool prefix_cache = true;
  int sample_vocab = 0;      // sample among ids [0, sample_vocab) (the tokenizer's); 0: the model's
  std::optional<int32_t> eot;
  // Speculative decoding: a draft with the target's block size and pool size (the same block ids), proposing
  // up to draft_tokens tokens a step for each sequence.
  BatchDecoder* draft = nullptr;
  int draft_tokens = 4;
  // Or Medusa heads on the target's last hidden state (the decoder keeps them: BatchDecoderOptions::keep_hidden):
  // the chain of each head's top-1 token, draft_tokens long (at most the heads), checked like a draft's.
  const nn::MedusaHeads* medusa = nullptr;
  // With medusa: greedy sequences check this candidate tree instead of the chain (CPU decoders).
  std::optional<MedusaTree> medusa_tree;
  // With medusa_tree: sampled sequences (no penalties) check the tree too, with Medusa's typical acceptance
  // (infer/medusa.h; not lossless: the accepted tokens need only be typical under the target), the next token
  // sampled at the path's end.
  bool medusa_typical = false;
  float typical_threshold = 0.09f, typical_alpha = 0.3f;
  // Or MTP self-drafting: the decoder's multi-token-prediction modules (BatchDecoderOptions::self_draft and
  // keep_stream) propose draft_tokens (at most the modules) a round, checked like a draft model's. Turns the
  // prefix cache off: a module's entry at a block's last positions reads the tokens after the block.
  bool mtp = false;
  // Or prompt lookup (n-gram drafting, infer/prompt_lookup.h): each sequence's proposals are what followed the
  // latest earlier occurrence of its last tokens in its own prompt and output, draft_tokens at most, checked
  // like a draft model's (one-hot proposals).
  std::optional<PromptLookupParams> prompt_lookup;
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
  std::optional<MedusaLayout> layout_;  // medusa_tree within the heads' reach

  void loop();
  void admit();
  void step();
  void finish(Seq& s, const std::string& reason);
  void sample(Seq& s, const float* logits);
  const float* penalised(const Seq& s, const float* logits);  // the logits after presence / frequency penalties
  void emit(Seq& s, int32_t t, const float* logits);           // reports t (logits: its row, for logprobs)
  void propose(const std::vector<Seq*>& prefill, const std::vector<Seq*>& drafting);
  void propose_medusa(const std::vector<Seq*>& drafting);
  void propose_tree(const std::vector<Seq*>& trees);  // each sequence's tree tokens (feed) and size (tn)
  void propose_mtp(const std::vector<Seq*>& drafting);
  void propose_lookup(const std::vector<Seq*>& drafting);
  // After a forward: the stream rows of a sequence's valid new positions (MTP module 1's input), and the
  // modules' entries that read a token other than the one committed there now (a rejected draft) dropped.
  void mtp_commit(Seq& s, const float* stream, int past, int valid);
};

}  // namespace kiln::serve
