// The syntax tree of serve/jinja.h's templates (shared by the parser and the evaluator).
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "serve/jinja.h"

namespace kiln::serve::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class K { Lit, Name, Attr, Index, Slice, Call, Filter, Test, Unary, Binary, Cond, ListLit, DictLit };
  K k = K::Lit;
  Value lit;                 // Lit
  std::string name;          // Name, Attr (the attribute), Filter / Test (its name), Unary / Binary (the operator)
  std::vector<ExprPtr> sub;  // operands: Attr {obj}, Index {obj, key}, Slice {obj, start?, stop?, step?} (null:
                             // absent), Call {callee, args...}, Filter / Test {value, args...}, Cond {then, cond,
                             // else?}, ListLit items, DictLit {k0, v0, k1, v1, ...}
  std::vector<std::pair<std::string, ExprPtr>> kw;  // keyword arguments of Call / Filter / Test
  bool negate = false;       // Test: "is not"
  int line = 0;
};

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class K { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue };
  K k = K::Text;
  std::string text;                             // Text
  ExprPtr expr;                                 // Output, Set (the value), For (the iterable)
  std::vector<std::pair<ExprPtr, Body>> branches;  // If: (condition, body) for if and each elif
  Body body, else_body;                         // For, SetBlock, Macro; If / For else
  std::vector<std::string> targets;             // For / Set names; Set on an attribute: {object, attribute}
  bool attr = false;                            // Set: targets are object.attribute
  ExprPtr cond;                                 // For: "if" filter
  std::vector<std::string> params;              // Macro
  std::vector<ExprPtr> defaults;                // Macro: a default per parameter (null: none)
  int line = 0;
};

// Parses source (after Hugging Face's preprocessing) into a body. Throws Error.
Body parse_template(std::string_view source);

}  // namespace kiln::serve::jinja
