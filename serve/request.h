// The OpenAI request bodies kiln serve accepts, parsed and checked: /v1/completions and /v1/chat/completions.
// Unknown fields are ignored; a field of the wrong type or out of range is an ApiError (400, naming the
// field), never a crash. Nothing in a request names a file or a model path: "model" is only echoed back.
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace kiln::serve {

// An error as the OpenAI API reports it: {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct ApiError : std::runtime_error {
  int status;
  std::string type, code, param;
  ApiError(int status, std::string message, std::string type = "invalid_request_error", std::string code = "",
           std::string param = "")
      : std::runtime_error(std::move(message)), status(status), type(std::move(type)), code(std::move(code)),
        param(std::move(param)) {}
  std::string json() const;  // the body
};

struct ChatMessage {
  std::string role;     // system, user, assistant (developer is read as system, tool as user)
  std::string content;  // a string, or the text parts joined
};

// One prompt of /v1/completions: text, or token ids.
struct Prompt {
  bool is_ids = false;
  std::string text;
  std::vector<int32_t> ids;
};

struct GenRequest {
  bool chat = false;
  std::string model;
  std::vector<ChatMessage> messages;  // chat
  std::vector<Prompt> prompts;        // completions (a list of prompts gives choices n per prompt)
  std::optional<int> max_tokens;      // max_tokens or max_completion_tokens; unset: up to the context
  float temperature = 1.0f, top_p = 1.0f;
  int top_k = 0;                      // 0 (or -1): no limit
  std::optional<int64_t> seed;
  std::vector<std::string> stop;
  int n = 1;
  bool stream = false, include_usage = false;
  bool logprobs = false;
  int top_logprobs = 0;
  float presence_penalty = 0.0f, frequency_penalty = 0.0f;
  bool echo = false;                  // completions: the prompt text before the completion
  std::string user;
};

// Limits a request is checked against.
struct RequestLimits {
  int max_n = 16;             // n
  int max_choices = 64;       // prompts · n
  int max_stop = 16;          // stop strings
  int max_stop_bytes = 256;   // each
  int max_prompts = 64;
  int max_prompt_ids = 1 << 20;
  int max_top_logprobs = 20;
};

// Parses a request body (chat: /v1/chat/completions, else /v1/completions). Throws ApiError.
GenRequest parse_gen_request(std::string_view body, bool chat, const RequestLimits& lim = {});

// /tokenize {"content": string, "add_special": bool} or {"prompt": ...}; /detokenize {"tokens": [ids]}.
struct TokenizeRequest {
  std::string content;
  bool add_special = false;
  bool with_pieces = false;
};
TokenizeRequest parse_tokenize_request(std::string_view body);
std::vector<int32_t> parse_detokenize_request(std::string_view body, int max_ids = 1 << 20);

}  // namespace kiln::serve
