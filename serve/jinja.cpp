// Values and evaluation of serve/jinja.h's templates (the parser is serve/jinja_parse.cpp).
#include "serve/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <unordered_map>

#include "serve/jinja_ast.h"

namespace kiln::serve::jinja {

// ---- values ----

Value Value::of_list(Array a) {
  Value v;
  v.kind = Kind::List;
  v.list = std::make_shared<Array>(std::move(a));
  return v;
}
Value Value::of_dict(std::shared_ptr<Object> o) {
  Value v;
  v.kind = Kind::Dict;
  v.dict = std::move(o);
  return v;
}
Value Value::of_func(Function f) {
  Value v;
  v.kind = Kind::Func;
  v.fn = std::make_shared<Function>(std::move(f));
  return v;
}

const Value* Object::find(std::string_view key) const {
  for (const auto& [k, v] : items)
    if (k == key) return &v;
  return nullptr;
}
void Object::set(const std::string& key, Value v) {
  for (auto& [k, x] : items)
    if (k == key) {
      x = std::move(v);
      return;
    }
  items.emplace_back(key, std::move(v));
}

const Value* Args::kwarg(std::string_view name) const {
  for (const auto& [k, v] : kw)
    if (k == name) return &v;
  return nullptr;
}
const Value* Args::get(size_t i, std::string_view name) const { return i < pos.size() ? &pos[i] : kwarg(name); }

bool Value::truthy() const {
  switch (kind) {
    case Kind::Undefined: case Kind::None: return false;
    case Kind::Bool: return b;
    case Kind::Int: return i != 0;
    case Kind::Float: return f != 0;
    case Kind::Str: return !s.empty();
    case Kind::List: return !list->empty();
    case Kind::Dict: return !dict->items.empty();
    case Kind::Func: return true;
  }
  return false;
}

namespace {

// Numbers as JavaScript prints them (the shortest form that reads back), floats with a ".0" when integral.
std::string number(double f, bool is_float) {
  if (std::isnan(f)) return "NaN";
  if (std::isinf(f)) return f > 0 ? "Infinity" : "-Infinity";
  if (is_float && f == std::floor(f) && std::fabs(f) < 1e21) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f", f);
    return buf;
  }
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, f);
  return std::string(buf, r.ptr);
}

void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

}  // namespace

std::string to_json(const Value& v, int indent, int depth) {
  std::string out;
  switch (v.kind) {
    case Value::Kind::Undefined: case Value::Kind::None: return "null";
    case Value::Kind::Bool: return v.b ? "true" : "false";
    case Value::Kind::Int: return std::to_string(v.i);
    case Value::Kind::Float: return number(v.f, false);
    case Value::Kind::Str: json_string(out, v.s); return out;
    case Value::Kind::Func: throw Error("tojson: cannot convert a function to JSON");
    case Value::Kind::List: case Value::Kind::Dict: break;
  }
  const std::string pad = indent > 0 ? "\n" + std::string(size_t(indent) * size_t(depth), ' ') : "";
  const std::string child = indent > 0 ? pad + std::string(size_t(indent), ' ') : "";
  const std::string sep = indent > 0 ? "," : ", ";
  const bool list = v.kind == Value::Kind::List;
  const size_t n = list ? v.list->size() : v.dict->items.size();
  out += list ? '[' : '{';
  for (size_t k = 0; k < n; k++) {
    if (k) out += sep;
    out += child;
    if (list) {
      out += to_json((*v.list)[k], indent, depth + 1);
    } else {
      json_string(out, v.dict->items[k].first);
      out += ": " + to_json(v.dict->items[k].second, indent, depth + 1);
    }
  }
  if (n > 0) out += pad;
  out += list ? ']' : '}';
  return out;
}

std::string Value::str() const {
  switch (kind) {
    case Kind::Undefined: case Kind::None: return "";
    case Kind::Bool: return b ? "true" : "false";
    case Kind::Int: return std::to_string(i);
    case Kind::Float: return number(f, true);
    case Kind::Str: return s;
    case Kind::List: case Kind::Dict: return to_json(*this);
    case Kind::Func: return "[function]";
  }
  return "";
}

namespace {

template <class J>
Value from_json_impl(const J& j) {
  switch (j.type()) {
    case J::value_t::null: return Value::none();
    case J::value_t::boolean: return Value(j.template get<bool>());
    case J::value_t::number_integer: return Value(j.template get<int64_t>());
    case J::value_t::number_unsigned: return Value(int64_t(j.template get<uint64_t>()));
    case J::value_t::number_float: return Value(j.template get<double>());
    case J::value_t::string: return Value(j.template get<std::string>());
    case J::value_t::array: {
      Array a;
      for (const auto& x : j) a.push_back(from_json_impl(x));
      return Value::of_list(std::move(a));
    }
    case J::value_t::object: {
      auto o = std::make_shared<Object>();
      for (auto it = j.begin(); it != j.end(); ++it) o->items.emplace_back(it.key(), from_json_impl(it.value()));
      return Value::of_dict(o);
    }
    default: return Value();
  }
}

}  // namespace

Value from_json(const nlohmann::json& j) { return from_json_impl(j); }
Value from_json(const nlohmann::ordered_json& j) { return from_json_impl(j); }

// ---- evaluation ----

namespace {

constexpr int64_t kMaxIterations = 1 << 20;   // loop bodies run, over a whole render
constexpr size_t kMaxOutput = 16u << 20;      // bytes rendered
constexpr int kMaxDepth = 64;                 // nested macro calls

// UTF-8 code points of a string (indexing, slicing and length count characters, not bytes).
std::vector<std::string> chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t n = 1;
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0xF0) n = 4;
    else if (c >= 0xE0) n = 3;
    else if (c >= 0xC0) n = 2;
    n = std::min(n, s.size() - i);
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string strip(const std::string& s, const Value* chars_v, bool left, bool right) {
  auto in_set = [&](char c) { return chars_v && chars_v->kind == Value::Kind::Str ? chars_v->s.find(c) != std::string::npos : is_ws(c); };
  size_t a = 0, b = s.size();
  if (left) while (a < b && in_set(s[a])) a++;
  if (right) while (b > a && in_set(s[b - 1])) b--;
  return s.substr(a, b - a);
}

std::string kind_name(const Value& v) {
  static const char* names[] = {"undefined", "none", "boolean", "integer", "float", "string", "list", "dict", "function"};
  return names[int(v.kind)];
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.num() == b.num();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::Undefined: case Value::Kind::None: return true;
    case Value::Kind::Bool: return a.b == b.b;
    case Value::Kind::Str: return a.s == b.s;
    case Value::Kind::List: return a.list == b.list;  // identity, as @huggingface/jinja
    case Value::Kind::Dict: return a.dict == b.dict;
    case Value::Kind::Func: return a.fn == b.fn;
    default: return false;
  }
}

struct LoopBreak {};

class Interp {
 public:
  explicit Interp(const Value& ctx) {
    frames_.emplace_back();
    install_globals();
    if (ctx.kind == Value::Kind::Dict)
      for (const auto& [k, v] : ctx.dict->items) frames_.back()[k] = v;
  }

  std::string run(const Body& body) {
    std::string out;
    exec(body, out);
    return out;
  }

 private:
  std::vector<std::unordered_map<std::string, Value>> frames_;
  int64_t iterations_ = 0;
  int depth_ = 0;
  enum class Flow { Normal, Break, Continue };

  [[noreturn]] static void fail(const Expr& e, const std::string& m) {
    throw Error("chat template line " + std::to_string(e.line) + ": " + m);
  }

  Value lookup(const std::string& name) const {
    for (auto it = frames_.rbegin(); it != frames_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value();
  }
  void assign(const std::string& name, Value v) { frames_.back()[name] = std::move(v); }

  void install_globals() {
    auto& g = frames_.back();
    g["raise_exception"] = Value::of_func([](Args& a) -> Value {
      throw Raised(a.pos.empty() ? "raise_exception" : a.pos[0].str());
    });
    g["range"] = Value::of_func([](Args& a) {
      int64_t start = 0, stop = 0, step = 1;
      auto num = [&](size_t i) {
        if (a.pos[i].kind != Value::Kind::Int) throw Error("range: arguments must be integers");
        return a.pos[i].i;
      };
      if (a.pos.size() == 1) stop = num(0);
      else if (a.pos.size() >= 2) start = num(0), stop = num(1), step = a.pos.size() > 2 ? num(2) : 1;
      if (step == 0) throw Error("range: step must not be zero");
      Array out;
      for (int64_t x = start; step > 0 ? x < stop : x > stop; x += step) {
        if (out.size() >= size_t(kMaxIterations)) throw Error("range: too many items");
        out.push_back(Value(x));
      }
      return Value::of_list(std::move(out));
    });
    g["namespace"] = Value::of_func([](Args& a) {
      auto o = std::make_shared<Object>();
      o->is_namespace = true;
      for (const auto& p : a.pos)
        if (p.kind == Value::Kind::Dict) for (const auto& [k, v] : p.dict->items) o->set(k, v);
      for (const auto& [k, v] : a.kw) o->set(k, v);
      return Value::of_dict(o);
    });
    g["strftime_now"] = Value::of_func([](Args& a) {
      const std::string fmt = a.pos.empty() ? "%Y-%m-%d" : a.pos[0].str();
      const std::time_t t = std::time(nullptr);
      std::tm tm{};
      localtime_r(&t, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value(std::string(buf, n));
    });
  }

  void emit(std::string& out, const std::string& s) {
    out += s;
    if (out.size() > kMaxOutput) throw Error("chat template: the output exceeds 16 MiB");
  }

  Flow exec(const Body& body, std::string& out) {
    for (const auto& n : body) {
      const Flow f = exec(*n, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec(const Node& n, std::string& out) {
    switch (n.k) {
      case Node::K::Text: emit(out, n.text); return Flow::Normal;
      case Node::K::Output: emit(out, eval(*n.expr).str()); return Flow::Normal;
      case Node::K::If:
        for (const auto& [c, b] : n.branches)
          if (eval(*c).truthy()) return exec(b, out);
        return exec(n.else_body, out);
      case Node::K::For: return exec_for(n, out);
      case Node::K::Set: {
        Value v = eval(*n.expr);
        if (n.attr) {
          Value obj = lookup(n.targets[0]);
          if (obj.kind != Value::Kind::Dict || !obj.dict->is_namespace)
            fail(*n.expr, "cannot set an attribute of " + n.targets[0] + ", which is not a namespace");
          obj.dict->set(n.targets[1], std::move(v));
        } else if (n.targets.size() == 1) {
          assign(n.targets[0], std::move(v));
        } else {
          if (v.kind != Value::Kind::List || v.list->size() != n.targets.size())
            fail(*n.expr, "cannot unpack into " + std::to_string(n.targets.size()) + " names");
          for (size_t i = 0; i < n.targets.size(); i++) assign(n.targets[i], (*v.list)[i]);
        }
        return Flow::Normal;
      }
      case Node::K::SetBlock: {
        std::string s;
        exec(n.body, s);
        assign(n.targets[0], Value(std::move(s)));
        return Flow::Normal;
      }
      case Node::K::Macro: {
        const Node* m = &n;
        assign(n.targets[0], Value::of_func([this, m](Args& a) {
          if (++depth_ > kMaxDepth) throw Error("chat template: macros nest deeper than 64 calls");
          frames_.emplace_back();
          for (size_t i = 0; i < m->params.size(); i++) {
            const Value* v = a.get(i, m->params[i]);
            frames_.back()[m->params[i]] = v ? *v : m->defaults[i] ? eval(*m->defaults[i]) : Value();
          }
          std::string s;
          try {
            exec(m->body, s);
          } catch (...) {
            frames_.pop_back();
            depth_--;
            throw;
          }
          frames_.pop_back();
          depth_--;
          return Value(std::move(s));
        }));
        return Flow::Normal;
      }
      case Node::K::Break: return Flow::Break;
      case Node::K::Continue: return Flow::Continue;
    }
    return Flow::Normal;
  }

  // Items a for loop (or a filter) walks: a list's items, a dict's keys, a string's characters.
  Array items_of(const Value& v, const Expr& where) {
    switch (v.kind) {
      case Value::Kind::List: return *v.list;
      case Value::Kind::Dict: {
        Array a;
        for (const auto& kv : v.dict->items) a.push_back(Value(kv.first));
        return a;
      }
      case Value::Kind::Str: {
        Array a;
        for (auto& c : chars(v.s)) a.push_back(Value(std::move(c)));
        return a;
      }
      case Value::Kind::Undefined: case Value::Kind::None: return {};
      default: fail(where, "cannot iterate over a " + kind_name(v));
    }
  }

  Flow exec_for(const Node& n, std::string& out) {
    const Array all = items_of(eval(*n.expr), *n.expr);
    frames_.emplace_back();
    auto bind = [&](const Value& item) {
      if (n.targets.size() == 1) {
        frames_.back()[n.targets[0]] = item;
        return;
      }
      if (item.kind != Value::Kind::List || item.list->size() != n.targets.size())
        fail(*n.expr, "cannot unpack a loop item into " + std::to_string(n.targets.size()) + " names");
      for (size_t i = 0; i < n.targets.size(); i++) frames_.back()[n.targets[i]] = (*item.list)[i];
    };
    Array items;
    if (n.cond) {
      for (const auto& it : all) {
        bind(it);
        if (eval(*n.cond).truthy()) items.push_back(it);
      }
    } else {
      items = all;
    }
    for (size_t k = 0; k < items.size(); k++) {
      if (++iterations_ > kMaxIterations) throw Error("chat template: more than 2^20 loop iterations");
      // Each iteration starts from the enclosing scope (a set inside the loop does not outlive it).
      frames_.back().clear();
      bind(items[k]);
      auto loop = std::make_shared<Object>();
      const int64_t len = int64_t(items.size()), i = int64_t(k);
      loop->set("index", Value(i + 1));
      loop->set("index0", Value(i));
      loop->set("revindex", Value(len - i));
      loop->set("revindex0", Value(len - i - 1));
      loop->set("first", Value(k == 0));
      loop->set("last", Value(k + 1 == items.size()));
      loop->set("length", Value(len));
      loop->set("previtem", k > 0 ? items[k - 1] : Value());
      loop->set("nextitem", k + 1 < items.size() ? items[k + 1] : Value());
      frames_.back()["loop"] = Value::of_dict(loop);
      if (exec(n.body, out) == Flow::Break) break;
    }
    frames_.pop_back();
    if (items.empty()) exec(n.else_body, out);
    return Flow::Normal;
  }

  Args eval_args(const Expr& e, size_t first) {
    Args a;
    for (size_t i = first; i < e.sub.size(); i++) a.pos.push_back(eval(*e.sub[i]));
    for (const auto& [k, v] : e.kw) a.kw.emplace_back(k, eval(*v));
    return a;
  }

  Value eval(const Expr& e);
  Value attribute(const Value& obj, const std::string& name, const Expr& e);
  Value index(const Value& obj, const Value& key, const Expr& e);
  Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step, const Expr& e);
  Value binary(const Expr& e);
  Value filter(const std::string& name, const Value& v, Args& a, const Expr& e);
  bool test(const std::string& name, const Value& v, Args& a, const Expr& e);
};

Value Interp::eval(const Expr& e) {
  switch (e.k) {
    case Expr::K::Lit: return e.lit;
    case Expr::K::Name: return lookup(e.name);
    case Expr::K::Attr: return attribute(eval(*e.sub[0]), e.name, e);
    case Expr::K::Index: return index(eval(*e.sub[0]), eval(*e.sub[1]), e);
    case Expr::K::Slice: {
      auto part = [&](size_t i) { return e.sub[i] ? eval(*e.sub[i]) : Value(); };
      return slice(eval(*e.sub[0]), part(1), part(2), part(3), e);
    }
    case Expr::K::Call: {
      Value f = eval(*e.sub[0]);
      if (f.kind != Value::Kind::Func) fail(e, "calling a " + kind_name(f) + ", not a function");
      Args a = eval_args(e, 1);
      return (*f.fn)(a);
    }
    case Expr::K::Filter: {
      Value v = eval(*e.sub[0]);
      Args a = eval_args(e, 1);
      return filter(e.name, v, a, e);
    }
    case Expr::K::Test: {
      Value v = e.sub[0]->k == Expr::K::Name ? lookup(e.sub[0]->name) : eval(*e.sub[0]);
      Args a = eval_args(e, 1);
      return Value(test(e.name, v, a, e) != e.negate);
    }
    case Expr::K::Unary: {
      Value v = eval(*e.sub[0]);
      if (e.name == "not") return Value(!v.truthy());
      if (!v.is_number()) fail(e, "unary " + e.name + " on a " + kind_name(v));
      if (e.name == "+") return v;
      return v.kind == Value::Kind::Int ? Value(-v.i) : Value(-v.f);
    }
    case Expr::K::Binary: return binary(e);
    case Expr::K::Cond:
      if (eval(*e.sub[1]).truthy()) return eval(*e.sub[0]);
      return e.sub.size() > 2 ? eval(*e.sub[2]) : Value();
    case Expr::K::ListLit: {
      Array a;
      for (const auto& x : e.sub) a.push_back(eval(*x));
      return Value::of_list(std::move(a));
    }
    case Expr::K::DictLit: {
      auto o = std::make_shared<Object>();
      for (size_t i = 0; i + 1 < e.sub.size(); i += 2) o->set(eval(*e.sub[i]).str(), eval(*e.sub[i + 1]));
      return Value::of_dict(o);
    }
  }
  return Value();
}

Value Interp::binary(const Expr& e) {
  const std::string& op = e.name;
  if (op == "and") {
    Value a = eval(*e.sub[0]);
    return a.truthy() ? eval(*e.sub[1]) : a;
  }
  if (op == "or") {
    Value a = eval(*e.sub[0]);
    return a.truthy() ? a : eval(*e.sub[1]);
  }
  const Value a = eval(*e.sub[0]), b = eval(*e.sub[1]);
  if (op == "==") return Value(equal(a, b));
  if (op == "!=") return Value(!equal(a, b));
  if (op == "~") return Value(a.str() + b.str());
  if (op == "in" || op == "not in") {
    bool in = false;
    if (b.kind == Value::Kind::Str) {
      if (a.kind != Value::Kind::Str) fail(e, "'in <string>' needs a string on the left");
      in = b.s.find(a.s) != std::string::npos;
    } else if (b.kind == Value::Kind::List) {
      for (const auto& x : *b.list) in = in || equal(a, x);
    } else if (b.kind == Value::Kind::Dict) {
      in = a.kind == Value::Kind::Str && b.dict->find(a.s) != nullptr;
    } else if (b.defined() && b.kind != Value::Kind::None) {
      fail(e, "'in' on a " + kind_name(b));
    }
    return Value(op == "in" ? in : !in);
  }
  if (op == "+" && (a.kind == Value::Kind::Str || b.kind == Value::Kind::Str)) {
    if (!a.defined() || !b.defined()) fail(e, "cannot perform operation + on undefined values");
    if (a.kind == Value::Kind::None || b.kind == Value::Kind::None) fail(e, "cannot perform operation on null values");
    return Value(a.str() + b.str());
  }
  if (op == "+" && a.kind == Value::Kind::List && b.kind == Value::Kind::List) {
    Array r = *a.list;
    r.insert(r.end(), b.list->begin(), b.list->end());
    return Value::of_list(std::move(r));
  }
  if (op == "*" && a.kind == Value::Kind::Str && b.kind == Value::Kind::Int) {
    if (b.i < 0 || int64_t(a.s.size()) * b.i > int64_t(kMaxOutput)) fail(e, "string repetition out of range");
    std::string r;
    for (int64_t k = 0; k < b.i; k++) r += a.s;
    return Value(std::move(r));
  }
  if (!a.is_number() || !b.is_number()) {
    if (!a.defined() || !b.defined()) fail(e, "cannot perform operation " + op + " on undefined values");
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      if (a.kind == Value::Kind::Str && b.kind == Value::Kind::Str)
        return Value(op == "<" ? a.s < b.s : op == ">" ? a.s > b.s : op == "<=" ? a.s <= b.s : a.s >= b.s);
    }
    fail(e, "cannot apply " + op + " to a " + kind_name(a) + " and a " + kind_name(b));
  }
  const bool ints = a.kind == Value::Kind::Int && b.kind == Value::Kind::Int;
  const double x = a.num(), y = b.num();
  if (op == "<") return Value(x < y);
  if (op == ">") return Value(x > y);
  if (op == "<=") return Value(x <= y);
  if (op == ">=") return Value(x >= y);
  if (op == "+") return ints ? Value(int64_t(uint64_t(a.i) + uint64_t(b.i))) : Value(x + y);
  if (op == "-") return ints ? Value(int64_t(uint64_t(a.i) - uint64_t(b.i))) : Value(x - y);
  if (op == "*") return ints ? Value(int64_t(uint64_t(a.i) * uint64_t(b.i))) : Value(x * y);
  if (op == "/") {
    if (y == 0) fail(e, "division by zero");
    return Value(x / y);
  }
  if (op == "//" || op == "%") {
    if (y == 0) fail(e, "division by zero");
    if (ints) {
      if (a.i == INT64_MIN && b.i == -1) fail(e, "integer overflow");
      int64_t q = a.i / b.i, r = a.i % b.i;
      if (r != 0 && ((r < 0) != (b.i < 0))) q--, r += b.i;  // Python's floor semantics
      return op == "//" ? Value(q) : Value(r);
    }
    const double q = std::floor(x / y);
    return op == "//" ? Value(q) : Value(x - q * y);
  }
  if (op == "**") return ints && b.i >= 0 ? Value(int64_t(std::pow(x, y))) : Value(std::pow(x, y));
  fail(e, "unknown operator " + op);
}

Value Interp::index(const Value& obj, const Value& key, const Expr& e) {
  if (obj.kind == Value::Kind::Dict) {
    if (key.kind != Value::Kind::Str) return Value();
    const Value* v = obj.dict->find(key.s);
    return v ? *v : attribute(obj, key.s, e);
  }
  if (obj.kind == Value::Kind::List || obj.kind == Value::Kind::Str) {
    if (key.kind != Value::Kind::Int) fail(e, "a " + kind_name(obj) + " index must be an integer");
    const std::vector<std::string> cs = obj.kind == Value::Kind::Str ? chars(obj.s) : std::vector<std::string>{};
    const int64_t n = obj.kind == Value::Kind::List ? int64_t(obj.list->size()) : int64_t(cs.size());
    const int64_t i = key.i < 0 ? key.i + n : key.i;
    if (i < 0 || i >= n) return Value();
    return obj.kind == Value::Kind::List ? (*obj.list)[size_t(i)] : Value(cs[size_t(i)]);
  }
  if (!obj.defined()) return Value();
  fail(e, "cannot index a " + kind_name(obj));
}

Value Interp::slice(const Value& obj, const Value& start, const Value& stop, const Value& step_v, const Expr& e) {
  Array src;
  const bool str = obj.kind == Value::Kind::Str;
  if (str) {
    for (auto& c : chars(obj.s)) src.push_back(Value(std::move(c)));
  } else if (obj.kind == Value::Kind::List) {
    src = *obj.list;
  } else {
    fail(e, "cannot slice a " + kind_name(obj));
  }
  const int64_t n = int64_t(src.size());
  auto num = [&](const Value& v, int64_t dflt) {
    if (!v.defined() || v.kind == Value::Kind::None) return dflt;
    if (v.kind != Value::Kind::Int) fail(e, "slice bounds must be integers");
    return v.i;
  };
  const int64_t step = num(step_v, 1);
  if (step == 0) fail(e, "slice step cannot be zero");
  // Python's slice rules.
  auto clamp = [&](int64_t x, int64_t lo, int64_t hi) { return std::max(lo, std::min(hi, x)); };
  int64_t a, b;
  if (step > 0) {
    a = num(start, 0);
    b = num(stop, n);
    a = a < 0 ? clamp(a + n, 0, n) : clamp(a, 0, n);
    b = b < 0 ? clamp(b + n, 0, n) : clamp(b, 0, n);
  } else {
    a = num(start, n - 1);
    b = stop.defined() && stop.kind != Value::Kind::None ? num(stop, 0) : -n - 1;
    a = a < 0 ? clamp(a + n, -1, n - 1) : clamp(a, -1, n - 1);
    b = b < 0 ? clamp(b + n, -1, n - 1) : clamp(b, -1, n - 1);
  }
  Array out;
  for (int64_t i = a; step > 0 ? i < b : i > b; i += step) out.push_back(src[size_t(i)]);
  if (!str) return Value::of_list(std::move(out));
  std::string s;
  for (const auto& c : out) s += c.s;
  return Value(std::move(s));
}

// obj.name: a dict's key, or a method of a string or dict.
Value Interp::attribute(const Value& obj, const std::string& name, const Expr& e) {
  if (obj.kind == Value::Kind::Dict) {
    if (const Value* v = obj.dict->find(name)) return *v;
    auto d = obj.dict;
    if (name == "items" || name == "keys" || name == "values")
      return Value::of_func([d, name](Args&) {
        Array a;
        for (const auto& [k, v] : d->items)
          a.push_back(name == "items" ? Value::of_list({Value(k), v}) : name == "keys" ? Value(k) : v);
        return Value::of_list(std::move(a));
      });
    if (name == "get")
      return Value::of_func([d](Args& a) {
        const Value* v = !a.pos.empty() && a.pos[0].kind == Value::Kind::Str ? d->find(a.pos[0].s) : nullptr;
        return v ? *v : a.pos.size() > 1 ? a.pos[1] : Value::none();
      });
    return Value();
  }
  if (obj.kind == Value::Kind::Str) {
    const std::string s = obj.s;
    auto method = [&](auto fn) { return Value::of_func(fn); };
    if (name == "upper" || name == "lower")
      return method([s, name](Args&) {
        std::string r = s;
        for (char& c : r) c = char(name == "upper" ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
        return Value(r);
      });
    if (name == "strip" || name == "lstrip" || name == "rstrip")
      return method([s, name](Args& a) {
        return Value(strip(s, a.pos.empty() ? nullptr : &a.pos[0], name != "rstrip", name != "lstrip"));
      });
    if (name == "startswith" || name == "endswith")
      return method([s, name](Args& a) {
        if (a.pos.empty() || a.pos[0].kind != Value::Kind::Str) throw Error(name + ": expects a string");
        const std::string& p = a.pos[0].s;
        if (p.size() > s.size()) return Value(false);
        return Value(name == "startswith" ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0);
      });
    if (name == "split")
      return method([s](Args& a) {
        Array out;
        const Value* sep = a.get(0, "sep");
        if (!sep || sep->kind == Value::Kind::None) {
          std::string cur;
          for (char c : s) {
            if (is_ws(c)) {
              if (!cur.empty()) out.push_back(Value(cur)), cur.clear();
            } else {
              cur += c;
            }
          }
          if (!cur.empty()) out.push_back(Value(cur));
          return Value::of_list(std::move(out));
        }
        if (sep->kind != Value::Kind::Str || sep->s.empty()) throw Error("split: the separator must be a non-empty string");
        size_t i = 0;
        for (;;) {
          const size_t j = s.find(sep->s, i);
          if (j == std::string::npos) break;
          out.push_back(Value(s.substr(i, j - i)));
          i = j + sep->s.size();
        }
        out.push_back(Value(s.substr(i)));
        return Value::of_list(std::move(out));
      });
    if (name == "replace")
      return method([s](Args& a) {
        if (a.pos.size() < 2 || a.pos[0].kind != Value::Kind::Str || a.pos[0].s.empty()) return Value(s);
        std::string r;
        size_t i = 0;
        for (size_t j; (j = s.find(a.pos[0].s, i)) != std::string::npos; i = j + a.pos[0].s.size()) r += s.substr(i, j - i) + a.pos[1].str();
        return Value(r + s.substr(i));
      });
    if (name == "title" || name == "capitalize") {
      Args none;
      Value v = filter(name, obj, none, e);
      return method([v](Args&) { return v; });
    }
    return Value();
  }
  return Value();
}

Value Interp::filter(const std::string& name, const Value& v, Args& a, const Expr& e) {
  using K = Value::Kind;
  if (name == "length" || name == "count") {
    if (v.kind == K::Str) return Value(int64_t(chars(v.s).size()));
    if (v.kind == K::List) return Value(int64_t(v.list->size()));
    if (v.kind == K::Dict) return Value(int64_t(v.dict->items.size()));
    fail(e, "length of a " + kind_name(v));
  }
  if (name == "tojson") {
    const Value* ind = a.get(0, "indent");
    return Value(to_json(v, ind && ind->kind == K::Int ? int(std::clamp<int64_t>(ind->i, 0, 32)) : 0));
  }
  if (name == "string") return Value(v.str());
  if (name == "trim") return Value(strip(v.str(), a.pos.empty() ? nullptr : &a.pos[0], true, true));
  if (name == "upper" || name == "lower") return attribute(Value(v.str()), name, e).fn->operator()(a);
  if (name == "title" || name == "capitalize") {
    std::string s = v.str();
    bool start = true;
    for (size_t i = 0; i < s.size(); i++) {
      const unsigned char c = static_cast<unsigned char>(s[i]);
      s[i] = char(start ? std::toupper(c) : name == "capitalize" ? std::tolower(c) : std::tolower(c));
      if (name == "title") start = is_ws(s[i]) || s[i] == '-' || s[i] == '(';
      else start = false;
    }
    return Value(s);
  }
  if (name == "default" || name == "d") {
    const Value* bool_mode = a.get(1, "boolean");
    const bool use = bool_mode && bool_mode->truthy() ? !v.truthy() : !v.defined();
    return use ? (a.pos.empty() ? Value("") : a.pos[0]) : v;
  }
  if (name == "first" || name == "last") {
    Array items = items_of(v, e);
    if (items.empty()) return Value();
    return name == "first" ? items.front() : items.back();
  }
  if (name == "join") {
    std::string sep = a.pos.empty() ? "" : a.pos[0].str(), out;
    const Array items = items_of(v, e);
    for (size_t i = 0; i < items.size(); i++) out += (i ? sep : "") + items[i].str();
    return Value(out);
  }
  if (name == "list") return Value::of_list(items_of(v, e));
  if (name == "reverse") {
    if (v.kind == K::Str) {
      auto cs = chars(v.s);
      std::string r;
      for (auto it = cs.rbegin(); it != cs.rend(); ++it) r += *it;
      return Value(r);
    }
    Array items = items_of(v, e);
    std::reverse(items.begin(), items.end());
    return Value::of_list(std::move(items));
  }
  if (name == "items") {
    if (v.kind != K::Dict) fail(e, "items of a " + kind_name(v));
    Args none;
    return (*attribute(v, "items", e).fn)(none);
  }
  if (name == "int") {
    if (v.kind == K::Int) return v;
    if (v.kind == K::Float) return Value(int64_t(v.f));
    if (v.kind == K::Bool) return Value(int64_t(v.b));
    if (v.kind == K::Str) {
      char* end = nullptr;
      const long long x = std::strtoll(v.s.c_str(), &end, 10);
      return Value(int64_t(end && *end == 0 && !v.s.empty() ? x : 0));
    }
    return Value(int64_t(0));
  }
  if (name == "float") {
    if (v.is_number()) return Value(v.num());
    if (v.kind == K::Str) return Value(std::strtod(v.s.c_str(), nullptr));
    return Value(0.0);
  }
  if (name == "abs") {
    if (!v.is_number()) fail(e, "abs of a " + kind_name(v));
    return v.kind == K::Int ? Value(v.i < 0 ? -v.i : v.i) : Value(std::fabs(v.f));
  }
  if (name == "round") {
    if (!v.is_number()) fail(e, "round of a " + kind_name(v));
    const Value* p = a.get(0, "precision");
    const double m = std::pow(10.0, p && p->kind == K::Int ? double(p->i) : 0.0);
    return Value(std::round(v.num() * m) / m);
  }
  if (name == "replace") return (*attribute(Value(v.str()), "replace", e).fn)(a);
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr" || name == "map") {
    const bool attr = name == "selectattr" || name == "rejectattr";
    Array out;
    for (const Value& item : items_of(v, e)) {
      if (name == "map") {
        const Value* at = a.kwarg("attribute");
        if (at) {
          out.push_back(index(item, *at, e));
        } else if (!a.pos.empty()) {
          Args rest;
          rest.pos.assign(a.pos.begin() + 1, a.pos.end());
          out.push_back(filter(a.pos[0].str(), item, rest, e));
        }
        continue;
      }
      Value subject = item;
      size_t t = 0;
      if (attr) {
        if (a.pos.empty()) fail(e, name + " needs an attribute");
        subject = index(item, a.pos[0], e);
        t = 1;
      }
      bool ok = subject.truthy();
      if (a.pos.size() > t) {
        Args targs;
        targs.pos.assign(a.pos.begin() + long(t) + 1, a.pos.end());
        ok = test(a.pos[t].str(), subject, targs, e);
      }
      if (ok == (name == "select" || name == "selectattr")) out.push_back(item);
    }
    return Value::of_list(std::move(out));
  }
  if (name == "dictsort") {
    if (v.kind != K::Dict) fail(e, "dictsort of a " + kind_name(v));
    auto items = v.dict->items;
    std::sort(items.begin(), items.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    Array out;
    for (auto& [k, x] : items) out.push_back(Value::of_list({Value(k), x}));
    return Value::of_list(std::move(out));
  }
  if (name == "unique") {
    Array out;
    for (const Value& x : items_of(v, e))
      if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return equal(x, y); })) out.push_back(x);
    return Value::of_list(std::move(out));
  }
  fail(e, "unknown filter '" + name + "'");
}

bool Interp::test(const std::string& name, const Value& v, Args& a, const Expr& e) {
  using K = Value::Kind;
  if (name == "defined") return v.defined();
  if (name == "undefined") return !v.defined();
  if (name == "none") return v.kind == K::None;
  if (name == "string") return v.kind == K::Str;
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind == K::Int;
  if (name == "float") return v.kind == K::Float;
  if (name == "boolean") return v.kind == K::Bool;
  if (name == "true") return v.kind == K::Bool && v.b;
  if (name == "false") return v.kind == K::Bool && !v.b;
  if (name == "mapping") return v.kind == K::Dict;
  if (name == "iterable") return v.kind == K::List || v.kind == K::Dict || v.kind == K::Str;
  if (name == "sequence") return v.kind == K::List || v.kind == K::Str;
  if (name == "callable") return v.kind == K::Func;
  if (name == "odd" || name == "even") {
    if (v.kind != K::Int) fail(e, name + " of a " + kind_name(v));
    return (v.i % 2 != 0) == (name == "odd");
  }
  if (name == "lower" || name == "upper") {
    if (v.kind != K::Str) return false;
    for (char c : v.s)
      if (name == "lower" ? std::isupper(static_cast<unsigned char>(c)) : std::islower(static_cast<unsigned char>(c))) return false;
    return true;
  }
  if (name == "equalto" || name == "eq" || name == "==" || name == "sameas") {
    if (a.pos.empty()) fail(e, name + " needs a value");
    return equal(v, a.pos[0]);
  }
  if (name == "ne" || name == "!=") return a.pos.empty() ? true : !equal(v, a.pos[0]);
  if (name == "in") {
    if (a.pos.empty()) fail(e, "in needs a container");
    const Value& c = a.pos[0];
    if (c.kind == K::Str) return v.kind == K::Str && c.s.find(v.s) != std::string::npos;
    if (c.kind == K::List) return std::any_of(c.list->begin(), c.list->end(), [&](const Value& x) { return equal(v, x); });
    if (c.kind == K::Dict) return v.kind == K::Str && c.dict->find(v.s);
    return false;
  }
  fail(e, "unknown test '" + name + "'");
}

}  // namespace

Template::Template(std::string_view source) : body_(parse_template(source)) {}
Template::~Template() = default;
Template::Template(Template&&) noexcept = default;

std::string Template::render(const Value& context) const { return Interp(context).run(body_); }

}  // namespace kiln::serve::jinja
