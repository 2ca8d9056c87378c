#include "serve/server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <chrono>
#include <ctime>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "core/error.h"
#include "serve/request.h"

namespace kiln::serve {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// Token bytes may be half a UTF-8 character: invalid sequences become U+FFFD in the JSON.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(e.json(), "application/json");
}

std::string random_id(const char* prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s-%016llx", prefix, (unsigned long long)rng());
  return buf;
}

// The routes counted by name in /metrics (anything else is "other", so hostile paths add no series).
std::string route_label(const std::string& path) {
  static const char* known[] = {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
                                "/detokenize", "/metrics"};
  for (const char* k : known)
    if (path == k) return k;
  return "other";
}

// cpp-httplib 0.11 tells a handler nothing about its connection, so a non-streaming handler that waits for its
// job finds its socket by the connection's two addresses and peeks at it: a read of 0 bytes means the client
// closed. `fd` caches the descriptor found; it is checked again each time, since descriptors are reused.
bool same_endpoint(const sockaddr_storage& a, const std::string& ip, int port) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (a.ss_family == AF_INET) {
    auto* v4 = reinterpret_cast<const sockaddr_in*>(&a);
    inet_ntop(AF_INET, &v4->sin_addr, buf, sizeof buf);
    return ntohs(v4->sin_port) == port && ip == buf;
  }
  if (a.ss_family == AF_INET6) {
    auto* v6 = reinterpret_cast<const sockaddr_in6*>(&a);
    inet_ntop(AF_INET6, &v6->sin6_addr, buf, sizeof buf);
    return ntohs(v6->sin6_port) == port && ip == buf;
  }
  return false;
}

bool is_connection_of(int fd, const httplib::Request& req) {
  sockaddr_storage peer{}, self{};
  socklen_t pl = sizeof peer, sl = sizeof self;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) return false;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&self), &sl) != 0) return false;
  return same_endpoint(peer, req.remote_addr, req.remote_port) && same_endpoint(self, req.local_addr, req.local_port);
}

bool client_gone(const httplib::Request& req, int& fd) {
  if (fd < 0 || !is_connection_of(fd, req)) {
    fd = -1;
    rlimit lim{};
    const int top = getrlimit(RLIMIT_NOFILE, &lim) == 0 ? int(std::min<rlim_t>(lim.rlim_cur, 65536)) : 1024;
    for (int i = 3; i < top && fd < 0; i++)
      if (is_connection_of(i, req)) fd = i;
    if (fd < 0) return true;  // the connection's socket is gone
  }
  char c;
  const ssize_t got = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// Per choice, what a non-streaming response accumulates.
struct ChoiceResult {
  std::string text, finish;
  std::vector<TokenLogprob> logprobs;
  int tokens = 0;
};

}  // namespace

struct Server::Impl {
  ServerOptions opt;
  Metrics& metrics;
  httplib::Server http;
  std::mutex m;
  std::shared_ptr<const ServedModel> model;  // null while loading
  std::atomic<int> streams{0};               // SSE responses in flight
  std::atomic<bool> stopping{false};

  Impl(ServerOptions o, Metrics& mt) : opt(std::move(o)), metrics(mt) {}

  std::shared_ptr<const ServedModel> served() {
    std::lock_guard<std::mutex> lk(m);
    return model;
  }

  json logprobs_json_chat(const Tokenizer& tok, const std::vector<TokenLogprob>& lps) const {
    json content = json::array();
    auto entry = [&](int32_t id, float lp) {
      const std::string t = tok.decode_token(uint32_t(id));
      json bytes = json::array();
      for (unsigned char c : t) bytes.push_back(int(c));
      return json{{"token", t}, {"logprob", lp}, {"bytes", bytes}};
    };
    for (const auto& l : lps) {
      json e = entry(l.id, l.logprob);
      json top = json::array();
      for (const auto& [id, lp] : l.top) top.push_back(entry(id, lp));
      e["top_logprobs"] = top;
      content.push_back(e);
    }
    return json{{"content", content}};
  }

  // Completions' legacy format: tokens, token_logprobs, top_logprobs (a {token: logprob} per position).
  json logprobs_json_text(const Tokenizer& tok, const std::vector<TokenLogprob>& lps, size_t offset0) const {
    json tokens = json::array(), lp = json::array(), top = json::array(), off = json::array();
    size_t offset = offset0;
    for (const auto& l : lps) {
      const std::string t = tok.decode_token(uint32_t(l.id));
      tokens.push_back(t);
      lp.push_back(l.logprob);
      json m = json::object();
      for (const auto& [id, p] : l.top) m[tok.decode_token(uint32_t(id))] = p;
      top.push_back(m);
      off.push_back(offset);
      offset += t.size();
    }
    return json{{"tokens", tokens}, {"token_logprobs", lp}, {"top_logprobs", top}, {"text_offset", off}};
  }

  void completions(const httplib::Request& req, httplib::Response& res, bool chat);
};

Server::Server(ServerOptions opt, Metrics& metrics) : impl_(std::make_unique<Impl>(std::move(opt), metrics)) {
  Impl& I = *impl_;
  auto& http = I.http;
  const int threads = I.opt.http_threads;
  http.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  http.set_payload_max_length(I.opt.max_body_bytes);
  http.set_read_timeout(I.opt.timeout_s, 0);
  http.set_write_timeout(I.opt.timeout_s, 0);
  // An idle keep-alive connection holds its worker until this runs out, and shutdown joins the workers: at 30 s a
  // SIGTERM with one idle client took 28 s to exit. 5 s is Node's default; a client that waits longer reconnects.
  http.set_keep_alive_timeout(std::min(I.opt.timeout_s, 5));
  http.set_keep_alive_max_count(1000);

  // Authentication and the loading state, before any route.
  http.set_pre_routing_handler([&I](const httplib::Request& req, httplib::Response& res) {
    if (req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
    if (!I.opt.api_keys.empty()) {
      const std::string auth = req.get_header_value("Authorization");
      bool ok = false;
      if (auth.rfind("Bearer ", 0) == 0) {
        const std::string key = auth.substr(7);
        for (const auto& k : I.opt.api_keys) ok |= key == k;
      }
      if (!ok) {
        send_error(res, ApiError(401, auth.empty() ? "missing API key: send 'Authorization: Bearer KEY'"
                                                   : "invalid API key",
                                 "invalid_request_error", "invalid_api_key"));
        res.set_header("WWW-Authenticate", "Bearer");
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    if (!I.served() && route_label(req.path) != "other" && req.path != "/metrics") {
      send_error(res, ApiError(503, "the model is loading", "server_error", "model_loading"));
      res.set_header("Retry-After", "1");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Any other 4xx/5xx httplib produces itself (unknown route or method, 413, bad request line): an error object.
  http.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string msg, code;
    switch (res.status) {
      case 404: msg = "no route " + req.method.substr(0, 16) + " " + req.path.substr(0, 64); code = "not_found"; break;
      case 405: msg = "method not allowed"; code = "method_not_allowed"; break;
      case 413: msg = "the request body is too large"; code = "payload_too_large"; break;
      case 414: msg = "the request URI is too long"; code = "uri_too_long"; break;
      default: msg = "HTTP error " + std::to_string(res.status); code = "http_error"; break;
    }
    res.set_content(ApiError(res.status, msg, res.status >= 500 ? "server_error" : "invalid_request_error", code).json(),
                    "application/json");
    return httplib::Server::HandlerResponse::Handled;
  }));
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const ApiError& e) {
      send_error(res, e);
      return;
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, what, "server_error", "internal_error"));
  });
  http.set_logger([&I](const httplib::Request& req, const httplib::Response& res) {
    I.metrics.count_request(route_label(req.path), res.status);
  });

  http.Get("/health", [&I](const httplib::Request&, httplib::Response& res) {
    if (!I.served()) {
      res.status = 503;
      res.set_content(R"({"status":"loading"})", "application/json");
      return;
    }
    res.set_content(R"({"status":"ok"})", "application/json");
  });
  http.Get("/metrics", [&I](const httplib::Request&, httplib::Response& res) {
    res.set_content(I.metrics.render(), "text/plain; version=0.0.4");
  });
  http.Get("/v1/models", [&I](const httplib::Request&, httplib::Response& res) {
    auto m = I.served();
    json d = {{"id", m->id}, {"object", "model"}, {"created", int64_t(std::time(nullptr))}, {"owned_by", "kiln"},
              {"max_model_len", m->ctx}};
    if (!m->drafting.empty()) d["speculative"] = {{"method", m->drafting}, {"draft_tokens", m->draft_tokens}};
    res.set_content(dump(json{{"object", "list"}, {"data", json::array({d})}}), "application/json");
  });
  http.Post("/tokenize", [&I](const httplib::Request& req, httplib::Response& res) {
    auto m = I.served();
    const TokenizeRequest r = parse_tokenize_request(req.body);
    std::vector<uint32_t> ids;
    if (r.add_special) ids = m->tok->prefix_ids();
    m->tok->encode_append(r.content, ids);
    json toks = json::array();
    for (uint32_t id : ids) {
      if (r.with_pieces)
        toks.push_back(json{{"id", id}, {"piece", m->tok->decode_token(id)}});
      else
        toks.push_back(id);
    }
    res.set_content(dump(json{{"tokens", toks}}), "application/json");
  });
  http.Post("/detokenize", [&I](const httplib::Request& req, httplib::Response& res) {
    auto m = I.served();
    const std::vector<int32_t> ids = parse_detokenize_request(req.body);
    std::vector<uint32_t> u;
    for (size_t i = 0; i < ids.size(); i++) {
      if (ids[i] >= m->tok->vocab_size())
        throw ApiError(400, str("'tokens[", i, "]' (", ids[i], ") is outside the vocabulary [0, ", m->tok->vocab_size(), ")"),
                       "invalid_request_error", "invalid_value", "tokens");
      u.push_back(uint32_t(ids[i]));
    }
    res.set_content(dump(json{{"content", m->tok->decode(u)}}), "application/json");
  });
  http.Post("/v1/completions",
            [&I](const httplib::Request& req, httplib::Response& res) { I.completions(req, res, false); });
  http.Post("/v1/chat/completions",
            [&I](const httplib::Request& req, httplib::Response& res) { I.completions(req, res, true); });
}

Server::~Server() = default;

void Server::Impl::completions(const httplib::Request& req, httplib::Response& res, bool chat) {
  auto m = served();
  const GenRequest r = parse_gen_request(req.body, chat);
  const Tokenizer& tok = *m->tok;

  // The prompts, tokenized.
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> prompt_texts;  // echo
  auto from_text = [&](const std::string& text) {
    std::vector<int32_t> ids;
    for (uint32_t id : tok.prefix_ids()) ids.push_back(int32_t(id));
    for (uint32_t id : tok.encode(text)) ids.push_back(int32_t(id));
    return ids;
  };
  if (chat) {
    const std::string text = m->chat->render(r.messages);
    std::vector<int32_t> ids;
    for (uint32_t id : tok.encode(text)) ids.push_back(int32_t(id));  // the template writes bos itself
    prompts.push_back(std::move(ids));
  } else {
    for (size_t i = 0; i < r.prompts.size(); i++) {
      const Prompt& p = r.prompts[i];
      std::vector<int32_t> ids = p.is_ids ? p.ids : from_text(p.text);
      for (size_t k = 0; k < ids.size(); k++)
        if (ids[k] >= m->vocab)
          throw ApiError(400, str("prompt token ", k, " (", ids[k], ") is outside the vocabulary [0, ", m->vocab, ")"),
                         "invalid_request_error", "invalid_value", "prompt");
      if (ids.empty()) {
        if (!m->eot) throw ApiError(400, "the prompt is empty", "invalid_request_error", "invalid_value", "prompt");
        ids.push_back(*m->eot);  // as kiln generate: an empty prompt starts from the end-of-text token
      }
      prompt_texts.push_back(p.is_ids ? tok.decode(std::vector<uint32_t>(ids.begin(), ids.end())) : p.text);
      prompts.push_back(std::move(ids));
    }
  }
  // The context check, with the numbers.
  std::vector<int> max_new;
  int prompt_tokens = 0;
  for (const auto& p : prompts) {
    const int P = int(p.size());
    prompt_tokens += P;
    const int want = r.max_tokens.value_or(0);
    if (P >= m->ctx || (r.max_tokens && int64_t(P) + want > m->ctx))
      throw ApiError(400,
                     str("This model's maximum context length is ", m->ctx, " tokens. However, you requested ",
                         int64_t(P) + want, " tokens (", P, " in the ", chat ? "messages" : "prompt", ", ", want,
                         " in the completion). Please reduce the length of the ", chat ? "messages" : "prompt",
                         " or the completion."),
                     "invalid_request_error", "context_length_exceeded", chat ? "messages" : "prompt");
    for (int i = 0; i < r.n; i++) max_new.push_back(r.max_tokens ? want : m->ctx - P);
  }
  std::vector<std::vector<int32_t>> choice_prompts;
  for (const auto& p : prompts)
    for (int i = 0; i < r.n; i++) choice_prompts.push_back(p);
  JobParams jp;
  jp.temperature = r.temperature;
  jp.top_p = r.top_p;
  jp.top_k = r.top_k;
  if (r.seed) jp.seed = uint64_t(*r.seed);
  jp.presence_penalty = r.presence_penalty;
  jp.frequency_penalty = r.frequency_penalty;
  jp.logprobs = r.logprobs;
  jp.top_logprobs = r.top_logprobs;
  jp.stop = r.stop;
  auto job = std::make_shared<Job>(std::move(choice_prompts), max_new, jp);
  try {
    m->engine->submit(job);
  } catch (const ApiError& e) {
    if (e.status == 503) res.set_header("Retry-After", std::to_string(opt.retry_after_s));
    throw;
  }

  const std::string id = random_id(chat ? "chatcmpl" : "cmpl");
  const int64_t created = int64_t(std::time(nullptr));
  const std::string object = chat ? "chat.completion" : "text_completion";
  const int choices = job->choices();
  auto usage = [prompt_tokens](int completion) {
    return json{{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion},
                {"total_tokens", prompt_tokens + completion}};
  };

  if (!r.stream) {
    std::vector<ChoiceResult> out(static_cast<size_t>(choices));
    std::vector<ChoiceEvent> ev;
    int fd = -1;
    while (!job->done()) {
      ev.clear();
      job->wait(ev, std::chrono::milliseconds(200));
      for (auto& e : ev) {
        ChoiceResult& c = out[size_t(e.index)];
        c.text += e.text;
        for (auto& l : e.logprobs) c.logprobs.push_back(std::move(l));
        if (!e.finish.empty()) c.finish = e.finish;
        c.tokens = e.tokens;
      }
      if (stopping && !job->done()) job->fail("the server is shutting down");
      if (!job->done() && client_gone(req, fd)) {
        job->cancel();  // frees its sequences at the next step; nobody reads the answer
        res.status = 499;  // nginx's "client closed request", so /metrics counts these apart
        return;
      }
    }
    const std::string err = job->error();
    if (!err.empty()) throw ApiError(err.find("shutting down") != std::string::npos ? 503 : 500, err, "server_error");
    json arr = json::array();
    int completion = 0;
    for (int i = 0; i < choices; i++) {
      const ChoiceResult& c = out[size_t(i)];
      completion += c.tokens;
      json ch = {{"index", i}, {"finish_reason", c.finish}};
      if (chat) {
        ch["message"] = {{"role", "assistant"}, {"content", c.text}};
        ch["logprobs"] = r.logprobs ? logprobs_json_chat(tok, c.logprobs) : json(nullptr);
      } else {
        const std::string echo = r.echo ? prompt_texts[size_t(i / r.n)] : "";
        ch["text"] = echo + c.text;
        ch["logprobs"] = r.logprobs ? logprobs_json_text(tok, c.logprobs, echo.size()) : json(nullptr);
      }
      arr.push_back(ch);
    }
    json body = {{"id", id}, {"object", object}, {"created", created}, {"model", m->id}, {"choices", arr},
                 {"usage", usage(completion)}};
    res.set_content(dump(body), "application/json");
    return;
  }

  // SSE. The provider runs on this connection's thread until the job ends or the client goes away.
  streams++;
  const std::string chunk_object = chat ? "chat.completion.chunk" : "text_completion";
  auto chunk = [=](json choice_list) {
    return "data: " +
           dump(json{{"id", id}, {"object", chunk_object}, {"created", created}, {"model", m->id},
                     {"choices", std::move(choice_list)}}) +
           "\n\n";
  };
  const bool include_usage = r.include_usage, echo = r.echo, logprobs = r.logprobs;
  const int n = r.n;
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, job, m, chunk, chat, include_usage, echo, logprobs, n, prompt_texts, usage,
       choices](size_t, httplib::DataSink& sink) {
        auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
        std::vector<int> tokens(size_t(choices), 0);
        std::vector<size_t> offsets(size_t(choices), 0);
        // The opening chunk of each choice: the assistant role (chat) or the echoed prompt.
        for (int i = 0; i < choices; i++) {
          json c;
          if (chat) {
            c = {{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr},
                 {"finish_reason", nullptr}};
          } else {
            if (!echo) continue;
            const std::string& t = prompt_texts[size_t(i / n)];
            offsets[size_t(i)] = t.size();
            c = {{"index", i}, {"text", t}, {"logprobs", nullptr}, {"finish_reason", nullptr}};
          }
          if (!write(chunk(json::array({c})))) {
            job->cancel();
            return false;
          }
        }
        std::vector<ChoiceEvent> ev;
        while (!job->done()) {
          if (stopping && !job->done()) job->fail("the server is shutting down");
          if (!sink.is_writable()) {
            job->cancel();
            return false;
          }
          ev.clear();
          job->wait(ev, std::chrono::milliseconds(50));
          for (auto& e : ev) {
            tokens[size_t(e.index)] = e.tokens;
            if (!e.text.empty() || !e.logprobs.empty()) {
              json c = {{"index", e.index}, {"finish_reason", nullptr}};
              if (chat) {
                c["delta"] = {{"content", e.text}};
                c["logprobs"] = logprobs ? logprobs_json_chat(*m->tok, e.logprobs) : json(nullptr);
              } else {
                c["text"] = e.text;
                c["logprobs"] = logprobs ? logprobs_json_text(*m->tok, e.logprobs, offsets[size_t(e.index)]) : json(nullptr);
                for (const auto& l : e.logprobs) offsets[size_t(e.index)] += m->tok->decode_token(uint32_t(l.id)).size();
              }
              if (!write(chunk(json::array({c})))) {
                job->cancel();
                return false;
              }
            }
            if (!e.finish.empty()) {
              json c = {{"index", e.index}, {"logprobs", nullptr}, {"finish_reason", e.finish}};
              if (chat)
                c["delta"] = json::object();
              else
                c["text"] = "";
              if (!write(chunk(json::array({c})))) {
                job->cancel();
                return false;
              }
            }
          }
        }
        const std::string err = job->error();
        if (!err.empty()) {
          // The stream ends with an error event (OpenAI's clients raise it), then [DONE].
          write("data: " + ApiError(503, err, "server_error", "stream_error").json() + "\n\n");
        } else if (include_usage) {
          int completion = 0;
          for (int t : tokens) completion += t;
          json u = json::parse(chunk(json::array()).substr(6));
          u["usage"] = usage(completion);
          write("data: " + dump(u) + "\n\n");
        }
        write("data: [DONE]\n\n");
        sink.done();
        return true;
      },
      [this, job](bool) {
        job->cancel();  // finished jobs ignore it; a dropped connection frees its sequences
        streams--;
      });
}

void Server::bind() {
  Impl& I = *impl_;
  if (I.opt.port == 0) {
    port_ = I.http.bind_to_any_port(I.opt.host);
    KILN_CHECK(port_ > 0, "--host ", I.opt.host, ": cannot bind a port");
  } else {
    KILN_CHECK(I.http.bind_to_port(I.opt.host, I.opt.port), "--host ", I.opt.host, " --port ", I.opt.port,
               ": cannot bind (in use, or not an address of this machine)");
    port_ = I.opt.port;
  }
}

void Server::run() { impl_->http.listen_after_bind(); }

void Server::set_model(const ServedModel& m) {
  std::lock_guard<std::mutex> lk(impl_->m);
  impl_->model = std::make_shared<const ServedModel>(m);
}

void Server::stop() {
  Impl& I = *impl_;
  I.stopping = true;
  // Streams see `stopping`, end with an error event and close; give them a moment.
  for (int i = 0; i < 100 && I.streams > 0; i++) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  I.http.stop();
}

}  // namespace kiln::serve
