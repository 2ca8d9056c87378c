// Lexing and parsing of serve/jinja.h's templates.
#include <cctype>
#include <cstdlib>

#include "serve/jinja_ast.h"

namespace kiln::serve::jinja {

namespace {

// Hugging Face's environment (as @huggingface/jinja applies it): the final newline dropped, lstrip_blocks
// (spaces and tabs before a block or comment tag at a line's start) and trim_blocks (the newline after one).
std::string preprocess(std::string_view in) {
  std::string s(in);
  if (!s.empty() && s.back() == '\n') s.pop_back();
  std::string a;
  a.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (i == 0 || s[i - 1] == '\n') {
      size_t j = i;
      while (j < s.size() && (s[j] == ' ' || s[j] == '\t')) j++;
      if (j + 1 < s.size() && s[j] == '{' && (s[j + 1] == '#' || s[j + 1] == '%' || s[j + 1] == '-')) i = j;
    }
    a += s[i++];
  }
  std::string b;
  b.reserve(a.size());
  for (size_t i = 0; i < a.size(); i++) {
    b += a[i];
    if (a[i] == '}' && i > 0 && (a[i - 1] == '#' || a[i - 1] == '%' || a[i - 1] == '-') && i + 1 < a.size() &&
        a[i + 1] == '\n')
      i++;
  }
  return b;
}

struct Tok {
  enum class T { Text, OpenExpr, CloseExpr, OpenStmt, CloseStmt, Name, Str, Int, Float, Op, End };
  T t = T::End;
  std::string s;
  int64_t i = 0;
  double f = 0;
  int line = 0;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::vector<Tok> lex(const std::string& src) {
  std::vector<Tok> out;
  size_t p = 0;
  int line = 1;
  bool strip_next = false;
  auto fail = [&](const std::string& m) -> void { throw Error("chat template line " + std::to_string(line) + ": " + m); };
  auto rstrip_last_text = [&] {
    if (!out.empty() && out.back().t == Tok::T::Text) {
      std::string& t = out.back().s;
      while (!t.empty() && is_space(t.back())) t.pop_back();
    }
  };
  while (p < src.size()) {
    // Text up to the next tag.
    size_t q = p;
    while (q < src.size() && !(src[q] == '{' && q + 1 < src.size() && (src[q + 1] == '{' || src[q + 1] == '%' || src[q + 1] == '#')))
      q++;
    if (q > p) {
      std::string text = src.substr(p, q - p);
      if (strip_next) {
        size_t k = 0;
        while (k < text.size() && is_space(text[k])) k++;
        text.erase(0, k);
      }
      for (char c : src.substr(p, q - p)) line += c == '\n';
      out.push_back({Tok::T::Text, std::move(text), 0, 0, line});
    }
    strip_next = false;
    if (q >= src.size()) break;
    const char kind = src[q + 1];
    p = q + 2;
    const bool lstrip = p < src.size() && src[p] == '-';
    if (lstrip) {
      rstrip_last_text();
      p++;
    }
    if (kind == '#') {
      const size_t e = src.find("#}", p);
      if (e == std::string::npos) fail("unclosed comment");
      for (size_t k = p; k < e; k++) line += src[k] == '\n';
      strip_next = e > p && src[e - 1] == '-';
      p = e + 2;
      continue;
    }
    out.push_back({kind == '{' ? Tok::T::OpenExpr : Tok::T::OpenStmt, "", 0, 0, line});
    const char close = kind == '{' ? '}' : '%';
    int depth = 0;  // braces of dict literals inside the tag
    for (;;) {
      while (p < src.size() && is_space(src[p])) line += src[p++] == '\n';
      if (p >= src.size()) fail("unclosed tag");
      const char c = src[p];
      const bool dash_close = c == '-' && src.compare(p + 1, 2, std::string{close, '}'}) == 0;
      const bool plain_close = c == close && p + 1 < src.size() && src[p + 1] == '}';
      if (depth == 0 && (dash_close || plain_close)) {
        strip_next = c == '-';
        p += c == '-' ? 3 : 2;
        out.push_back({kind == '{' ? Tok::T::CloseExpr : Tok::T::CloseStmt, "", 0, 0, line});
        break;
      }
      if (c == '\'' || c == '"') {
        std::string s;
        size_t k = p + 1;
        for (;; k++) {
          if (k >= src.size()) fail("unterminated string");
          if (src[k] == c) break;
          if (src[k] == '\\' && k + 1 < src.size()) {
            const char e = src[++k];
            switch (e) {
              case 'n': s += '\n'; break;
              case 't': s += '\t'; break;
              case 'r': s += '\r'; break;
              case 'b': s += '\b'; break;
              case 'f': s += '\f'; break;
              case 'v': s += '\v'; break;
              case '0': s += '\0'; break;
              default: s += e; break;  // \\ \' \" and anything else: the character itself
            }
            continue;
          }
          line += src[k] == '\n';
          s += src[k];
        }
        out.push_back({Tok::T::Str, std::move(s), 0, 0, line});
        p = k + 1;
        continue;
      }
      if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t k = p;
        while (k < src.size() && std::isdigit(static_cast<unsigned char>(src[k]))) k++;
        bool is_float = false;
        if (k + 1 < src.size() && src[k] == '.' && std::isdigit(static_cast<unsigned char>(src[k + 1]))) {
          is_float = true;
          k++;
          while (k < src.size() && std::isdigit(static_cast<unsigned char>(src[k]))) k++;
        }
        const std::string num = src.substr(p, k - p);
        Tok t{is_float ? Tok::T::Float : Tok::T::Int, num, 0, 0, line};
        if (is_float) t.f = std::strtod(num.c_str(), nullptr);
        else t.i = std::strtoll(num.c_str(), nullptr, 10);  // saturates on overflow
        out.push_back(t);
        p = k;
        continue;
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t k = p;
        while (k < src.size() && (std::isalnum(static_cast<unsigned char>(src[k])) || src[k] == '_')) k++;
        out.push_back({Tok::T::Name, src.substr(p, k - p), 0, 0, line});
        p = k;
        continue;
      }
      static const char* two[] = {"**", "//", "==", "!=", "<=", ">="};
      std::string op;
      for (const char* t : two)
        if (src.compare(p, 2, t) == 0) op = t;
      if (op.empty()) {
        if (std::string_view("+-*/%~<>=()[]{},.:|").find(c) == std::string_view::npos)
          fail(std::string("unexpected character '") + c + "'");
        op = std::string(1, c);
      }
      if (op == "{") depth++;
      if (op == "}") depth--;
      out.push_back({Tok::T::Op, op, 0, 0, line});
      p += op.size();
    }
  }
  out.push_back({Tok::T::End, "", 0, 0, line});
  return out;
}

class Parser {
 public:
  explicit Parser(std::vector<Tok> t) : t_(std::move(t)) {}

  Body parse() {
    std::string end;
    Body b = block({}, end);
    if (!end.empty()) fail("unexpected {% " + end + " %}");
    return b;
  }

 private:
  std::vector<Tok> t_;
  size_t p_ = 0;

  const Tok& peek(size_t k = 0) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  [[noreturn]] void fail(const std::string& m) const {
    throw Error("chat template line " + std::to_string(peek().line) + ": " + m);
  }
  bool is_op(const char* op, size_t k = 0) const { return peek(k).t == Tok::T::Op && peek(k).s == op; }
  bool is_name(const char* n, size_t k = 0) const { return peek(k).t == Tok::T::Name && peek(k).s == n; }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(std::string("expected '") + op + "'");
    p_++;
  }
  std::string expect_name() {
    if (peek().t != Tok::T::Name) fail("expected a name");
    return t_[p_++].s;
  }
  void expect(Tok::T t, const char* what) {
    if (peek().t != t) fail(std::string("expected ") + what);
    p_++;
  }

  // Nodes until a {% keyword %} in `ends` (consumed up to the keyword; its name goes to `end`) or the input's end.
  Body block(const std::vector<std::string>& ends, std::string& end) {
    Body body;
    end.clear();
    for (;;) {
      const Tok& t = peek();
      if (t.t == Tok::T::End) {
        if (!ends.empty()) fail("missing {% " + ends[0] + " %}");
        return body;
      }
      if (t.t == Tok::T::Text) {
        auto n = std::make_unique<Node>();
        n->k = Node::K::Text;
        n->text = t.s;
        p_++;
        body.push_back(std::move(n));
      } else if (t.t == Tok::T::OpenExpr) {
        p_++;
        auto n = std::make_unique<Node>();
        n->k = Node::K::Output;
        n->line = t.line;
        n->expr = expr();
        expect(Tok::T::CloseExpr, "'}}'");
        body.push_back(std::move(n));
      } else if (t.t == Tok::T::OpenStmt) {
        p_++;
        const std::string kw = peek().t == Tok::T::Name ? peek().s : "";
        for (const auto& e : ends)
          if (kw == e) {
            p_++;
            end = kw;
            return body;
          }
        body.push_back(statement());
      } else {
        fail("unexpected token");
      }
    }
  }

  std::unique_ptr<Node> statement() {
    auto n = std::make_unique<Node>();
    n->line = peek().line;
    const std::string kw = expect_name();
    std::string end;
    if (kw == "if") {
      ExprPtr c = expr();
      expect(Tok::T::CloseStmt, "'%}'");
      for (;;) {
        Body b = block({"elif", "else", "endif"}, end);
        n->branches.emplace_back(std::move(c), std::move(b));
        if (end == "elif") {
          c = expr();
          expect(Tok::T::CloseStmt, "'%}'");
          continue;
        }
        if (end == "else") {
          expect(Tok::T::CloseStmt, "'%}'");
          n->else_body = block({"endif"}, end);
        }
        break;
      }
      n->k = Node::K::If;
    } else if (kw == "for") {
      n->k = Node::K::For;
      n->targets.push_back(expect_name());
      while (is_op(",")) {
        p_++;
        n->targets.push_back(expect_name());
      }
      if (!is_name("in")) fail("expected 'in'");
      p_++;
      n->expr = ternary_free();
      if (is_name("if")) {
        p_++;
        n->cond = expr();
      }
      expect(Tok::T::CloseStmt, "'%}'");
      n->body = block({"else", "endfor"}, end);
      if (end == "else") {
        expect(Tok::T::CloseStmt, "'%}'");
        n->else_body = block({"endfor"}, end);
      }
    } else if (kw == "set") {
      n->targets.push_back(expect_name());
      if (is_op(".")) {
        p_++;
        n->targets.push_back(expect_name());
        n->attr = true;
      }
      while (!n->attr && is_op(",")) {
        p_++;
        n->targets.push_back(expect_name());
      }
      if (is_op("=")) {
        p_++;
        n->k = Node::K::Set;
        n->expr = expr();
      } else {
        if (n->attr || n->targets.size() != 1) fail("a set block names one variable");
        expect(Tok::T::CloseStmt, "'%}'");
        n->k = Node::K::SetBlock;
        n->body = block({"endset"}, end);
      }
    } else if (kw == "macro") {
      n->k = Node::K::Macro;
      n->targets.push_back(expect_name());
      expect_op("(");
      while (!is_op(")")) {
        n->params.push_back(expect_name());
        ExprPtr d;
        if (is_op("=")) {
          p_++;
          d = expr();
        }
        n->defaults.push_back(std::move(d));
        if (!is_op(",")) break;
        p_++;
      }
      expect_op(")");
      expect(Tok::T::CloseStmt, "'%}'");
      n->body = block({"endmacro"}, end);
    } else if (kw == "break" || kw == "continue") {
      n->k = kw == "break" ? Node::K::Break : Node::K::Continue;
    } else {
      fail("unknown statement '" + kw + "'");
    }
    expect(Tok::T::CloseStmt, "'%}'");
    return n;
  }

  ExprPtr make(Expr::K k, std::string name = "") {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->name = std::move(name);
    e->line = peek().line;
    return e;
  }

  // expr := or ['if' or ['else' expr]]
  ExprPtr expr() {
    ExprPtr a = or_expr();
    if (is_name("if")) {
      p_++;
      auto c = make(Expr::K::Cond);
      ExprPtr cond = or_expr();
      c->sub.push_back(std::move(a));
      c->sub.push_back(std::move(cond));
      if (is_name("else")) {
        p_++;
        c->sub.push_back(expr());
      }
      return c;
    }
    return a;
  }
  // The iterable of a for loop: no ternary (its "if" is the loop's filter).
  ExprPtr ternary_free() { return or_expr(); }
  ExprPtr binary(ExprPtr a, const std::string& op, ExprPtr b) {
    auto e = make(Expr::K::Binary, op);
    e->sub.push_back(std::move(a));
    e->sub.push_back(std::move(b));
    return e;
  }
  ExprPtr or_expr() {
    ExprPtr a = and_expr();
    while (is_name("or")) {
      p_++;
      a = binary(std::move(a), "or", and_expr());
    }
    return a;
  }
  ExprPtr and_expr() {
    ExprPtr a = not_expr();
    while (is_name("and")) {
      p_++;
      a = binary(std::move(a), "and", not_expr());
    }
    return a;
  }
  ExprPtr not_expr() {
    if (is_name("not")) {
      p_++;
      auto e = make(Expr::K::Unary, "not");
      e->sub.push_back(not_expr());
      return e;
    }
    return compare();
  }
  ExprPtr compare() {
    ExprPtr a = concat();
    for (;;) {
      static const char* ops[] = {"==", "!=", "<", ">", "<=", ">="};
      bool done = true;
      for (const char* op : ops)
        if (is_op(op)) {
          p_++;
          a = binary(std::move(a), op, concat());
          done = false;
          break;
        }
      if (!done) continue;
      if (is_name("in")) {
        p_++;
        a = binary(std::move(a), "in", concat());
      } else if (is_name("not") && is_name("in", 1)) {
        p_ += 2;
        a = binary(std::move(a), "not in", concat());
      } else if (is_name("is")) {
        p_++;
        auto t = make(Expr::K::Test);
        if (is_name("not")) {
          p_++;
          t->negate = true;
        }
        // Test names may be keywords (none, true, false) or operators' names.
        if (peek().t != Tok::T::Name) fail("expected a test name");
        t->name = t_[p_++].s;
        t->sub.push_back(std::move(a));
        if (is_op("(")) {
          p_++;
          args(*t);
        } else if (peek().t == Tok::T::Str || peek().t == Tok::T::Int || peek().t == Tok::T::Float ||
                   (peek().t == Tok::T::Name && !is_name("and") && !is_name("or") && !is_name("else") &&
                    !is_name("if") && !is_name("not") && !is_name("in"))) {
          t->sub.push_back(concat());  // "is equalto 3", "is sameas x"
        }
        a = std::move(t);
      } else {
        return a;
      }
    }
  }
  ExprPtr concat() {
    ExprPtr a = additive();
    while (is_op("~")) {
      p_++;
      a = binary(std::move(a), "~", additive());
    }
    return a;
  }
  ExprPtr additive() {
    ExprPtr a = multiplicative();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[p_++].s;
      a = binary(std::move(a), op, multiplicative());
    }
    return a;
  }
  ExprPtr multiplicative() {
    ExprPtr a = unary();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[p_++].s;
      a = binary(std::move(a), op, unary());
    }
    return a;
  }
  ExprPtr unary() {
    if (is_op("-") || is_op("+")) {
      auto e = make(Expr::K::Unary, t_[p_++].s);
      e->sub.push_back(unary());
      return e;
    }
    ExprPtr a = filtered();
    if (is_op("**")) {
      p_++;
      a = binary(std::move(a), "**", unary());
    }
    return a;
  }
  ExprPtr filtered() {
    ExprPtr a = postfix();
    while (is_op("|")) {
      p_++;
      auto f = make(Expr::K::Filter, expect_name());
      f->sub.push_back(std::move(a));
      if (is_op("(")) {
        p_++;
        args(*f);
      }
      a = std::move(f);
    }
    return a;
  }
  // Arguments after '(' up to and including ')': positional into e.sub, keyword into e.kw.
  void args(Expr& e) {
    while (!is_op(")")) {
      if (peek().t == Tok::T::Name && is_op("=", 1)) {
        std::string k = t_[p_].s;
        p_ += 2;
        e.kw.emplace_back(std::move(k), expr());
      } else {
        e.sub.push_back(expr());
      }
      if (!is_op(",")) break;
      p_++;
    }
    expect_op(")");
  }
  ExprPtr postfix() {
    ExprPtr a = primary();
    for (;;) {
      if (is_op(".")) {
        p_++;
        auto e = make(Expr::K::Attr, expect_name());
        e->sub.push_back(std::move(a));
        a = std::move(e);
      } else if (is_op("[")) {
        p_++;
        // A subscript or a slice [start:stop:step].
        ExprPtr parts[3];
        int n = 0;
        bool slice = false;
        for (;;) {
          if (!is_op(":") && !is_op("]")) parts[n] = expr();
          if (is_op(":")) {
            p_++;
            slice = true;
            if (++n > 2) fail("a slice has at most three parts");
            continue;
          }
          break;
        }
        expect_op("]");
        auto e = make(slice ? Expr::K::Slice : Expr::K::Index);
        e->sub.push_back(std::move(a));
        if (!slice && !parts[0]) fail("empty subscript");
        for (int i = 0; i < (slice ? 3 : 1); i++) e->sub.push_back(std::move(parts[i]));
        a = std::move(e);
      } else if (is_op("(")) {
        p_++;
        auto e = make(Expr::K::Call);
        e->sub.push_back(std::move(a));
        args(*e);
        a = std::move(e);
      } else {
        return a;
      }
    }
  }
  ExprPtr primary() {
    const Tok& t = peek();
    auto lit = [&](Value v) {
      auto e = make(Expr::K::Lit);
      e->lit = std::move(v);
      p_++;
      return e;
    };
    switch (t.t) {
      case Tok::T::Str: {
        std::string s = t.s;
        p_++;
        while (peek().t == Tok::T::Str) s += t_[p_++].s;  // adjacent literals concatenate
        auto e = make(Expr::K::Lit);
        e->lit = Value(std::move(s));
        return e;
      }
      case Tok::T::Int: return lit(Value(t.i));
      case Tok::T::Float: return lit(Value(t.f));
      case Tok::T::Name:
        if (t.s == "true" || t.s == "True") return lit(Value(true));
        if (t.s == "false" || t.s == "False") return lit(Value(false));
        if (t.s == "none" || t.s == "None") return lit(Value::none());
        {
          auto e = make(Expr::K::Name, t.s);
          p_++;
          return e;
        }
      case Tok::T::Op:
        if (t.s == "(") {
          p_++;
          ExprPtr e = expr();
          if (is_op(",")) {  // a tuple: a list here
            auto l = make(Expr::K::ListLit);
            l->sub.push_back(std::move(e));
            while (is_op(",")) {
              p_++;
              if (is_op(")")) break;
              l->sub.push_back(expr());
            }
            e = std::move(l);
          }
          expect_op(")");
          return e;
        }
        if (t.s == "[") {
          p_++;
          auto e = make(Expr::K::ListLit);
          while (!is_op("]")) {
            e->sub.push_back(expr());
            if (!is_op(",")) break;
            p_++;
          }
          expect_op("]");
          return e;
        }
        if (t.s == "{") {
          p_++;
          auto e = make(Expr::K::DictLit);
          while (!is_op("}")) {
            e->sub.push_back(expr());
            expect_op(":");
            e->sub.push_back(expr());
            if (!is_op(",")) break;
            p_++;
          }
          expect_op("}");
          return e;
        }
        break;
      default: break;
    }
    fail("expected an expression");
  }
};

}  // namespace

Body parse_template(std::string_view source) { return Parser(lex(preprocess(source))).parse(); }

}  // namespace kiln::serve::jinja
