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
#include "models/checkpoint.h"
#include "models/model.h"
#include "serve/chat.h"
#include "serve/engine.h"
#include "serve/server.h"
#include "tokenizer/bpe.h"
#include "tools/kiln/command.h"
#include "train/trainer.h"

namespace {

struct ServeOptions {
  std::string model, random_init, tokenizer, host = "127.0.0.1", api_key, api_key_file, model_name, device = "cpu";
  std::string weights_dtype = "f32";
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

// OpenMP threads that spin while they wait for each other (libgomp's default) collapse when another process
// takes a core: a 2-thread decode step waits for a descheduled spinner. Passive waiting degrades in proportion
// instead (measured on the loaded 2-core machine: 1 stream 2.3 -> 6.0 tokens/s, 16 streams 6.8 -> 29.2). The
// policy is read when the runtime loads, so the server sets it and starts itself again, once, unless the
// environment already names one.
void prefer_passive_omp_wait() {
  if (std::getenv("OMP_WAIT_POLICY")) return;
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  for (size_t i = 0; i < all.size();) {
    const size_t j = all.find('\0', i);
    args.push_back(all.substr(i, (j == std::string::npos ? all.size() : j) - i));
    i = j == std::string::npos ? all.size() : j + 1;
  }
  if (args.empty()) return;
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv("/proc/self/exe", argv.data());  // on failure: run as we are
}

void run_serve(const ServeOptions& o) {
  using namespace kiln;
  prefer_passive_omp_wait();
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
  std::unique_ptr<serve::Engine> engine;
  std::mutex engine_m;
  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
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
    // Default pool: every slot a whole context.
    bo.num_blocks = o.kv_blocks > 0 ? o.kv_blocks : o.parallel * ((ctx + o.block_size - 1) / o.block_size);
    std::unique_ptr<BatchDecoder> dec = make_batch_decoder(cfg, model->host_params(), bo);
    const serve::ChatFormat chat = serve::ChatFormat::for_tokenizer(tok);
    serve::EngineOptions eo;
    eo.parallel = o.parallel;
    eo.max_queue = o.max_queue;
    eo.prefill_chunk = o.prefill_chunk;
    eo.prefix_cache = !o.no_prefix_cache;
    eo.sample_vocab = tok.vocab_size();
    if (tok.eot_id()) eo.eot = int32_t(*tok.eot_id());
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
      server.set_model(sm);
      std::fprintf(stderr,
                   "kiln serve: ready: model %s, context %d, %d sequences at once, KV cache %d blocks of %d (%.1f MiB), "
                   "chat template: %s\n",
                   sm.id.c_str(), ctx, o.parallel, dec->num_blocks(), dec->block_size(),
                   double(dec->cache_bytes()) / (1 << 20), chat.is_default() ? "kiln SFT (default)" : "the model's");
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
  c->add_option("--timeout", o->timeout, "Seconds a connection may stay silent (reads, writes, keep-alive)")
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
                 "CPU: the weight matrices' format for decoding: f32, bf16, f16 or q8_0 (8-bit, a scale per 32)")
      ->capture_default_str();
  c->callback([o] { run_serve(*o); });
});

}  // namespace
