#include "common/chat_template.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

// ---- values ----

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // in insertion order

struct Value {
  enum Type { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace };
  Type type = kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;  // kDict and kNamespace (namespaces are mutable)

  static Value None() { return Make(kNone); }
  static Value Bool(bool v) {
    Value x = Make(kBool);
    x.b = v;
    return x;
  }
  static Value Int(int64_t v) {
    Value x = Make(kInt);
    x.i = v;
    return x;
  }
  static Value Float(double v) {
    Value x = Make(kFloat);
    x.f = v;
    return x;
  }
  static Value Str(std::string v) {
    Value x = Make(kString);
    x.s = std::move(v);
    return x;
  }
  static Value Lst(List v) {
    Value x = Make(kList);
    x.list = std::make_shared<List>(std::move(v));
    return x;
  }
  static Value Dct(Dict v, Type type = kDict) {
    Value x = Make(type);
    x.dict = std::make_shared<Dict>(std::move(v));
    return x;
  }
  static Value Make(Type t) {
    Value x;
    x.type = t;
    return x;
  }
  bool IsNumber() const { return type == kInt || type == kFloat || type == kBool; }
  double Num() const { return type == kFloat ? f : type == kBool ? b : static_cast<double>(i); }
  const Value* Find(std::string_view key) const {
    if (dict == nullptr) return nullptr;
    for (const auto& [k, v] : *dict) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

bool Truthy(const Value& v) {
  switch (v.type) {
    case Value::kUndefined:
    case Value::kNone:
      return false;
    case Value::kBool:
      return v.b;
    case Value::kInt:
      return v.i != 0;
    case Value::kFloat:
      return v.f != 0;
    case Value::kString:
      return !v.s.empty();
    case Value::kList:
      return !v.list->empty();
    case Value::kDict:
      return !v.dict->empty();
    case Value::kNamespace:
      return true;
  }
  return false;
}

std::string Repr(const Value& v);

// What {{ v }} prints (Python's str()).
std::string Str(const Value& v) {
  switch (v.type) {
    case Value::kUndefined:
      return "";
    case Value::kNone:
      return "None";
    case Value::kBool:
      return v.b ? "True" : "False";
    case Value::kInt:
      return std::to_string(v.i);
    case Value::kFloat: {
      if (std::isfinite(v.f) && v.f == std::floor(v.f) && std::fabs(v.f) < 1e16) {
        return absl::StrCat(static_cast<int64_t>(v.f), ".0");
      }
      return absl::StrCat(v.f);
    }
    case Value::kString:
      return v.s;
    default:
      return Repr(v);
  }
}

std::string Repr(const Value& v) {
  switch (v.type) {
    case Value::kString: {
      std::string out = "'";
      for (const char c : v.s) {
        if (c == '\'' || c == '\\') out.push_back('\\');
        if (c == '\n') {
          out += "\\n";
          continue;
        }
        out.push_back(c);
      }
      return out + "'";
    }
    case Value::kList: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + Repr((*v.list)[k]);
      return out + "]";
    }
    case Value::kDict:
    case Value::kNamespace: {
      std::string out = v.type == Value::kNamespace ? "<Namespace {" : "{";
      for (size_t k = 0; k < v.dict->size(); ++k) {
        out += (k ? ", " : "") + Repr(Value::Str((*v.dict)[k].first)) + ": " +
               Repr((*v.dict)[k].second);
      }
      return out + (v.type == Value::kNamespace ? "}>" : "}");
    }
    default:
      return Str(v);
  }
}

nlohmann::json ToJson(const Value& v) {
  switch (v.type) {
    case Value::kBool:
      return v.b;
    case Value::kInt:
      return v.i;
    case Value::kFloat:
      return v.f;
    case Value::kString:
      return v.s;
    case Value::kList: {
      nlohmann::json a = nlohmann::json::array();
      for (const Value& e : *v.list) a.push_back(ToJson(e));
      return a;
    }
    case Value::kDict:
    case Value::kNamespace: {
      nlohmann::json o = nlohmann::json::object();
      for (const auto& [k, e] : *v.dict) o[k] = ToJson(e);
      return o;
    }
    default:
      return nullptr;
  }
}

bool Equal(const Value& a, const Value& b) {
  if (a.IsNumber() && b.IsNumber()) return a.Num() == b.Num();
  if (a.type != b.type) return false;
  switch (a.type) {
    case Value::kString:
      return a.s == b.s;
    case Value::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    case Value::kDict:
    case Value::kNamespace:
      return a.dict == b.dict;
    default:
      return true;  // undefined == undefined, none == none
  }
}

// ---- lexing the template into text and tags ----

struct Segment {
  enum Kind { kText, kOutput, kStatement } kind;
  std::string text;
  size_t pos;  // offset in the source, for errors
};

bool IsSpaceChar(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

absl::StatusOr<std::vector<Segment>> Lex(std::string_view src) {
  std::vector<Segment> out;
  size_t pos = 0;
  bool strip_next = false;    // a "-" closed the previous tag
  bool trim_newline = false;  // trim_blocks after a block tag or comment
  while (pos <= src.size()) {
    size_t open = src.find('{', pos);
    while (open != std::string_view::npos && open + 1 < src.size() && src[open + 1] != '{' &&
           src[open + 1] != '%' && src[open + 1] != '#') {
      open = src.find('{', open + 1);
    }
    if (open + 1 >= src.size()) open = std::string_view::npos;
    std::string text(
        src.substr(pos, open == std::string_view::npos ? std::string_view::npos : open - pos));
    // Whether `text` starts a line (for lstrip_blocks): the template's start, or right after a
    // newline (one trim_blocks removed counts).
    bool line_start = pos == 0 || src[pos - 1] == '\n';
    if (trim_newline && !text.empty() && text[0] == '\n') {
      text.erase(0, 1);
      line_start = true;
    }
    if (strip_next) {
      size_t k = 0;
      while (k < text.size() && IsSpaceChar(text[k])) ++k;
      text.erase(0, k);
    }
    if (open == std::string_view::npos) {
      if (!text.empty()) out.push_back({Segment::kText, std::move(text), pos});
      break;
    }
    const char kind = src[open + 1];
    const bool minus = open + 2 < src.size() && src[open + 2] == '-';
    const bool plus = open + 2 < src.size() && src[open + 2] == '+';
    if (minus) {
      while (!text.empty() && IsSpaceChar(text.back())) text.pop_back();
    } else if (kind != '{' && !plus) {
      // lstrip_blocks: spaces and tabs from the line's start up to a block tag or comment.
      size_t k = text.size();
      while (k > 0 && (text[k - 1] == ' ' || text[k - 1] == '\t')) --k;
      if (k > 0 ? text[k - 1] == '\n' : line_start) text.erase(k);
    }
    if (!text.empty()) out.push_back({Segment::kText, std::move(text), pos});
    const std::string_view close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t body_begin = open + 2 + (minus || plus ? 1 : 0);
    const size_t end = src.find(close, body_begin);
    if (end == std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template: unclosed tag at offset ", open));
    }
    size_t body_end = end;
    strip_next = body_end > body_begin && src[body_end - 1] == '-';
    if (strip_next) --body_end;
    trim_newline = kind != '{' && !strip_next;
    if (kind != '#') {
      out.push_back({kind == '{' ? Segment::kOutput : Segment::kStatement,
                     std::string(src.substr(body_begin, body_end - body_begin)), open});
    }
    pos = end + 2;
  }
  return out;
}

// ---- expression tokens ----

struct Token {
  enum Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind;
  std::string text;
  int64_t i = 0;
  double f = 0;
};

absl::StatusOr<std::vector<Token>> Tokenize(std::string_view s, size_t where) {
  std::vector<Token> out;
  const auto error = [&](std::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template: ", std::string(what), " in the tag at offset ", where));
  };
  for (size_t p = 0; p < s.size();) {
    const char c = s[p];
    if (IsSpaceChar(c)) {
      ++p;
    } else if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t q = p;
      while (q < s.size() && (std::isalnum(static_cast<unsigned char>(s[q])) || s[q] == '_')) ++q;
      out.push_back({Token::kName, std::string(s.substr(p, q - p))});
      p = q;
    } else if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t q = p;
      while (q < s.size() && std::isdigit(static_cast<unsigned char>(s[q]))) ++q;
      if (q + 1 < s.size() && s[q] == '.' && std::isdigit(static_cast<unsigned char>(s[q + 1]))) {
        ++q;
        while (q < s.size() && std::isdigit(static_cast<unsigned char>(s[q]))) ++q;
        Token t{Token::kFloat, std::string(s.substr(p, q - p))};
        t.f = std::stod(t.text);
        out.push_back(t);
      } else {
        Token t{Token::kInt, std::string(s.substr(p, q - p))};
        if (q - p > 18) return error("integer too large");
        t.i = std::stoll(t.text);
        out.push_back(t);
      }
      p = q;
    } else if (c == '\'' || c == '"') {
      std::string text;
      size_t q = p + 1;
      for (; q < s.size() && s[q] != c; ++q) {
        if (s[q] == '\\' && q + 1 < s.size()) {
          const char e = s[++q];
          text.push_back(e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e);
        } else {
          text.push_back(s[q]);
        }
      }
      if (q >= s.size()) return error("unterminated string");
      out.push_back({Token::kString, std::move(text)});
      p = q + 1;
    } else {
      static constexpr std::string_view kOps[] = {"//", "==", "!=", "<=", ">=", "**"};
      std::string op(1, c);
      for (std::string_view o : kOps) {
        if (s.substr(p, 2) == o) op = std::string(o);
      }
      if (std::string_view("()[]{},.:|~+-*/%<>=!").find(c) == std::string_view::npos) {
        return error(absl::StrCat("unexpected character '", std::string(1, c), "'"));
      }
      out.push_back({Token::kOp, op});
      p += op.size();
    }
  }
  out.push_back({Token::kEnd, ""});
  return out;
}

}  // namespace

// ---- the syntax tree ----

struct Expr {
  enum Kind {
    kLiteral,
    kName,
    kAttr,
    kIndex,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kBinary,
    kUnary,
    kCond,
    kList,
    kDict
  } kind = kLiteral;
  Value literal;
  std::string name;      // kName, kAttr, kFilter, kTest; kBinary / kUnary: the operator
  bool negated = false;  // kTest
  std::vector<std::unique_ptr<Expr>> args;  // operands, call / filter / test arguments
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
};

struct ChatTemplate::Node {
  enum Kind { kText, kOutput, kIf, kFor, kSet, kBreak, kContinue } kind = kText;
  std::string text;                          // kText
  std::unique_ptr<Expr> expr;                // kOutput, kFor (iterable), kSet (value)
  std::vector<std::string> names;            // kFor: loop variables; kSet: target (a or ns, attr)
  std::vector<std::unique_ptr<Expr>> conds;  // kIf: one per branch; kFor: optional filter
  std::vector<std::vector<std::unique_ptr<Node>>> bodies;  // kIf: branches (+ else); kFor: body,
                                                           // else
};

namespace {

using Node = ChatTemplate::Node;
using ExprPtr = std::unique_ptr<Expr>;

ExprPtr NewExpr(Expr::Kind kind) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  return e;
}
std::unique_ptr<Node> NewNode(Node::Kind kind) {
  auto n = std::make_unique<Node>();
  n->kind = kind;
  return n;
}

class ExprParser {
 public:
  ExprParser(std::vector<Token> tokens, size_t where) : t_(std::move(tokens)), where_(where) {}

  absl::StatusOr<ExprPtr> Parse() { return Conditional(); }
  bool AtEnd() const { return t_[p_].kind == Token::kEnd; }
  bool PeekName(std::string_view n) const {
    return t_[p_].kind == Token::kName && t_[p_].text == n;
  }
  bool PeekOp(std::string_view o) const { return t_[p_].kind == Token::kOp && t_[p_].text == o; }
  const Token& Next() { return t_[p_ < t_.size() - 1 ? p_++ : p_]; }
  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", std::string(what), " near \"",
                                                   t_[p_].text, "\" in the tag at offset ",
                                                   where_));
  }
  absl::Status Expect(std::string_view op) {
    if (!PeekOp(op)) return Error(absl::StrCat("expected '", std::string(op), "'"));
    Next();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> Name() {
    if (t_[p_].kind != Token::kName) return Error("expected a name");
    return Next().text;
  }

  absl::StatusOr<ExprPtr> Conditional() {
    MOE_ASSIGN_OR_RETURN(ExprPtr e, Or());
    if (!PeekName("if")) return e;
    Next();
    auto c = NewExpr(Expr::kCond);
    MOE_ASSIGN_OR_RETURN(ExprPtr cond, Or());
    ExprPtr otherwise;
    if (PeekName("else")) {
      Next();
      MOE_ASSIGN_OR_RETURN(otherwise, Conditional());
    } else {
      otherwise = NewExpr(Expr::kLiteral);
    }
    c->args.push_back(std::move(e));
    c->args.push_back(std::move(cond));
    c->args.push_back(std::move(otherwise));
    return c;
  }

 private:
  static ExprPtr Binary(std::string op, ExprPtr l, ExprPtr r) {
    auto e = NewExpr(Expr::kBinary);
    e->name = std::move(op);
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return e;
  }
  // A left-associative level: operands from `next`, joined by the operators `is_op` accepts
  // (consumed by it and returned, or "" when none follows).
  template <typename Next, typename IsOp>
  absl::StatusOr<ExprPtr> LeftAssoc(Next next, IsOp is_op) {
    MOE_ASSIGN_OR_RETURN(ExprPtr l, (this->*next)());
    for (std::string op = is_op(); !op.empty(); op = is_op()) {
      MOE_ASSIGN_OR_RETURN(ExprPtr r, (this->*next)());
      l = Binary(op, std::move(l), std::move(r));
    }
    return l;
  }
  std::string TakeName(std::string_view n) { return PeekName(n) ? Next().text : std::string(); }
  std::string TakeOp(std::initializer_list<std::string_view> ops) {
    for (std::string_view o : ops) {
      if (PeekOp(o)) return Next().text;
    }
    return std::string();
  }
  absl::StatusOr<ExprPtr> Or() {
    return LeftAssoc(&ExprParser::And, [&] { return TakeName("or"); });
  }
  absl::StatusOr<ExprPtr> And() {
    return LeftAssoc(&ExprParser::Not, [&] { return TakeName("and"); });
  }
  absl::StatusOr<ExprPtr> Not() {
    if (!PeekName("not")) return Compare();
    Next();
    MOE_ASSIGN_OR_RETURN(ExprPtr e, Not());
    auto u = NewExpr(Expr::kUnary);
    u->name = "not";
    u->args.push_back(std::move(e));
    return u;
  }
  absl::StatusOr<ExprPtr> Compare() {
    MOE_ASSIGN_OR_RETURN(ExprPtr l, Concat());
    while (true) {
      std::string op;
      if (PeekOp("==") || PeekOp("!=") || PeekOp("<") || PeekOp(">") || PeekOp("<=") ||
          PeekOp(">=")) {
        op = Next().text;
      } else if (PeekName("in")) {
        Next();
        op = "in";
      } else if (PeekName("not") && t_[p_ + 1].kind == Token::kName && t_[p_ + 1].text == "in") {
        Next();
        Next();
        op = "not in";
      } else if (PeekName("is")) {
        Next();
        auto test = NewExpr(Expr::kTest);
        if (PeekName("not")) {
          Next();
          test->negated = true;
        }
        MOE_ASSIGN_OR_RETURN(test->name, Name());
        test->args.push_back(std::move(l));
        if (t_[p_].kind == Token::kString || t_[p_].kind == Token::kInt) {
          MOE_ASSIGN_OR_RETURN(ExprPtr arg, Primary());
          test->args.push_back(std::move(arg));
        }
        l = std::move(test);
        continue;
      } else {
        return l;
      }
      MOE_ASSIGN_OR_RETURN(ExprPtr r, Concat());
      l = Binary(op, std::move(l), std::move(r));
    }
  }
  absl::StatusOr<ExprPtr> Concat() {
    return LeftAssoc(&ExprParser::Additive, [&] { return TakeOp({"~"}); });
  }
  absl::StatusOr<ExprPtr> Additive() {
    return LeftAssoc(&ExprParser::Multiplicative, [&] { return TakeOp({"+", "-"}); });
  }
  absl::StatusOr<ExprPtr> Multiplicative() {
    return LeftAssoc(&ExprParser::Unary, [&] { return TakeOp({"*", "/", "//", "%"}); });
  }
  absl::StatusOr<ExprPtr> Unary() {
    if (PeekOp("-") || PeekOp("+")) {
      const std::string op = Next().text;
      MOE_ASSIGN_OR_RETURN(ExprPtr e, Unary());
      auto u = NewExpr(Expr::kUnary);
      u->name = op;
      u->args.push_back(std::move(e));
      return u;
    }
    return Postfix();
  }
  // Comma-separated items up to `close` (consumed), each parsed by item().
  template <typename Fn>
  absl::Status Items(std::string_view close, const Fn& item) {
    while (!PeekOp(close)) {
      MOE_RETURN_IF_ERROR(item());
      if (!PeekOp(",")) break;
      Next();
    }
    return Expect(close);
  }
  absl::Status Arguments(Expr* call) {  // after "("
    return Items(")", [&]() -> absl::Status {
      std::string key;
      if (t_[p_].kind == Token::kName && t_[p_ + 1].kind == Token::kOp && t_[p_ + 1].text == "=") {
        key = Next().text;
        Next();
      }
      MOE_ASSIGN_OR_RETURN(ExprPtr v, Conditional());
      if (key.empty()) {
        call->args.push_back(std::move(v));
      } else {
        call->kwargs.emplace_back(std::move(key), std::move(v));
      }
      return absl::OkStatus();
    });
  }
  absl::StatusOr<ExprPtr> Postfix() {
    MOE_ASSIGN_OR_RETURN(ExprPtr e, Primary());
    while (true) {
      if (PeekOp(".")) {
        Next();
        auto a = NewExpr(Expr::kAttr);
        MOE_ASSIGN_OR_RETURN(a->name, Name());
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (PeekOp("[")) {
        Next();
        ExprPtr parts[3];
        int colons = 0;
        for (int k = 0; k < 3; ++k) {
          if (!PeekOp(":") && !PeekOp("]")) {
            MOE_ASSIGN_OR_RETURN(parts[k], Conditional());
          }
          if (!PeekOp(":")) break;
          Next();
          ++colons;
        }
        MOE_RETURN_IF_ERROR(Expect("]"));
        auto x = NewExpr(colons > 0 ? Expr::kSlice : Expr::kIndex);
        x->args.push_back(std::move(e));
        for (ExprPtr& part : parts) x->args.push_back(std::move(part));  // may be null
        if (colons == 0 && x->args[1] == nullptr) return Error("empty subscript");
        e = std::move(x);
      } else if (PeekOp("(")) {
        Next();
        auto c = NewExpr(Expr::kCall);
        c->args.push_back(std::move(e));
        MOE_RETURN_IF_ERROR(Arguments(c.get()));
        e = std::move(c);
      } else if (PeekOp("|")) {
        Next();
        auto f = NewExpr(Expr::kFilter);
        MOE_ASSIGN_OR_RETURN(f->name, Name());
        f->args.push_back(std::move(e));
        if (PeekOp("(")) {
          Next();
          MOE_RETURN_IF_ERROR(Arguments(f.get()));
        }
        e = std::move(f);
      } else {
        return e;
      }
    }
  }
  absl::StatusOr<ExprPtr> Primary() {
    const Token& t = t_[p_];
    auto lit = NewExpr(Expr::kLiteral);
    switch (t.kind) {
      case Token::kString:
        lit->literal = Value::Str(Next().text);
        // adjacent string literals concatenate
        while (t_[p_].kind == Token::kString) lit->literal.s += Next().text;
        return lit;
      case Token::kInt:
        lit->literal = Value::Int(Next().i);
        return lit;
      case Token::kFloat:
        lit->literal = Value::Float(Next().f);
        return lit;
      case Token::kName: {
        const std::string n = Next().text;
        if (n == "true" || n == "True")
          lit->literal = Value::Bool(true);
        else if (n == "false" || n == "False")
          lit->literal = Value::Bool(false);
        else if (n == "none" || n == "None")
          lit->literal = Value::None();
        else {
          auto v = NewExpr(Expr::kName);
          v->name = n;
          return v;
        }
        return lit;
      }
      case Token::kOp:
        if (t.text == "(") {
          Next();
          MOE_ASSIGN_OR_RETURN(ExprPtr e, Conditional());
          MOE_RETURN_IF_ERROR(Expect(")"));
          return e;
        }
        if (t.text == "[") {
          Next();
          auto l = NewExpr(Expr::kList);
          MOE_RETURN_IF_ERROR(Items("]", [&]() -> absl::Status {
            MOE_ASSIGN_OR_RETURN(ExprPtr v, Conditional());
            l->args.push_back(std::move(v));
            return absl::OkStatus();
          }));
          return l;
        }
        if (t.text == "{") {
          Next();
          auto d = NewExpr(Expr::kDict);
          MOE_RETURN_IF_ERROR(Items("}", [&]() -> absl::Status {
            MOE_ASSIGN_OR_RETURN(ExprPtr k, Conditional());
            MOE_RETURN_IF_ERROR(Expect(":"));
            MOE_ASSIGN_OR_RETURN(ExprPtr v, Conditional());
            d->args.push_back(std::move(k));
            d->args.push_back(std::move(v));
            return absl::OkStatus();
          }));
          return d;
        }
        break;
      default:
        break;
    }
    return Error("unexpected token");
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  size_t where_;
};

absl::StatusOr<ExprPtr> ParseExpr(std::string_view text, size_t where) {
  MOE_ASSIGN_OR_RETURN(std::vector<Token> tokens, Tokenize(text, where));
  ExprParser p(std::move(tokens), where);
  MOE_ASSIGN_OR_RETURN(ExprPtr e, p.Parse());
  if (!p.AtEnd()) return p.Error("unexpected text after the expression");
  return e;
}

// ---- statements ----

class TemplateParser {
 public:
  explicit TemplateParser(std::vector<Segment> segments) : s_(std::move(segments)) {}

  // Parses nodes until a statement whose first word is in `stops` (returned in *stop).
  absl::Status Body(std::vector<std::unique_ptr<Node>>* out,
                    std::initializer_list<std::string_view> stops, std::string* stop,
                    std::string* rest) {
    while (i_ < s_.size()) {
      const Segment& seg = s_[i_++];
      if (seg.kind == Segment::kText) {
        auto n = NewNode(Node::kText);
        n->text = seg.text;
        out->push_back(std::move(n));
        continue;
      }
      if (seg.kind == Segment::kOutput) {
        auto n = NewNode(Node::kOutput);
        MOE_ASSIGN_OR_RETURN(n->expr, ParseExpr(seg.text, seg.pos));
        out->push_back(std::move(n));
        continue;
      }
      std::string_view body = seg.text;
      while (!body.empty() && IsSpaceChar(body.front())) body.remove_prefix(1);
      size_t w = 0;
      while (w < body.size() && !IsSpaceChar(body[w])) ++w;
      const std::string word(body.substr(0, w));
      const std::string_view tail = body.substr(w);
      if (std::find(stops.begin(), stops.end(), word) != stops.end()) {
        *stop = word;
        *rest = std::string(tail);
        return absl::OkStatus();
      }
      MOE_RETURN_IF_ERROR(Statement(word, tail, seg.pos, out));
    }
    if (stops.size() > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template: missing {% ", std::string(*stops.begin()), " %}"));
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Statement(const std::string& word, std::string_view tail, size_t pos,
                         std::vector<std::unique_ptr<Node>>* out) {
    if (word == "if") {
      auto n = NewNode(Node::kIf);
      std::string cond(tail), stop, rest;
      while (true) {
        MOE_ASSIGN_OR_RETURN(ExprPtr c, ParseExpr(cond, pos));
        n->conds.push_back(std::move(c));
        n->bodies.emplace_back();
        MOE_RETURN_IF_ERROR(Body(&n->bodies.back(), {"endif", "elif", "else"}, &stop, &rest));
        if (stop == "elif") {
          cond = rest;
          continue;
        }
        if (stop == "else") {
          n->bodies.emplace_back();
          MOE_RETURN_IF_ERROR(Body(&n->bodies.back(), {"endif"}, &stop, &rest));
        }
        break;
      }
      out->push_back(std::move(n));
    } else if (word == "for") {
      auto n = NewNode(Node::kFor);
      MOE_ASSIGN_OR_RETURN(std::vector<Token> tokens, Tokenize(tail, pos));
      ExprParser p(std::move(tokens), pos);
      do {
        MOE_ASSIGN_OR_RETURN(std::string name, p.Name());
        n->names.push_back(std::move(name));
      } while (p.PeekOp(",") && (p.Next(), true));
      if (!p.PeekName("in")) return p.Error("expected 'in'");
      p.Next();
      // The iterable stops before a trailing "if" filter.
      MOE_ASSIGN_OR_RETURN(n->expr, ParseIterable(&p));
      if (p.PeekName("if")) {
        p.Next();
        MOE_ASSIGN_OR_RETURN(ExprPtr filter, p.Parse());
        n->conds.push_back(std::move(filter));
      }
      if (p.PeekName("recursive")) return p.Error("recursive loops are not supported");
      if (!p.AtEnd()) return p.Error("unexpected text in for");
      std::string stop, rest;
      n->bodies.emplace_back();
      MOE_RETURN_IF_ERROR(Body(&n->bodies.back(), {"endfor", "else"}, &stop, &rest));
      if (stop == "else") {
        n->bodies.emplace_back();
        MOE_RETURN_IF_ERROR(Body(&n->bodies.back(), {"endfor"}, &stop, &rest));
      }
      out->push_back(std::move(n));
    } else if (word == "set") {
      auto n = NewNode(Node::kSet);
      const size_t eq = tail.find('=');
      if (eq == std::string_view::npos || (eq + 1 < tail.size() && tail[eq + 1] == '=')) {
        return absl::InvalidArgumentError(absl::StrCat(
            "chat template: {% set %} without '=' (block sets are not supported) at offset ", pos));
      }
      MOE_ASSIGN_OR_RETURN(std::vector<Token> target, Tokenize(tail.substr(0, eq), pos));
      if (target.size() == 2 && target[0].kind == Token::kName) {
        n->names = {target[0].text};
      } else if (target.size() == 4 && target[0].kind == Token::kName && target[1].text == "." &&
                 target[2].kind == Token::kName) {
        n->names = {target[0].text, target[2].text};
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("chat template: unsupported {% set %} target at offset ", pos));
      }
      MOE_ASSIGN_OR_RETURN(n->expr, ParseExpr(tail.substr(eq + 1), pos));
      out->push_back(std::move(n));
    } else if (word == "break" || word == "continue") {
      out->push_back(NewNode(word == "break" ? Node::kBreak : Node::kContinue));
    } else if (word == "generation" || word == "endgeneration") {
      // transformers' {% generation %} marks assistant text for masks; it renders as is.
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template: unsupported statement {% ", word, " %} at offset ", pos));
    }
    return absl::OkStatus();
  }

  // `xs` or `xs | filter` up to a loop filter's "if".
  static absl::StatusOr<ExprPtr> ParseIterable(ExprParser* p) {
    return p->Parse();  // "x if c" would be a conditional without else; see below
  }

  std::vector<Segment> s_;
  size_t i_ = 0;
};

// ---- evaluation ----

constexpr int64_t kMaxIterations = int64_t{1} << 22;

class Renderer {
 public:
  explicit Renderer(std::string* out) : out_(out) {}

  struct Scope {
    std::map<std::string, Value, std::less<>> vars;
  };
  std::vector<Scope> scopes;

  absl::Status Run(const std::vector<std::unique_ptr<Node>>& nodes) {
    for (const auto& n : nodes) {
      MOE_RETURN_IF_ERROR(Exec(*n));
      if (break_ || continue_) return absl::OkStatus();
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Emit(std::string_view text) {
    if (out_->size() + text.size() > ChatTemplate::kMaxOutputBytes) {
      return absl::InvalidArgumentError("chat template: the rendered text exceeds 16 MiB");
    }
    out_->append(text);
    return absl::OkStatus();
  }

  Value Lookup(std::string_view name) const {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
      const auto f = it->vars.find(name);
      if (f != it->vars.end()) return f->second;
    }
    return Value();
  }

  absl::Status Exec(const Node& n) {
    switch (n.kind) {
      case Node::kText:
        return Emit(n.text);
      case Node::kOutput: {
        MOE_ASSIGN_OR_RETURN(const Value v, Eval(*n.expr));
        return Emit(Str(v));
      }
      case Node::kIf:
        for (size_t k = 0; k < n.bodies.size(); ++k) {
          bool take = k >= n.conds.size();
          if (!take) {
            MOE_ASSIGN_OR_RETURN(const Value c, Eval(*n.conds[k]));
            take = Truthy(c);
          }
          if (take) return Run(n.bodies[k]);
        }
        return absl::OkStatus();
      case Node::kSet: {
        MOE_ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (n.names.size() == 1) {
          scopes.back().vars[n.names[0]] = std::move(v);
          return absl::OkStatus();
        }
        const Value ns = Lookup(n.names[0]);
        if (ns.type != Value::kNamespace) {
          return absl::InvalidArgumentError(absl::StrCat(
              "chat template: cannot assign an attribute of ", n.names[0], " (not a namespace)"));
        }
        for (auto& [k, e] : *ns.dict) {
          if (k == n.names[1]) {
            e = std::move(v);
            return absl::OkStatus();
          }
        }
        ns.dict->emplace_back(n.names[1], std::move(v));
        return absl::OkStatus();
      }
      case Node::kBreak:
        break_ = true;
        return absl::OkStatus();
      case Node::kContinue:
        continue_ = true;
        return absl::OkStatus();
      case Node::kFor:
        return ExecFor(n);
    }
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& n) {
    MOE_ASSIGN_OR_RETURN(const Value seq, Eval(*n.expr));
    List items;
    if (seq.type == Value::kList) {
      items = *seq.list;
    } else if (seq.type == Value::kDict) {
      for (const auto& [k, v] : *seq.dict) items.push_back(Value::Str(k));
    } else if (seq.type == Value::kString) {
      for (const char c : seq.s) items.push_back(Value::Str(std::string(1, c)));
    } else if (seq.type != Value::kUndefined && seq.type != Value::kNone) {
      return absl::InvalidArgumentError("chat template: for over a value that is not iterable");
    }
    const auto bind = [&](Scope* scope, const Value& item) -> absl::Status {
      if (n.names.size() == 1) {
        scope->vars[n.names[0]] = item;
        return absl::OkStatus();
      }
      if (item.type != Value::kList || item.list->size() != n.names.size()) {
        return absl::InvalidArgumentError("chat template: cannot unpack a loop item");
      }
      for (size_t k = 0; k < n.names.size(); ++k) scope->vars[n.names[k]] = (*item.list)[k];
      return absl::OkStatus();
    };
    if (!n.conds.empty()) {  // the loop filter runs first: loop.* count the kept items
      List kept;
      for (const Value& item : items) {
        scopes.emplace_back();
        MOE_RETURN_IF_ERROR(bind(&scopes.back(), item));
        auto c = Eval(*n.conds[0]);
        scopes.pop_back();
        MOE_RETURN_IF_ERROR(c.status());
        if (Truthy(*c)) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) return n.bodies.size() > 1 ? Run(n.bodies[1]) : absl::OkStatus();
    const auto length = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < length; ++k) {
      if (++iterations_ > kMaxIterations) {
        return absl::InvalidArgumentError("chat template: too many loop iterations");
      }
      scopes.emplace_back();
      MOE_RETURN_IF_ERROR(bind(&scopes.back(), items[k]));
      scopes.back().vars["loop"] = Value::Dct({
          {"index", Value::Int(k + 1)},
          {"index0", Value::Int(k)},
          {"revindex", Value::Int(length - k)},
          {"revindex0", Value::Int(length - k - 1)},
          {"first", Value::Bool(k == 0)},
          {"last", Value::Bool(k == length - 1)},
          {"length", Value::Int(length)},
          {"previtem", k > 0 ? items[k - 1] : Value()},
          {"nextitem", k + 1 < length ? items[k + 1] : Value()},
      });
      const absl::Status s = Run(n.bodies[0]);
      scopes.pop_back();
      MOE_RETURN_IF_ERROR(s);
      continue_ = false;
      if (break_) {
        break_ = false;
        break;
      }
    }
    return absl::OkStatus();
  }

  static absl::Status TypeError(std::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", std::string(what)));
  }

  absl::StatusOr<Value> Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::kLiteral:
        return e.literal;
      case Expr::kName:
        return Lookup(e.name);
      case Expr::kAttr: {
        MOE_ASSIGN_OR_RETURN(const Value obj, Eval(*e.args[0]));
        if (const Value* v = obj.Find(e.name)) return *v;
        return Value();
      }
      case Expr::kIndex: {
        MOE_ASSIGN_OR_RETURN(const Value obj, Eval(*e.args[0]));
        MOE_ASSIGN_OR_RETURN(const Value idx, Eval(*e.args[1]));
        return Index(obj, idx);
      }
      case Expr::kSlice:
        return EvalSlice(e);
      case Expr::kCall:
        return Call(e);
      case Expr::kFilter:
        return Filter(e);
      case Expr::kTest:
        return Test(e);
      case Expr::kUnary: {
        MOE_ASSIGN_OR_RETURN(const Value v, Eval(*e.args[0]));
        if (e.name == "not") return Value::Bool(!Truthy(v));
        if (!v.IsNumber()) return TypeError("unary minus of a non-number");
        if (e.name == "+") return v;
        return v.type == Value::kFloat ? Value::Float(-v.f)
                                       : Value::Int(-static_cast<int64_t>(v.Num()));
      }
      case Expr::kBinary:
        return Binary(e);
      case Expr::kCond: {
        MOE_ASSIGN_OR_RETURN(const Value c, Eval(*e.args[1]));
        return Eval(*e.args[Truthy(c) ? 0 : 2]);
      }
      case Expr::kList: {
        List l;
        for (const auto& a : e.args) {
          MOE_ASSIGN_OR_RETURN(Value v, Eval(*a));
          l.push_back(std::move(v));
        }
        return Value::Lst(std::move(l));
      }
      case Expr::kDict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          MOE_ASSIGN_OR_RETURN(const Value key, Eval(*e.args[k]));
          MOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[k + 1]));
          d.emplace_back(Str(key), std::move(v));
        }
        return Value::Dct(std::move(d));
      }
    }
    return Value();
  }

  static absl::StatusOr<Value> Index(const Value& obj, const Value& idx) {
    if (obj.type == Value::kList || obj.type == Value::kString) {
      if (idx.type != Value::kInt) return TypeError("a list index must be an integer");
      const int64_t n = obj.type == Value::kList ? static_cast<int64_t>(obj.list->size())
                                                 : static_cast<int64_t>(obj.s.size());
      const int64_t k = idx.i < 0 ? idx.i + n : idx.i;
      if (k < 0 || k >= n) return Value();  // undefined, as Jinja gives
      return obj.type == Value::kList ? (*obj.list)[k] : Value::Str(std::string(1, obj.s[k]));
    }
    if (obj.type == Value::kDict || obj.type == Value::kNamespace) {
      if (const Value* v = obj.Find(Str(idx))) return *v;
    }
    return Value();
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e) {
    MOE_ASSIGN_OR_RETURN(const Value obj, Eval(*e.args[0]));
    int64_t bounds[3] = {0, 0, 1};
    bool given[3] = {false, false, false};
    for (int k = 0; k < 3; ++k) {
      if (e.args[k + 1] == nullptr) continue;
      MOE_ASSIGN_OR_RETURN(const Value v, Eval(*e.args[k + 1]));
      if (v.type == Value::kNone) continue;
      if (v.type != Value::kInt) return TypeError("slice bounds must be integers");
      bounds[k] = v.i;
      given[k] = true;
    }
    const int64_t step = bounds[2];
    if (step == 0) return TypeError("slice step cannot be zero");
    const int64_t n = obj.type == Value::kList     ? static_cast<int64_t>(obj.list->size())
                      : obj.type == Value::kString ? static_cast<int64_t>(obj.s.size())
                                                   : -1;
    if (n < 0) return TypeError("slice of a value that is not a list or string");
    const auto clamp = [&](int64_t v, bool is_given, int64_t dflt) {
      if (!is_given) return dflt;
      if (v < 0) v += n;
      return step > 0 ? std::clamp<int64_t>(v, 0, n) : std::clamp<int64_t>(v, -1, n - 1);
    };
    const int64_t start = clamp(bounds[0], given[0], step > 0 ? 0 : n - 1);
    const int64_t stop = clamp(bounds[1], given[1], step > 0 ? n : -1);
    List l;
    std::string s;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (obj.type == Value::kList) {
        l.push_back((*obj.list)[k]);
      } else {
        s.push_back(obj.s[k]);
      }
    }
    return obj.type == Value::kList ? Value::Lst(std::move(l)) : Value::Str(std::move(s));
  }

  absl::StatusOr<Value> Binary(const Expr& e) {
    const std::string& op = e.name;
    MOE_ASSIGN_OR_RETURN(const Value l, Eval(*e.args[0]));
    if (op == "and") {
      if (!Truthy(l)) return l;
      return Eval(*e.args[1]);
    }
    if (op == "or") {
      if (Truthy(l)) return l;
      return Eval(*e.args[1]);
    }
    MOE_ASSIGN_OR_RETURN(const Value r, Eval(*e.args[1]));
    if (op == "~") return Value::Str(Str(l) + Str(r));
    if (op == "==") return Value::Bool(Equal(l, r));
    if (op == "!=") return Value::Bool(!Equal(l, r));
    if (op == "in" || op == "not in") {
      bool found = false;
      if (r.type == Value::kString) {
        found = l.type == Value::kString && r.s.find(l.s) != std::string::npos;
      } else if (r.type == Value::kList) {
        for (const Value& v : *r.list) found = found || Equal(l, v);
      } else if (r.type == Value::kDict || r.type == Value::kNamespace) {
        found = r.Find(Str(l)) != nullptr;
      } else {
        return TypeError("'in' needs a string, list or mapping on its right");
      }
      return Value::Bool(op == "in" ? found : !found);
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int cmp = 0;
      if (l.IsNumber() && r.IsNumber()) {
        cmp = l.Num() < r.Num() ? -1 : l.Num() > r.Num() ? 1 : 0;
      } else if (l.type == Value::kString && r.type == Value::kString) {
        cmp = l.s.compare(r.s);
      } else {
        return TypeError("cannot compare these values");
      }
      return Value::Bool(op == "<"    ? cmp < 0
                         : op == ">"  ? cmp > 0
                         : op == "<=" ? cmp <= 0
                                      : cmp >= 0);
    }
    if (op == "+") {
      if (l.type == Value::kString && r.type == Value::kString) return Value::Str(l.s + r.s);
      if (l.type == Value::kList && r.type == Value::kList) {
        List out = *l.list;
        out.insert(out.end(), r.list->begin(), r.list->end());
        return Value::Lst(std::move(out));
      }
    }
    if (!l.IsNumber() || !r.IsNumber()) {
      return TypeError(
          absl::StrCat("unsupported operand types for ", op, " (", Repr(l), ", ", Repr(r), ")"));
    }
    const bool ints = l.type != Value::kFloat && r.type != Value::kFloat;
    const double a = l.Num(), b = r.Num();
    if (op == "+") return ints ? Value::Int(static_cast<int64_t>(a + b)) : Value::Float(a + b);
    if (op == "-") return ints ? Value::Int(static_cast<int64_t>(a - b)) : Value::Float(a - b);
    if (op == "*") return ints ? Value::Int(static_cast<int64_t>(a * b)) : Value::Float(a * b);
    if (b == 0) return TypeError("division by zero");
    if (op == "/") return Value::Float(a / b);
    if (op == "//")
      return ints ? Value::Int(static_cast<int64_t>(std::floor(a / b)))
                  : Value::Float(std::floor(a / b));
    if (op == "%") {
      if (ints) {
        const int64_t x = static_cast<int64_t>(a), y = static_cast<int64_t>(b);
        return Value::Int(((x % y) + y) % y);
      }
      return Value::Float(a - b * std::floor(a / b));
    }
    return TypeError(absl::StrCat("unknown operator ", op));
  }

  absl::StatusOr<std::vector<Value>> Args(const Expr& e, size_t first) {
    std::vector<Value> out;
    for (size_t k = first; k < e.args.size(); ++k) {
      MOE_ASSIGN_OR_RETURN(Value v, Eval(*e.args[k]));
      out.push_back(std::move(v));
    }
    return out;
  }

  static std::string Strip(std::string_view s, std::string_view chars, bool left, bool right) {
    const auto in = [&](char c) {
      return chars.empty() ? IsSpaceChar(c) || c == '\v' || c == '\f'
                           : chars.find(c) != std::string_view::npos;
    };
    size_t b = 0, e = s.size();
    while (left && b < e && in(s[b])) ++b;
    while (right && e > b && in(s[e - 1])) --e;
    return std::string(s.substr(b, e - b));
  }
  static std::string Case(std::string s, int mode) {  // 0 lower, 1 upper, 2 capitalize, 3 title
    bool start = true;
    for (size_t k = 0; k < s.size(); ++k) {
      const auto c = static_cast<unsigned char>(s[k]);
      const bool upper = mode == 1 || ((mode == 2 && k == 0) || (mode == 3 && start));
      s[k] = static_cast<char>(upper ? std::toupper(c) : std::tolower(c));
      start = !std::isalnum(c);
    }
    return s;
  }
  static std::string ReplaceAll(std::string s, const std::string& from, const std::string& to) {
    if (!from.empty()) absl::StrReplaceAll({{from, to}}, &s);
    return s;
  }

  absl::StatusOr<Value> Call(const Expr& e) {
    const Expr& fn = *e.args[0];
    MOE_ASSIGN_OR_RETURN(std::vector<Value> args, Args(e, 1));
    if (fn.kind == Expr::kName) {
      if (fn.name == "raise_exception") {
        return absl::InvalidArgumentError(absl::StrCat(
            "chat template: ", args.empty() ? std::string("raise_exception") : Str(args[0])));
      }
      if (fn.name == "namespace") {
        Dict d;
        for (const auto& [k, v] : e.kwargs) {
          MOE_ASSIGN_OR_RETURN(Value x, Eval(*v));
          d.emplace_back(k, std::move(x));
        }
        return Value::Dct(std::move(d), Value::kNamespace);
      }
      if (fn.name == "range") {
        int64_t b = 0, end = 0, step = 1;
        for (const Value& a : args) {
          if (a.type != Value::kInt) return TypeError("range() takes integers");
        }
        if (args.size() == 1) end = args[0].i;
        if (args.size() >= 2) b = args[0].i, end = args[1].i;
        if (args.size() == 3) step = args[2].i;
        if (step == 0 || args.empty() || args.size() > 3) return TypeError("bad range()");
        List l;
        for (int64_t k = b; step > 0 ? k < end : k > end; k += step) {
          if (static_cast<int64_t>(l.size()) >= kMaxIterations) return TypeError("range too long");
          l.push_back(Value::Int(k));
        }
        return Value::Lst(std::move(l));
      }
      return TypeError(absl::StrCat("unknown function ", fn.name, "()"));
    }
    if (fn.kind != Expr::kAttr) return TypeError("call of a value that is not a function");
    MOE_ASSIGN_OR_RETURN(const Value obj, Eval(*fn.args[0]));
    const std::string& m = fn.name;
    const auto arg_str = [&](size_t k) { return k < args.size() ? Str(args[k]) : std::string(); };
    if (obj.type == Value::kString) {
      if (m == "strip") return Value::Str(Strip(obj.s, arg_str(0), true, true));
      if (m == "lstrip") return Value::Str(Strip(obj.s, arg_str(0), true, false));
      if (m == "rstrip") return Value::Str(Strip(obj.s, arg_str(0), false, true));
      if (m == "lower") return Value::Str(Case(obj.s, 0));
      if (m == "upper") return Value::Str(Case(obj.s, 1));
      if (m == "capitalize") return Value::Str(Case(obj.s, 2));
      if (m == "title") return Value::Str(Case(obj.s, 3));
      if (m == "startswith") return Value::Bool(obj.s.starts_with(arg_str(0)));
      if (m == "endswith") return Value::Bool(obj.s.ends_with(arg_str(0)));
      if (m == "replace") return Value::Str(ReplaceAll(obj.s, arg_str(0), arg_str(1)));
      if (m == "split") {
        List l;
        const std::string sep = arg_str(0);
        if (sep.empty()) {
          size_t p = 0;
          while (p < obj.s.size()) {
            while (p < obj.s.size() && IsSpaceChar(obj.s[p])) ++p;
            size_t q = p;
            while (q < obj.s.size() && !IsSpaceChar(obj.s[q])) ++q;
            if (q > p) l.push_back(Value::Str(obj.s.substr(p, q - p)));
            p = q;
          }
        } else {
          size_t p = 0;
          for (size_t hit; (hit = obj.s.find(sep, p)) != std::string::npos; p = hit + sep.size()) {
            l.push_back(Value::Str(obj.s.substr(p, hit - p)));
          }
          l.push_back(Value::Str(obj.s.substr(p)));
        }
        return Value::Lst(std::move(l));
      }
    }
    if (obj.type == Value::kDict) {
      if (m == "items" || m == "keys" || m == "values") {
        List l;
        for (const auto& [k, v] : *obj.dict) {
          if (m == "items") l.push_back(Value::Lst({Value::Str(k), v}));
          if (m == "keys") l.push_back(Value::Str(k));
          if (m == "values") l.push_back(v);
        }
        return Value::Lst(std::move(l));
      }
      if (m == "get") {
        if (const Value* v = obj.Find(arg_str(0))) return *v;
        return args.size() > 1 ? args[1] : Value::None();
      }
    }
    return TypeError(absl::StrCat("unknown method .", m, "()"));
  }

  absl::StatusOr<Value> Filter(const Expr& e) {
    MOE_ASSIGN_OR_RETURN(const Value v, Eval(*e.args[0]));
    MOE_ASSIGN_OR_RETURN(std::vector<Value> args, Args(e, 1));
    const std::string& f = e.name;
    if (f == "trim") return Value::Str(Strip(Str(v), "", true, true));
    if (f == "upper") return Value::Str(Case(Str(v), 1));
    if (f == "lower") return Value::Str(Case(Str(v), 0));
    if (f == "capitalize") return Value::Str(Case(Str(v), 2));
    if (f == "title") return Value::Str(Case(Str(v), 3));
    if (f == "string") return Value::Str(Str(v));
    if (f == "safe" || f == "e" || f == "escape") return v;  // no autoescape in transformers
    if (f == "length" || f == "count") {
      if (v.type == Value::kString) return Value::Int(static_cast<int64_t>(v.s.size()));
      if (v.type == Value::kList) return Value::Int(static_cast<int64_t>(v.list->size()));
      if (v.dict != nullptr) return Value::Int(static_cast<int64_t>(v.dict->size()));
      return TypeError("length of a value without one");
    }
    if (f == "first" || f == "last") {
      if (v.type != Value::kList) return TypeError("first/last of a non-list");
      if (v.list->empty()) return Value();
      return f == "first" ? v.list->front() : v.list->back();
    }
    if (f == "list") {
      if (v.type == Value::kList) return v;
      List l;
      if (v.type == Value::kString) {
        for (const char c : v.s) l.push_back(Value::Str(std::string(1, c)));
      }
      return Value::Lst(std::move(l));
    }
    if (f == "reverse") {
      if (v.type == Value::kString) return Value::Str(std::string(v.s.rbegin(), v.s.rend()));
      if (v.type != Value::kList) return TypeError("reverse of a non-list");
      return Value::Lst(List(v.list->rbegin(), v.list->rend()));
    }
    if (f == "join") {
      if (v.type != Value::kList) return TypeError("join of a non-list");
      std::string out;
      const std::string sep = args.empty() ? "" : Str(args[0]);
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? sep : "") + Str((*v.list)[k]);
      return Value::Str(std::move(out));
    }
    if (f == "default" || f == "d") {
      const bool boolean = args.size() > 1 && Truthy(args[1]);
      if (v.type == Value::kUndefined || (boolean && !Truthy(v))) {
        return args.empty() ? Value::Str("") : args[0];
      }
      return v;
    }
    if (f == "tojson") {
      int indent = -1;
      for (const auto& [k, x] : e.kwargs) {
        MOE_ASSIGN_OR_RETURN(const Value iv, Eval(*x));
        if (k == "indent" && iv.type == Value::kInt) indent = static_cast<int>(iv.i);
      }
      if (!args.empty() && args[0].type == Value::kInt) indent = static_cast<int>(args[0].i);
      return Value::Str(ToJson(v).dump(indent, ' ', /*ensure_ascii=*/false,
                                       nlohmann::json::error_handler_t::replace));
    }
    if (f == "int") {
      if (v.IsNumber()) return Value::Int(static_cast<int64_t>(v.Num()));
      if (v.type == Value::kString) {
        char* end = nullptr;
        const long long x = std::strtoll(v.s.c_str(), &end, 10);
        return Value::Int(end != nullptr && *end == '\0' && !v.s.empty() ? x : 0);
      }
      return Value::Int(0);
    }
    if (f == "replace") {
      if (args.size() < 2) return TypeError("replace needs two arguments");
      return Value::Str(ReplaceAll(Str(v), Str(args[0]), Str(args[1])));
    }
    return TypeError(absl::StrCat("unknown filter |", f));
  }

  absl::StatusOr<Value> Test(const Expr& e) {
    MOE_ASSIGN_OR_RETURN(const Value v, Eval(*e.args[0]));
    const std::string& t = e.name;
    bool r = false;
    if (t == "defined")
      r = v.type != Value::kUndefined;
    else if (t == "undefined")
      r = v.type == Value::kUndefined;
    else if (t == "none")
      r = v.type == Value::kNone;
    else if (t == "string")
      r = v.type == Value::kString;
    else if (t == "number")
      r = v.type == Value::kInt || v.type == Value::kFloat;
    else if (t == "integer")
      r = v.type == Value::kInt;
    else if (t == "boolean")
      r = v.type == Value::kBool;
    else if (t == "mapping")
      r = v.type == Value::kDict;
    else if (t == "iterable")
      r = v.type == Value::kList || v.type == Value::kDict || v.type == Value::kString;
    else if (t == "sequence")
      r = v.type == Value::kList || v.type == Value::kString || v.type == Value::kDict;
    else if (t == "true")
      r = v.type == Value::kBool && v.b;
    else if (t == "false")
      r = v.type == Value::kBool && !v.b;
    else if (t == "even" || t == "odd") {
      if (v.type != Value::kInt) return TypeError("even/odd of a non-integer");
      r = (v.i % 2 == 0) == (t == "even");
    } else if (t == "eq" || t == "equalto" || t == "sameas") {
      if (e.args.size() < 2) return TypeError("test without its argument");
      MOE_ASSIGN_OR_RETURN(const Value other, Eval(*e.args[1]));
      r = Equal(v, other);
    } else {
      return TypeError(absl::StrCat("unknown test 'is ", t, "'"));
    }
    return Value::Bool(e.negated ? !r : r);
  }

  std::string* out_;
  bool break_ = false;
  bool continue_ = false;
  int64_t iterations_ = 0;
};

}  // namespace

absl::StatusOr<std::string> ChatTemplate::ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat("cannot open chat template ", path));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

absl::StatusOr<std::vector<int32_t>> ChatTemplate::Encode(const std::vector<ChatMessage>& messages,
                                                          bool add_generation_prompt,
                                                          const Tokenizer& tokenizer) const {
  const std::string eos =
      tokenizer.eos_ids().empty() ? std::string() : tokenizer.TokenText(tokenizer.eos_ids()[0]);
  absl::StatusOr<std::string> rendered =
      Render(messages, add_generation_prompt, tokenizer.TokenText(tokenizer.bos_id()), eos);
  if (!rendered.ok()) return rendered.status();
  return tokenizer.Encode(*rendered, /*add_bos=*/false);
}

absl::StatusOr<std::string> ChatTemplate::FindSource(const std::string& model_dir) {
  const std::filesystem::path dir(model_dir);
  std::error_code error;
  if (std::filesystem::is_regular_file(dir / "chat_template.jinja", error)) {
    std::ifstream in(dir / "chat_template.jinja", std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  const std::filesystem::path config = dir / "tokenizer_config.json";
  if (std::filesystem::is_regular_file(config, error)) {
    std::ifstream in(config, std::ios::binary);
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config.string(), ": malformed JSON"));
    }
    const nlohmann::json t = j.value("chat_template", nlohmann::json());
    if (t.is_string()) return t.get<std::string>();
    if (t.is_array()) {
      for (const nlohmann::json& named : t) {
        if (named.is_object() && named.value("name", "") == "default" &&
            named.value("template", nlohmann::json()).is_string()) {
          return named["template"].get<std::string>();
        }
      }
    }
    if (!t.is_null()) {
      return absl::InvalidArgumentError(absl::StrCat(
          config.string(), ": chat_template: expected a string or a list with a \"default\""));
    }
  }
  return absl::NotFoundError(
      absl::StrCat(model_dir,
                   " has no chat template (chat_template.jinja or tokenizer_config.json's "
                   "chat_template); pass one with --chat-template FILE"));
}

ChatTemplate::ChatTemplate() = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(std::string_view source) {
  MOE_ASSIGN_OR_RETURN(std::vector<Segment> segments, Lex(source));
  TemplateParser parser(std::move(segments));
  std::unique_ptr<ChatTemplate> t(new ChatTemplate());
  std::string stop, rest;
  MOE_RETURN_IF_ERROR(parser.Body(&t->body_, {}, &stop, &rest));
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                 bool add_generation_prompt,
                                                 const std::string& bos_token,
                                                 const std::string& eos_token) const {
  std::string out;
  Renderer r(&out);
  r.scopes.emplace_back();
  List list;
  for (const ChatMessage& m : messages) {
    list.push_back(Value::Dct({{"role", Value::Str(m.role)}, {"content", Value::Str(m.content)}}));
  }
  Renderer::Scope& globals = r.scopes.back();
  globals.vars["messages"] = Value::Lst(std::move(list));
  globals.vars["add_generation_prompt"] = Value::Bool(add_generation_prompt);
  globals.vars["bos_token"] = Value::Str(bos_token);
  globals.vars["eos_token"] = Value::Str(eos_token);
  r.scopes.emplace_back();  // the template's own top-level sets
  MOE_RETURN_IF_ERROR(r.Run(body_));
  return out;
}

}  // namespace moe
