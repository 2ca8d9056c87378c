// kiln serve: an OpenAI-compatible HTTP server over a checkpoint of any family (serve/server.h), with
// continuous batching (serve/engine.h) over a paged KV cache (models/model.h BatchDecoder).
//
// It binds first (127.0.0.1 unless --host says otherwise), answers /health with 503 while the model loads,
// then serves. SIGTERM / SIGINT end it cleanly: queued and running requests fail (streams end with an error
// event and [DONE]), the listener closes, the process exits 0.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/gpu.h"
#include "infer/medusa.h"
#include "models/checkpoint.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "serve/chat.h"
#include "serve/engine.h"
#include "serve/server.h"
#include "tokenizer/bpe.h"
#include "tools/kiln/command.h"
#include "tools/kiln/lookup_options.h"
#include "tools/kiln/omp_wait.h"
#include "train/trainer.h"

namespace {

struct ServeOptions {
  std::string model, random_init, tokenizer, host = "127.0.0.1", api_key, api_key_file, model_name, device = "cpu";
  std::string weights_dtype = "f32";
  std::string draft_model, draft_random_init;  // speculative decoding (serve/engine.h)
  int draft_tokens = 4;
  bool medusa = false;   // Medusa heads of the checkpoint, as a chain of top-1 guesses
  int medusa_tokens = 0;  // 0: every head
  float typical_threshold = 0, typical_alpha = 0;  // either > 0: sampled requests take typical acceptance
  std::string medusa_tree;  // greedy requests check this candidate tree (kiln generate's syntax; "default")
  bool mtp_draft = false, no_mtp_draft = false, draft_tokens_given = false;  // MTP self-drafting
  bool prompt_lookup = false;  // n-gram drafting from each sequence's own tokens
  kiln::PromptLookupParams lookup;
  int port = 8080, parallel = 16, ctx = 0, threads = 0, max_queue = 64, timeout = 60, kv_blocks = 0;
  int block_size = 64, prefill_chunk = 256, http_threads = 64;
  size_t max_body = 8u << 20;
  bool no_prefix_cache = false;
};

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t')) s.pop_back();
  size_t a = 0;
  while (a < s.size() && (s[a] == ' ' || s[a] == '\t')) a++;
  return s.substr(a);
}

void run_serve(const ServeOptions& o) {
  using namespace kiln;
  kiln::cli::prefer_passive_omp_wait();
  KILN_CHECK(o.model.empty() != o.random_init.empty(), "give exactly one of --model (a checkpoint) and --random-init");
  KILN_CHECK(o.parallel >= 1 && o.parallel <= 1024, "--parallel must be in [1, 1024], got ", o.parallel);
  KILN_CHECK(o.max_queue >= 0, "--max-queue must be >= 0, got ", o.max_queue);
  KILN_CHECK(o.timeout >= 1, "--timeout must be at least 1 second, got ", o.timeout);
  KILN_CHECK(o.port >= 0 && o.port <= 65535, "--port must be in [0, 65535], got ", o.port);
  KILN_CHECK(o.prefill_chunk >= 1, "--prefill-chunk must be at least 1, got ", o.prefill_chunk);
  KILN_CHECK(o.http_threads >= 2, "--http-threads must be at least 2, got ", o.http_threads);
  serve::ServerOptions so;
  so.host = o.host;
  so.port = o.port;
  so.timeout_s = o.timeout;
  so.max_body_bytes = o.max_body;
  so.http_threads = o.http_threads;
  if (!o.api_key.empty()) so.api_keys.push_back(o.api_key);
  if (!o.api_key_file.empty()) {
    std::ifstream f(o.api_key_file);
    KILN_CHECK(f, "--api-key-file ", o.api_key_file, ": cannot open");
    for (std::string line; std::getline(f, line);) {
      line = trim(line);
      if (!line.empty() && line[0] != '#') so.api_keys.push_back(line);
    }
    KILN_CHECK(!so.api_keys.empty(), "--api-key-file ", o.api_key_file, ": no key in it (one a line)");
  }
  const DeviceSpec device = parse_device(o.device);
  set_threads(o.threads);

  // Signals go to one thread (blocked everywhere else, before any thread starts).
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  serve::Metrics metrics;
  serve::Server server(so, metrics);
  server.bind();
  std::fprintf(stderr, "kiln serve: listening on http://%s:%d (loading the model)\n", o.host.c_str(), server.port());
  std::thread http([&] { server.run(); });
  std::atomic<bool> stop{false};
  std::atomic<bool> failed{false};  // loading failed: the signal thread is ended quietly (one error line)
  std::unique_ptr<serve::Engine> engine;
  std::mutex engine_m;
  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (failed) return;
    std::fprintf(stderr, "kiln serve: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    stop = true;
    {
      std::lock_guard<std::mutex> lk(engine_m);
      if (engine) engine->stop();
    }
    server.stop();
  });

  try {
    if (device.cuda) gpu::init(device.index);
    const ModelConfig cfg = o.model.empty() ? load_model_config(o.random_init) : load_model_config_for(o.model);
    ModelOptions mo;
    mo.with_grads = false;
    std::unique_ptr<Model> model = make_model(cfg, mo);
    if (o.model.empty())
      model->init_random(1);
    else
      load_model_weights(o.model, cfg, model->table(), model->host_params());
    std::string tok_dir = o.tokenizer;
    if (tok_dir.empty() && !o.model.empty()) {
      std::error_code ec;
      tok_dir = std::filesystem::is_directory(o.model, ec) ? o.model : std::filesystem::path(o.model).parent_path().string();
    }
    KILN_CHECK(!tok_dir.empty(), "kiln serve needs a tokenizer: pass --tokenizer DIR");
    Tokenizer tok = Tokenizer::load(tok_dir);
    KILN_CHECK(tok.vocab_size() <= cfg.vocab_size, tok_dir, ": the tokenizer has ", tok.vocab_size(),
               " tokens but the model's vocab_size is ", cfg.vocab_size);
    const int ctx = o.ctx > 0 ? o.ctx : cfg.max_positions;
    KILN_CHECK(ctx <= cfg.max_positions, "--ctx ", ctx, " exceeds the model's context of ", cfg.max_positions);
    BatchDecoderOptions bo;
    bo.cuda = device.cuda;
    bo.block_size = o.block_size;
    bo.max_positions = ctx;
    const std::optional<WeightFormat> wf = parse_weight_format(o.weights_dtype);
    KILN_CHECK(wf, "--weights-dtype: '", o.weights_dtype, "' is not one of f32, bf16, f16, q8_0");
    bo.weights = *wf;
    // Medusa: the checkpoint's heads read the decoder's last hidden states (host memory).
    std::optional<MedusaWeights> medusa_w;
    std::unique_ptr<nn::MedusaHeads> heads;
    if (o.medusa) {
      KILN_CHECK(!o.model.empty(), "--medusa needs --model (the heads are the checkpoint's medusa.safetensors)");
      KILN_CHECK(o.draft_model.empty() && o.draft_random_init.empty(), "give at most one of --medusa and --draft-model");
      // On a device the heads (host) read the final norm's rows copied back each step.
      medusa_w = load_medusa_heads(o.model, cfg);
      KILN_CHECK(medusa_w, "--medusa: ", o.model,
                 " has no Medusa heads (medusa.safetensors; kiln train --medusa-heads K --init BASE makes them)");
      const int K = medusa_w->shape.K;
      KILN_CHECK(o.medusa_tokens >= 0 && o.medusa_tokens <= std::min(K, serve::kMaxDraftTokens),
                 "--medusa-tokens must be in [1, ", std::min(K, serve::kMaxDraftTokens), "] (the checkpoint has ", K,
                 " heads), got ", o.medusa_tokens);
      heads = std::make_unique<nn::MedusaHeads>(medusa_w->shape, medusa_w->params.data(), nullptr);
      heads->set_weight_format(*wf);  // the heads read the base's format
      bo.keep_hidden = true;
    }
    KILN_CHECK(o.medusa_tokens == 0 || o.medusa, "--medusa-tokens needs --medusa");
    KILN_CHECK(o.medusa_tree.empty() || o.medusa, "--medusa-tree needs --medusa");
    // Default pool: every slot a whole context.
    bo.num_blocks = o.kv_blocks > 0 ? o.kv_blocks : o.parallel * ((ctx + o.block_size - 1) / o.block_size);
    // MTP self-drafting: --mtp-draft, or by default for a model with the modules and no other drafting (as kiln
    // generate does).
    const bool other_drafting = o.medusa || !o.draft_model.empty() || !o.draft_random_init.empty() || o.prompt_lookup;
    KILN_CHECK(!o.prompt_lookup || !(o.medusa || !o.draft_model.empty() || !o.draft_random_init.empty()),
               "give at most one of --prompt-lookup, --medusa and --draft-model");
    KILN_CHECK(!(o.mtp_draft && o.no_mtp_draft), "give at most one of --mtp-draft and --no-mtp-draft");
    KILN_CHECK(!(o.mtp_draft && other_drafting),
               "give at most one of --mtp-draft, --medusa, --draft-model and --prompt-lookup");
    KILN_CHECK(!o.mtp_draft || cfg.mtp_depth > 0, "--mtp-draft: the model (", cfg.family,
               ") has no multi-token-prediction modules (num_nextn_predict_layers)");
    const bool mtp = !other_drafting && !o.no_mtp_draft && cfg.mtp_depth > 0;
    const int mtp_tokens = std::min(cfg.mtp_depth, serve::kMaxDraftTokens);  // default; the engine checks a given K
    bo.self_draft = bo.keep_stream = mtp;
    std::unique_ptr<BatchDecoder> dec = make_batch_decoder(cfg, model->host_params(), bo);
    // Speculative decoding: the draft decodes through its own paged cache of the target's shape (the same block
    // ids), with the same device and weight format.
    KILN_CHECK(o.draft_model.empty() || o.draft_random_init.empty(),
               "give at most one of --draft-model and --draft-random-init");
    const bool speculative = !o.draft_model.empty() || !o.draft_random_init.empty();
    KILN_CHECK(!speculative || (o.draft_tokens >= 1 && o.draft_tokens <= serve::kMaxDraftTokens),
               "--draft-tokens must be in [1, ", serve::kMaxDraftTokens, "], got ", o.draft_tokens);
    std::unique_ptr<Model> draft_model;
    std::unique_ptr<BatchDecoder> draft;
    if (speculative) {
      const std::string& dsrc = o.draft_model.empty() ? o.draft_random_init : o.draft_model;
      const ModelConfig dcfg = o.draft_model.empty() ? load_model_config(dsrc) : load_model_config_for(dsrc);
      KILN_CHECK(dcfg.vocab_size == cfg.vocab_size, "--draft-model ", dsrc, ": its vocab_size ", dcfg.vocab_size,
                 " differs from the target's ", cfg.vocab_size, " (the draft must share the target's tokenizer)");
      KILN_CHECK(dcfg.max_positions >= ctx, "--draft-model ", dsrc, ": its context of ", dcfg.max_positions,
                 " positions is shorter than the served context of ", ctx, " (lower --ctx)");
      draft_model = make_model(dcfg, mo);
      if (o.draft_model.empty())
        draft_model->init_random(2);
      else
        load_model_weights(dsrc, dcfg, draft_model->table(), draft_model->host_params());
      draft = make_batch_decoder(dcfg, draft_model->host_params(), bo);
    }
    const serve::ChatFormat chat = serve::ChatFormat::for_tokenizer(tok);
    serve::EngineOptions eo;
    eo.parallel = o.parallel;
    eo.max_queue = o.max_queue;
    eo.prefill_chunk = o.prefill_chunk;
    eo.prefix_cache = !o.no_prefix_cache;
    eo.sample_vocab = tok.vocab_size();
    if (tok.eot_id()) eo.eot = int32_t(*tok.eot_id());
    eo.draft = draft.get();
    eo.draft_tokens = o.draft_tokens;
    if (mtp) {
      eo.mtp = true;
      eo.draft_tokens = o.draft_tokens_given ? o.draft_tokens : mtp_tokens;
    }
    if (o.prompt_lookup) eo.prompt_lookup = o.lookup;
    if (heads) {
      eo.medusa = heads.get();
      eo.draft_tokens = o.medusa_tokens > 0 ? o.medusa_tokens : std::min(heads->shape.K, serve::kMaxDraftTokens);
      if (!o.medusa_tree.empty())
        eo.medusa_tree = o.medusa_tree == "default" ? MedusaTree::default_tree() : MedusaTree::parse(o.medusa_tree);
    }
    KILN_CHECK(o.typical_threshold >= 0 && o.typical_alpha >= 0, "--typical-threshold and --typical-alpha must be > 0");
    eo.medusa_typical = o.typical_threshold > 0 || o.typical_alpha > 0;
    if (o.typical_threshold > 0) eo.typical_threshold = o.typical_threshold;
    if (o.typical_alpha > 0) eo.typical_alpha = o.typical_alpha;
    {
      std::lock_guard<std::mutex> lk(engine_m);
      if (!stop) {
        engine = std::make_unique<serve::Engine>(*dec, tok, eo, metrics);
        engine->start();
      }
    }
    if (!stop) {
      serve::ServedModel sm;
      sm.id = o.model_name;
      if (sm.id.empty())
        sm.id = o.model.empty() ? "random-init"
                                : std::filesystem::path(o.model).lexically_normal().filename().string();
      if (sm.id.empty()) sm.id = std::filesystem::path(o.model).lexically_normal().parent_path().filename().string();
      sm.tok = &tok;
      sm.engine = engine.get();
      sm.chat = &chat;
      sm.ctx = ctx;
      sm.vocab = cfg.vocab_size;
      sm.eot = eo.eot;
      if (speculative || heads || mtp || o.prompt_lookup) {
        sm.drafting = heads           ? (eo.medusa_tree ? "medusa_tree" : "medusa_chain")
                      : mtp           ? "mtp"
                      : o.prompt_lookup ? "prompt_lookup"
                                        : "draft_model";
        sm.draft_tokens = eo.draft_tokens;
      }
      server.set_model(sm);
      const std::string drafting =
          heads ? str("Medusa heads, a chain of ", eo.draft_tokens, " top-1 guesses a round",
                      eo.medusa_tree ? str(" (greedy requests: a tree of ", eo.medusa_tree->nodes.size(), " nodes)") : "")
          : speculative ? str("draft model ", o.draft_model.empty() ? o.draft_random_init : o.draft_model, ", ",
                              o.draft_tokens, " tokens a round")
          : mtp         ? str("MTP self-drafting, ", eo.draft_tokens, " of the model's ", cfg.mtp_depth,
                              " modules a round (prefix cache off)")
          : o.prompt_lookup ? str("prompt lookup, up to ", eo.draft_tokens, " tokens a round from n-grams of ",
                                  o.lookup.min_ngram, " to ", o.lookup.max_ngram)
                            : std::string("none");
      std::fprintf(stderr,
                   "kiln serve: ready: model %s, context %d, %d sequences at once, KV cache %d blocks of %d (%.1f MiB), "
                   "chat template: %s, speculative decoding: %s\n",
                   sm.id.c_str(), ctx, o.parallel, dec->num_blocks(), dec->block_size(),
                   double(dec->cache_bytes()) / (1 << 20), chat.is_default() ? "kiln SFT (default)" : "the model's",
                   drafting.c_str());
    }
    http.join();
    {
      std::lock_guard<std::mutex> lk(engine_m);
      if (engine) engine->stop();
      engine.reset();
    }
  } catch (...) {
    // Loading failed: close the listener and report.
    server.stop();
    if (http.joinable()) http.join();
    failed = true;
    pthread_kill(signals.native_handle(), SIGTERM);
    signals.join();
    throw;
  }
  if (!stop) pthread_kill(signals.native_handle(), SIGTERM);
  signals.join();
  std::fprintf(stderr, "kiln serve: stopped\n");
}

kiln::cli::Command serve_cmd("serve", [](CLI::App& root) {
  auto o = std::make_shared<ServeOptions>();
  auto* c = root.add_subcommand("serve", "OpenAI-compatible HTTP server (continuous batching, streaming, chat templates)");
  c->add_option("--model", o->model, "Checkpoint directory (config.json + model.safetensors, tokenizer files)");
  c->add_option("--random-init", o->random_init, "Instead of --model: a config.json for random weights (tests, benchmarks)");
  c->add_option("--tokenizer", o->tokenizer, "Tokenizer directory (default: the model directory)");
  c->add_option("--model-name", o->model_name, "The model id clients see (default: the model directory's name)");
  c->add_option("--host", o->host, "Address to bind (127.0.0.1: this machine only)")->capture_default_str();
  c->add_option("--port", o->port, "Port (0: any free one, printed on stderr)")->capture_default_str();
  c->add_option("--api-key", o->api_key, "Require 'Authorization: Bearer KEY' on every route but /health");
  c->add_option("--api-key-file", o->api_key_file, "A file of accepted API keys, one a line");
  c->add_option("--parallel", o->parallel, "Sequences decoded at once (the batch)")->capture_default_str();
  c->add_option("--ctx", o->ctx, "Positions per sequence (0: the model's context)")->capture_default_str();
  c->add_option("--threads", o->threads, "CPU threads of the compute (0: all cores)")->capture_default_str();
  c->add_option("--max-queue", o->max_queue, "Requests that may wait; beyond them 503 with Retry-After")
      ->capture_default_str();
  c->add_option("--timeout", o->timeout, "Seconds a connection may stay silent in a read or a write (an idle keep-alive connection: at most 5)")
      ->capture_default_str();
  c->add_option("--kv-blocks", o->kv_blocks, "KV-cache blocks in the pool (0: --parallel whole contexts)")
      ->capture_default_str();
  c->add_option("--kv-block-size", o->block_size, "Positions per KV-cache block")->capture_default_str();
  c->add_option("--prefill-chunk", o->prefill_chunk, "Prompt positions run per step (between decode steps)")
      ->capture_default_str();
  c->add_option("--max-body", o->max_body, "Largest request body in bytes (413 beyond)")->capture_default_str();
  c->add_option("--http-threads", o->http_threads, "Connections served at once")->capture_default_str();
  c->add_flag("--no-prefix-cache", o->no_prefix_cache, "Do not reuse the KV blocks of a shared prompt prefix");
  c->add_option("--device", o->device, "cpu, or cuda / cuda:N")->capture_default_str();
  c->add_option("--weights-dtype", o->weights_dtype,
                 "The weight matrices' format for decoding: f32, bf16, f16 or q8_0 (8-bit, a scale per 32); "
                 "--device cuda: f32 and bf16 both mean its bf16 products")
      ->capture_default_str();
  c->add_option("--draft-model", o->draft_model,
                 "Speculative decoding: a draft checkpoint with the target's vocabulary (its own paged cache)");
  c->add_option("--draft-random-init", o->draft_random_init,
                 "Instead of --draft-model: a config.json for a random draft (tests)");
  CLI::Option* dt = c->add_option("--draft-tokens", o->draft_tokens,
                                  "Tokens the draft proposes per round (1 to 15; MTP self-drafting: 1 to the "
                                  "modules, default all of them)")
                        ->capture_default_str();
  kiln::cli::add_prompt_lookup_options(c, o->prompt_lookup, o->lookup);
  c->add_flag("--mtp-draft", o->mtp_draft,
              "Draft with the model's own multi-token-prediction modules (the default when it has them; "
              "turns the prefix cache off)");
  c->add_flag("--no-mtp-draft", o->no_mtp_draft, "Plain decoding for a model with MTP modules");
  c->add_flag("--medusa", o->medusa,
              "Speculative decoding with the checkpoint's Medusa heads (medusa.safetensors): each round the "
              "chain of the heads' top-1 tokens, checked by the model in one batched pass");
  c->add_option("--medusa-tokens", o->medusa_tokens, "With --medusa: heads used per round (0: all)")
      ->capture_default_str();
  c->add_option("--medusa-tree", o->medusa_tree,
                "With --medusa: greedy requests (temperature 0) check this static candidate tree of the heads' top "
                "choices with tree attention instead of the chain (output = plain greedy; sampled requests keep the "
                "chain). Nodes as paths of head ranks as kiln generate's --medusa-tree, e.g. '0;1;0,0;0,1;0,0,0', or "
                "'default' (15 nodes to depth 4)");
  c->add_option("--typical-threshold", o->typical_threshold,
                "With --medusa-tree: sampled requests check the tree too, with typical acceptance of this epsilon "
                "(Medusa's 0.09; not lossless), instead of the exact chain");
  c->add_option("--typical-alpha", o->typical_alpha,
                "With --medusa-tree: typical acceptance's alpha (Medusa's 0.3); giving it turns typical acceptance on");
  c->callback([o, dt] {
    o->draft_tokens_given = dt->count() > 0;
    run_serve(*o);
  });
});

}  // namespace
