// Chat templates: the Jinja2 subset that models' `chat_template`s use, rendered as transformers'
// apply_chat_template does (a sandboxed Jinja2 environment with trim_blocks and lstrip_blocks).
//
// Statements: {{ expr }}, {% if / elif / else / endif %}, {% for x in xs %} (also `for a, b in`;
// loop.index, index0, first, last, length, revindex, revindex0; {% break %} / {% continue %}),
// {% set x = expr %} and {% set ns.attr = expr %}, {# comments #}, and the "-" whitespace
// control on any tag. Expressions: string / integer / boolean / none literals, lists, dicts,
// variables, attribute and subscript access (and slices), calls, the operators `+ - * / // %`,
// `~`, comparisons, `in` / `not in`, `and` / `or` / `not`, `x if c else y`, tests (`is defined`,
// `undefined`, `none`, `string`, `number`, `mapping`, `iterable`, `sequence`, `true`, `false`),
// filters (trim, length, count, upper, lower, capitalize, title, first, last, join, default,
// list, reverse, tojson, string, int, replace, safe), string methods (strip, lstrip, rstrip,
// upper, lower, title, capitalize, startswith, endswith, split, replace), dict methods (items,
// keys, values, get), and the globals raise_exception(message), namespace(...) and range(...).
//
// Rendering errors (a raise_exception, an unknown filter, a type error) are INVALID_ARGUMENT with
// the template's message; syntax errors name the position. Output is bounded (kMaxOutputBytes)
// and loops are bounded, so a hostile template cannot take unbounded memory or time.
#ifndef MOE_COMMON_CHAT_TEMPLATE_H_
#define MOE_COMMON_CHAT_TEMPLATE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tokenizer.h"

namespace moe {

struct ChatMessage {
  std::string role;
  std::string content;
};

class ChatTemplate {
 public:
  static constexpr size_t kMaxOutputBytes = size_t{16} << 20;

  // A model directory's template as transformers finds it: chat_template.jinja, else
  // tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"} of which
  // "default" is taken). NOT_FOUND naming the directory when it has none.
  static absl::StatusOr<std::string> FindSource(const std::string& model_dir);
  // The text of a template file (--chat-template FILE). NOT_FOUND naming it when unreadable.
  static absl::StatusOr<std::string> ReadFile(const std::string& path);

  // Parses `source`. INVALID_ARGUMENT with the position for a syntax error.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Parse(std::string_view source);
  ~ChatTemplate();

  // messages, add_generation_prompt, bos_token and eos_token as apply_chat_template passes them.
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages,
                                     bool add_generation_prompt, const std::string& bos_token,
                                     const std::string& eos_token) const;

  // Render() with the tokenizer's BOS and first EOS token texts, encoded without adding BOS
  // (the template writes it when the model wants it), as transformers' apply_chat_template(
  // tokenize=True) does.
  absl::StatusOr<std::vector<int32_t>> Encode(const std::vector<ChatMessage>& messages,
                                              bool add_generation_prompt,
                                              const Tokenizer& tokenizer) const;

  struct Node;

 private:
  ChatTemplate();
  std::vector<std::unique_ptr<Node>> body_;
};

}  // namespace moe

#endif  // MOE_COMMON_CHAT_TEMPLATE_H_
