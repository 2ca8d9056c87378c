// A Jinja subset for chat templates (tokenizer_config.json's chat_template), checked against
// @huggingface/jinja (the implementation transformers.js and the Hub use) on the real templates of the
// popular families (tests/serve/jinja_vs_hf.mjs).
//
// Statements: {{ }}, {% if/elif/else %}, {% for x in xs [if cond] %}...{% else %}, loop.index/index0/first/
// last/length/revindex/revindex0/previtem/nextitem, tuple unpacking, break/continue, {% set %} (names,
// namespace attributes, blocks), {% macro %}, comments, whitespace control ({%- -%}), and the environment
// Hugging Face renders with (trim_blocks, lstrip_blocks, the template's final newline dropped).
// Expressions: literals (strings, integers, floats, true/false/none, lists, dicts), attribute and subscript
// access, slices, calls with keyword arguments, the arithmetic, comparison, logic, `in`, `~` and ternary
// operators, filters and tests (the common ones), string / dict methods, range, namespace, raise_exception
// and strftime_now. The output rules follow @huggingface/jinja where Python's Jinja differs (true, not True;
// none renders nothing; lists and dicts render as JSON; == on lists and dicts is identity).
//
// A template is data from the model's directory, never from a request; still, rendering is bounded (loop
// iterations, output size, macro depth), so no template can hang or exhaust the server.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kiln::serve::jinja {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// raise_exception() in a template: the template refuses its input (a bad request, not a broken template).
struct Raised : Error {
  using Error::Error;
};

struct Value;
struct Object;
struct Args;
using Array = std::vector<Value>;
using Function = std::function<Value(Args&)>;

struct Value {
  enum class Kind : uint8_t { Undefined, None, Bool, Int, Float, Str, List, Dict, Func };
  Kind kind = Kind::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<Array> list;
  std::shared_ptr<Object> dict;
  std::shared_ptr<Function> fn;

  Value() = default;
  static Value none() { Value v; v.kind = Kind::None; return v; }
  Value(bool x) : kind(Kind::Bool), b(x) {}
  Value(int64_t x) : kind(Kind::Int), i(x) {}
  Value(int x) : kind(Kind::Int), i(x) {}
  Value(double x) : kind(Kind::Float), f(x) {}
  Value(std::string x) : kind(Kind::Str), s(std::move(x)) {}
  Value(const char* x) : kind(Kind::Str), s(x) {}
  static Value of_list(Array a);
  static Value of_dict(std::shared_ptr<Object> o);
  static Value of_func(Function f);

  bool defined() const { return kind != Kind::Undefined; }
  bool truthy() const;
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float; }
  double num() const { return kind == Kind::Int ? double(i) : f; }
  std::string str() const;  // as {{ }} renders it
};

struct Object {
  std::vector<std::pair<std::string, Value>> items;  // insertion order
  bool is_namespace = false;
  const Value* find(std::string_view key) const;
  void set(const std::string& key, Value v);
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  const Value* kwarg(std::string_view name) const;
  // Positional i, else keyword `name`, else null.
  const Value* get(size_t i, std::string_view name) const;
};

Value from_json(const nlohmann::json& j);
Value from_json(const nlohmann::ordered_json& j);  // keeps the objects' key order (tojson writes it)
// JSON as @huggingface/jinja's tojson writes it (Python's json.dumps separators; indent > 0: pretty).
std::string to_json(const Value& v, int indent = 0, int depth = 0);

struct Node;
class Template {
 public:
  // Parses the template; throws Error naming the problem (and where).
  explicit Template(std::string_view source);
  ~Template();
  Template(Template&&) noexcept;
  // Renders with these variables (a Dict value, or a JSON object through from_json). Throws Error (Raised for
  // raise_exception).
  std::string render(const Value& context) const;
  std::string render(const nlohmann::ordered_json& context) const { return render(from_json(context)); }

 private:
  std::vector<std::unique_ptr<Node>> body_;
};

}  // namespace kiln::serve::jinja
