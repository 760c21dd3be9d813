// Chat templates against the strings transformers' apply_chat_template renders (4.57.6, Jinja2
// 3.1.6) for the ChatML, zephyr, Mistral [INST], Llama-2 and vicuna-style templates
// (tests/testdata/chat_templates/, tools/fixtures/gen_chat_templates.py), including the
// raise_exception cases; and bad templates.
#include "common/chat_template.h"

#include <fstream>
#include <iterator>
#include <map>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

constexpr char kDir[] = "tests/testdata/chat_templates/";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(ChatTemplateTest, RendersAsTransformers) {
  const json cases = json::parse(ReadFile(std::string(kDir) + "cases.json"));
  ASSERT_GE(cases.size(), 25u);
  std::map<std::string, std::unique_ptr<ChatTemplate>> templates;
  std::map<std::string, int> rendered, raised;
  for (const json& c : cases) {
    const std::string name = c["template"];
    SCOPED_TRACE(name + " " + c["messages"].dump());
    if (!templates.contains(name)) {
      auto t = ChatTemplate::Parse(ReadFile(std::string(kDir) + name + ".jinja"));
      ASSERT_TRUE(t.ok()) << t.status();
      templates[name] = *std::move(t);
    }
    std::vector<ChatMessage> messages;
    for (const json& m : c["messages"]) messages.push_back({m["role"], m["content"]});
    const auto out = templates[name]->Render(messages, c["add_generation_prompt"], c["bos_token"],
                                             c["eos_token"]);
    if (c.contains("error")) {
      ++raised[name];
      EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(out.status().message(), HasSubstr(c["error"].get<std::string>()));
    } else {
      ++rendered[name];
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(*out, c["rendered"].get<std::string>());
    }
  }
  for (const char* name : {"chatml", "zephyr", "mistral", "llama2", "vicuna"}) {
    EXPECT_GE(rendered[name], 5) << name;
  }
  EXPECT_GE(raised["mistral"], 1);
  EXPECT_GE(raised["llama2"], 1);
}

TEST(ChatTemplateTest, SyntaxErrorsAreInvalidArgument) {
  for (const char* source :
       {"{% if x %}never closed", "{{ 'unterminated }}", "{{ a + }}", "{% for in xs %}{% endfor %}",
        "{% macro m() %}{% endmacro %}", "{{ x", "{% set = 3 %}"}) {
    SCOPED_TRACE(source);
    const auto t = ChatTemplate::Parse(source);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ChatTemplateTest, RenderErrorsAndBoundsAreInvalidArgument) {
  const auto render = [](const char* source) {
    auto t = ChatTemplate::Parse(source);
    EXPECT_TRUE(t.ok()) << t.status();
    return (*t)->Render({{"user", "hi"}}, false, "<s>", "</s>");
  };
  EXPECT_THAT(render("{{ raise_exception('no system role') }}").status().message(),
              HasSubstr("no system role"));
  EXPECT_EQ(render("{{ messages | nosuchfilter }}").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(render("{{ 1 / 0 }}").status().code(), absl::StatusCode::kInvalidArgument);
  // Unbounded work: a huge range and an output past the limit.
  EXPECT_EQ(render("{% for i in range(100000000) %}x{% endfor %}").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(render("{% for i in range(3000000) %}{{ 'abcdefgh' }}{% endfor %}").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ChatTemplateTest, WhitespaceControlAndTrimBlocks) {
  const auto render = [](const char* source) {
    auto t = ChatTemplate::Parse(source);
    EXPECT_TRUE(t.ok()) << t.status();
    auto out = (*t)->Render({{"user", " hi "}, {"assistant", "yo"}}, true, "<s>", "</s>");
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : std::string();
  };
  // trim_blocks removes the newline after a block tag; lstrip_blocks the indent before one.
  EXPECT_EQ(render("{% for m in messages %}\n  {% if loop.first %}\n[{{ m.content|trim }}]\n"
                   "  {% endif %}\n{% endfor %}"),
            "[hi]\n");
  EXPECT_EQ(render("a  {{- ' b ' -}}  c"), "a b c");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                   "{% endfor %}{{ ns.n }} {{ messages[1:]|length }} {{ messages[-1]['role'] }}"),
            "2 1 assistant");
}

}  // namespace
}  // namespace moe
