// kiln serve's HTTP side: the OpenAI-compatible routes over cpp-httplib, in front of the scheduler
// (serve/engine.h).
//
//   GET  /health               503 {"status": "loading"} until the model is ready, then 200 {"status": "ok"}
//   GET  /v1/models            the one model
//   POST /v1/completions       prompt (string, strings, token ids), streaming or not
//   POST /v1/chat/completions  messages through the chat template, streaming or not
//   POST /tokenize             {"content"} -> {"tokens"};  POST /detokenize {"tokens"} -> {"content"}
//   GET  /metrics              Prometheus text (serve/metrics.h)
//
// Every error is an OpenAI error object with its status. With API keys set every route but /health needs
// "Authorization: Bearer KEY" (401 otherwise). Bodies are limited in size (413), prompt + max_tokens are
// checked against the context (400 with the numbers), a full queue answers 503 with Retry-After, and slow or
// idle clients time out. Streams are SSE: "data: {json}" events, each chunk with a "choices" array (the usage
// chunk's is empty), ending with "data: [DONE]"; a client that goes away cancels its sequences at once.
#pragma once
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "serve/chat.h"
#include "serve/engine.h"
#include "serve/metrics.h"
#include "tokenizer/bpe.h"

namespace kiln::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::vector<std::string> api_keys;  // empty: no authentication
  size_t max_body_bytes = 8u << 20;
  int timeout_s = 60;                 // per read / write on a connection, and the keep-alive idle time
  int http_threads = 64;
  int retry_after_s = 1;
};

// What the routes serve once the model is loaded.
struct ServedModel {
  std::string id;             // "model" in responses and /v1/models
  const Tokenizer* tok = nullptr;
  Engine* engine = nullptr;
  const ChatFormat* chat = nullptr;
  int ctx = 0;                // positions per sequence
  int vocab = 0;              // the model's vocabulary
  std::optional<int32_t> eot;
  std::string drafting;       // "" or the speculative method in use ("draft_model"), shown by /v1/models
  int draft_tokens = 0;
};

class Server {
 public:
  explicit Server(ServerOptions opt, Metrics& metrics);
  ~Server();
  // Binds the port (throws kiln::Error naming host:port when it cannot); then run() serves until stop().
  void bind();
  int port() const { return port_; }
  void run();
  // The model is ready: /health turns 200 and the API routes answer.
  void set_model(const ServedModel& m);
  // Stops accepting; waits (up to a few seconds) for responses in flight to end.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace kiln::serve
