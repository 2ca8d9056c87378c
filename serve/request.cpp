#include "serve/request.h"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

namespace kiln::serve {

using nlohmann::json;

std::string ApiError::json() const {
  nlohmann::json e = {{"message", what()}, {"type", type}};
  e["param"] = param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param);
  e["code"] = code.empty() ? nlohmann::json(nullptr) : nlohmann::json(code);
  return nlohmann::json{{"error", e}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

namespace {

[[noreturn]] void bad(const std::string& field, const std::string& why) {
  throw ApiError(400, "'" + field + "' " + why, "invalid_request_error", "invalid_value", field);
}

// Bodies nest a few levels; a deeper one is hostile (and nlohmann's recursive destructor would pay for it).
void check_depth(std::string_view body, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') {
      if (++depth > max_depth) throw ApiError(400, "the request body nests deeper than " + std::to_string(max_depth) + " levels");
    } else if (c == ']' || c == '}') depth--;
  }
}

json parse_body(std::string_view body) {
  check_depth(body, 32);
  json j;
  try {
    j = json::parse(body.begin(), body.end());
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("the request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw ApiError(400, "the request body must be a JSON object");
  return j;
}

const json* field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

int64_t get_int(const json& v, const std::string& name, int64_t lo, int64_t hi) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > uint64_t(hi) || (lo > 0 && u < uint64_t(lo)))
      bad(name, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(u));
    return int64_t(u);
  }
  if (v.is_number_float()) {
    // 5.0 is accepted as 5 (some clients send floats); 5.5 is not an integer.
    const double d = v.get<double>();
    if (!std::isfinite(d) || d != std::floor(d)) bad(name, "must be an integer");
    if (d < double(lo) || d > double(hi))
      bad(name, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return int64_t(d);
  }
  if (!v.is_number_integer()) bad(name, "must be an integer");
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) bad(name, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(x));
  return x;
}

float get_float(const json& v, const std::string& name, double lo, double hi) {
  if (!v.is_number()) bad(name, "must be a number");
  const double d = v.get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "must be in [%g, %g], got %g", lo, hi, d);
    bad(name, buf);
  }
  return float(d);
}

bool get_bool(const json& v, const std::string& name) {
  if (!v.is_boolean()) bad(name, "must be a boolean");
  return v.get<bool>();
}

std::string get_string(const json& v, const std::string& name) {
  if (!v.is_string()) bad(name, "must be a string");
  return v.get<std::string>();
}

std::vector<int32_t> get_ids(const json& a, const std::string& name, int max_ids) {
  if (a.size() > size_t(max_ids)) bad(name, "has more than " + std::to_string(max_ids) + " token ids");
  std::vector<int32_t> ids;
  ids.reserve(a.size());
  for (size_t i = 0; i < a.size(); i++)
    ids.push_back(int32_t(get_int(a[i], name + "[" + std::to_string(i) + "]", 0, std::numeric_limits<int32_t>::max())));
  return ids;
}

// Message content: a string, or an array of parts of which the text ones are joined (others are refused).
std::string get_content(const json& v, const std::string& name) {
  if (v.is_null()) return "";
  if (v.is_string()) return v.get<std::string>();
  if (!v.is_array()) bad(name, "must be a string or an array of content parts");
  std::string out;
  for (size_t i = 0; i < v.size(); i++) {
    const std::string part = name + "[" + std::to_string(i) + "]";
    const json& p = v[i];
    if (!p.is_object()) bad(part, "must be an object");
    const json* type = field(p, "type");
    if (!type || get_string(*type, part + ".type") != "text")
      bad(part + ".type", "must be \"text\" (this model reads text only)");
    const json* text = field(p, "text");
    if (!text) bad(part + ".text", "is missing");
    out += get_string(*text, part + ".text");
  }
  return out;
}

}  // namespace

GenRequest parse_gen_request(std::string_view body, bool chat, const RequestLimits& lim) {
  const json j = parse_body(body);
  GenRequest r;
  r.chat = chat;
  if (const json* v = field(j, "model")) r.model = get_string(*v, "model");
  if (chat) {
    const json* m = field(j, "messages");
    if (!m) throw ApiError(400, "'messages' is required", "invalid_request_error", "missing_required_parameter", "messages");
    if (!m->is_array() || m->empty()) bad("messages", "must be a non-empty array");
    for (size_t i = 0; i < m->size(); i++) {
      const std::string name = "messages[" + std::to_string(i) + "]";
      const json& msg = (*m)[i];
      if (!msg.is_object()) bad(name, "must be an object");
      const json* role = field(msg, "role");
      if (!role) bad(name + ".role", "is missing");
      ChatMessage cm;
      cm.role = get_string(*role, name + ".role");
      if (cm.role == "developer") cm.role = "system";
      if (cm.role != "system" && cm.role != "user" && cm.role != "assistant" && cm.role != "tool")
        bad(name + ".role", "must be system, developer, user, assistant or tool, got \"" + cm.role + "\"");
      if (const json* c = field(msg, "content")) cm.content = get_content(*c, name + ".content");
      r.messages.push_back(std::move(cm));
    }
  } else {
    const json* p = field(j, "prompt");
    if (!p) throw ApiError(400, "'prompt' is required", "invalid_request_error", "missing_required_parameter", "prompt");
    auto one = [&](const json& v, const std::string& name) {
      Prompt pr;
      if (v.is_string()) {
        pr.text = v.get<std::string>();
      } else if (v.is_array()) {
        pr.is_ids = true;
        pr.ids = get_ids(v, name, lim.max_prompt_ids);
        if (pr.ids.empty()) bad(name, "is an empty list of token ids");
      } else {
        bad(name, "must be a string, a list of strings, a list of token ids or a list of such lists");
      }
      r.prompts.push_back(std::move(pr));
    };
    if (p->is_string()) {
      one(*p, "prompt");
    } else if (p->is_array()) {
      if (p->empty()) bad("prompt", "is empty");
      // A list of ids is one prompt; a list of strings or of id lists is several.
      if ((*p)[0].is_number()) {
        one(*p, "prompt");
      } else {
        if (p->size() > size_t(lim.max_prompts)) bad("prompt", "has more than " + std::to_string(lim.max_prompts) + " prompts");
        for (size_t i = 0; i < p->size(); i++) one((*p)[i], "prompt[" + std::to_string(i) + "]");
      }
    } else {
      bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists");
    }
    if (const json* v = field(j, "echo")) r.echo = get_bool(*v, "echo");
  }
  const int int_max = std::numeric_limits<int>::max();
  if (const json* v = field(j, "max_tokens")) r.max_tokens = int(get_int(*v, "max_tokens", 1, int_max));
  if (const json* v = field(j, "max_completion_tokens"))
    r.max_tokens = int(get_int(*v, "max_completion_tokens", 1, int_max));
  if (const json* v = field(j, "temperature")) r.temperature = get_float(*v, "temperature", 0.0, 2.0);
  if (const json* v = field(j, "top_p")) r.top_p = get_float(*v, "top_p", 0.0, 1.0);
  if (r.top_p == 0.0f) r.top_p = 1e-9f;  // top_p 0 reads as "the most probable token only"
  if (const json* v = field(j, "top_k")) {
    const int64_t k = get_int(*v, "top_k", -1, int_max);
    r.top_k = k < 0 ? 0 : int(k);
  }
  if (const json* v = field(j, "seed"))
    r.seed = get_int(*v, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
  if (const json* v = field(j, "stop")) {
    auto add = [&](const json& s, const std::string& name) {
      std::string t = get_string(s, name);
      if (t.empty()) return;  // an empty stop string stops nothing
      if (t.size() > size_t(lim.max_stop_bytes)) bad(name, "is longer than " + std::to_string(lim.max_stop_bytes) + " bytes");
      r.stop.push_back(std::move(t));
    };
    if (v->is_array()) {
      if (v->size() > size_t(lim.max_stop)) bad("stop", "has more than " + std::to_string(lim.max_stop) + " strings");
      for (size_t i = 0; i < v->size(); i++) add((*v)[i], "stop[" + std::to_string(i) + "]");
    } else {
      add(*v, "stop");
    }
  }
  if (const json* v = field(j, "n")) r.n = int(get_int(*v, "n", 1, lim.max_n));
  const size_t prompts = chat ? 1 : r.prompts.size();
  if (prompts * size_t(r.n) > size_t(lim.max_choices))
    bad("n", "times the number of prompts must be at most " + std::to_string(lim.max_choices));
  if (const json* v = field(j, "stream")) r.stream = get_bool(*v, "stream");
  if (const json* v = field(j, "stream_options")) {
    if (!v->is_object()) bad("stream_options", "must be an object");
    if (const json* u = field(*v, "include_usage")) r.include_usage = get_bool(*u, "stream_options.include_usage");
  }
  if (chat) {
    if (const json* v = field(j, "logprobs")) r.logprobs = get_bool(*v, "logprobs");
    if (const json* v = field(j, "top_logprobs")) {
      r.top_logprobs = int(get_int(*v, "top_logprobs", 0, lim.max_top_logprobs));
      if (!r.logprobs && r.top_logprobs > 0) bad("top_logprobs", "needs 'logprobs': true");
    }
  } else if (const json* v = field(j, "logprobs")) {
    // Completions: logprobs is the number of alternatives per token (0: only the chosen token's).
    r.logprobs = true;
    r.top_logprobs = int(get_int(*v, "logprobs", 0, lim.max_top_logprobs));
  }
  if (const json* v = field(j, "presence_penalty")) r.presence_penalty = get_float(*v, "presence_penalty", -2.0, 2.0);
  if (const json* v = field(j, "frequency_penalty"))
    r.frequency_penalty = get_float(*v, "frequency_penalty", -2.0, 2.0);
  if (const json* v = field(j, "user")) r.user = get_string(*v, "user");
  return r;
}

TokenizeRequest parse_tokenize_request(std::string_view body) {
  const json j = parse_body(body);
  TokenizeRequest r;
  const json* c = field(j, "content");
  if (!c) c = field(j, "prompt");
  if (!c) throw ApiError(400, "'content' is required", "invalid_request_error", "missing_required_parameter", "content");
  r.content = get_string(*c, "content");
  if (const json* v = field(j, "add_special")) r.add_special = get_bool(*v, "add_special");
  if (const json* v = field(j, "with_pieces")) r.with_pieces = get_bool(*v, "with_pieces");
  return r;
}

std::vector<int32_t> parse_detokenize_request(std::string_view body, int max_ids) {
  const json j = parse_body(body);
  const json* t = field(j, "tokens");
  if (!t) throw ApiError(400, "'tokens' is required", "invalid_request_error", "missing_required_parameter", "tokens");
  if (!t->is_array()) bad("tokens", "must be a list of token ids");
  return get_ids(*t, "tokens", max_ids);
}

}  // namespace kiln::serve
