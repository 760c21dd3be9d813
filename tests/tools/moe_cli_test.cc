// Runs the real moe-cli binary: bad input exits non-zero with a message a user can act on;
// good input streams text.
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/chat_template.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testutil/checkpoint_writer.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

constexpr char kFixture[] = "tests/testdata/models/mixtral_32e_gqa_fp16";

struct Result {
  int exit_code;
  std::string output;  // stdout + stderr
};

Result RunCli(const std::string& args) {
  const std::string cmd = std::string(MOE_CLI_PATH) + " " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  Result r{-1, ""};
  if (pipe == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string CopyFixture(const std::string& name) {
  const std::string dir = testing::TempDir(name);
  for (const auto& f : std::filesystem::directory_iterator(kFixture)) {
    std::filesystem::copy(f.path(), dir + "/" + f.path().filename().string());
  }
  return dir;
}

TEST(MoeCliTest, StreamsACompletion) {
  Result r = RunCli(std::string("generate --model ") + kFixture +
                    " --prompt 'We hold' --max-tokens 8 --ignore-eos");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("We hold"));
  EXPECT_THAT(r.output, HasSubstr("8 generated, finish: length"));
}

// Both kernel modes run (the fixture's F16 weights take the exact path in both); a bad value is
// refused before anything loads.
TEST(MoeCliTest, KernelsFlag) {
  for (const char* mode : {"fast", "exact"}) {
    Result r = RunCli(std::string("generate --kernels ") + mode + " --model " + kFixture +
                      " --prompt 'We hold' --max-tokens 4 --ignore-eos");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_THAT(r.output, HasSubstr("4 generated, finish: length"));
  }
  Result r = RunCli(std::string("generate --kernels turbo --model ") + kFixture + " --prompt hi");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("--kernels=turbo: expected 'fast' or 'exact'"));
}

// --quantize is parsed by the flags library: a bad value is refused with the choices.
TEST(MoeCliTest, BadQuantizeValue) {
  Result r = RunCli(std::string("generate --quantize q5_0 --model ") + kFixture + " --prompt hi");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("--quantize \"q5_0\" is not one of q8_0, q4_k, q6_k"));
}

TEST(MoeCliTest, MissingModelDirectory) {
  Result r = RunCli("generate --model /nonexistent/model --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("moe-cli: error: model /nonexistent/model does not exist"));
}

TEST(MoeCliTest, MissingTokenizer) {
  const std::string dir = CopyFixture("notok");
  std::filesystem::remove(dir + "/tokenizer.model");
  Result r = RunCli("generate --model " + dir + " --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("tokenizer.model"));
}

TEST(MoeCliTest, TruncatedWeights) {
  const std::string dir = CopyFixture("trunc");
  std::filesystem::resize_file(dir + "/model.safetensors",
                               std::filesystem::file_size(dir + "/model.safetensors") - 100);
  Result r = RunCli("generate --model " + dir + " --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("model.safetensors"));
  EXPECT_THAT(r.output, HasSubstr("truncated"));
}

TEST(MoeCliTest, PromptLongerThanContext) {
  std::string prompt;
  for (int i = 0; i < 300; ++i) prompt += "liberty ";
  Result r = RunCli(std::string("generate --model ") + kFixture + " --prompt '" + prompt + "'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("max_position_embeddings"));
}

TEST(MoeCliTest, BadSamplingParameter) {
  Result r = RunCli(std::string("generate --model ") + kFixture + " --prompt hi --top-p 1.5");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("top_p"));
}

// chat: the prompt is the chat template rendered for the message (with the generation prompt),
// encoded without an added BOS — as many tokens as that gives, computed here independently.
TEST(MoeCliTest, ChatRendersTheTemplate) {
  const std::string chatml = "tests/testdata/chat_templates/chatml.jinja";
  Result r = RunCli(std::string("chat --model ") + kFixture +
                    " --system 'Be brief.' --message 'hello there' --chat-template " + chatml +
                    " --max-tokens 4 --ignore-eos");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto tokenizer = Tokenizer::Load(kFixture);
  ASSERT_TRUE(tokenizer.ok());
  std::ifstream in(chatml);
  auto chat = ChatTemplate::Parse(
      std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()));
  ASSERT_TRUE(chat.ok());
  auto rendered =
      (*chat)->Render({{"system", "Be brief."}, {"user", "hello there"}}, true, "<s>", "</s>");
  ASSERT_TRUE(rendered.ok());
  const size_t prompt = (*tokenizer)->Encode(*rendered, /*add_bos=*/false).size();
  EXPECT_THAT(r.output, HasSubstr(absl::StrCat("[", prompt, " prompt tokens, 4 generated")));
  EXPECT_THAT(r.output, ::testing::Not(HasSubstr("hello there")));  // the reply only
}

TEST(MoeCliTest, ChatWithoutATemplateSaysHowToGiveOne) {
  Result r = RunCli(std::string("chat --model ") + kFixture + " --message hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("no chat template"));
  EXPECT_THAT(r.output, HasSubstr("--chat-template FILE"));
  r = RunCli(std::string("chat --model ") + kFixture +
             " --chat-template /nonexistent --message hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("cannot open chat template /nonexistent"));
  r = RunCli("chat --message hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("--server HOST:PORT"));
}

TEST(MoeCliTest, InteractiveChatKeepsTheConversation) {
  // Two lines on stdin: two replies, the second prompted with the whole conversation.
  const std::string chatml = "tests/testdata/chat_templates/chatml.jinja";
  const std::string cmd =
      absl::StrCat("printf 'hello there\\nand again\\n' | ", MOE_CLI_PATH, " chat --model ",
                   kFixture, " --chat-template ", chatml, " --max-tokens 3 --ignore-eos 2>&1");
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), pipe)) > 0;) out.append(buf.data(), n);
  ASSERT_EQ(pclose(pipe), 0) << out;
  std::vector<size_t> prompts;
  for (size_t pos = 0; (pos = out.find("\n[", pos)) != std::string::npos; ++pos) {
    prompts.push_back(std::strtoul(out.c_str() + pos + 2, nullptr, 10));
  }
  ASSERT_EQ(prompts.size(), 2u) << out;
  // The second prompt holds the first exchange: user, the 3-token reply, the new message.
  EXPECT_GT(prompts[1], prompts[0] + 3) << out;
  EXPECT_THAT(out, HasSubstr("3 generated, finish: length"));
}

TEST(MoeCliTest, GenerateJsonListsTokensAndLogprobs) {
  Result r = RunCli(std::string("generate --model ") + kFixture +
                    " --prompt 'We hold' --max-tokens 5 --ignore-eos --json --logprobs 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // The JSON object is stdout's one line (the log goes to stderr, merged here).
  const size_t brace = r.output.find("\n{");
  ASSERT_NE(brace, std::string::npos) << r.output;
  const std::string line = r.output.substr(brace + 1, r.output.find('\n', brace + 1) - brace - 1);
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.output;
  EXPECT_EQ(j["prompt"], "We hold");
  EXPECT_EQ(j["finish_reason"], "length");
  ASSERT_EQ(j["tokens"].size(), 5u) << r.output;
  auto tokenizer = Tokenizer::Load(kFixture);
  ASSERT_TRUE(tokenizer.ok());
  EXPECT_EQ(j["prompt_tokens"], (*tokenizer)->Encode("We hold").size());
  std::string text;
  std::vector<int32_t> ids;
  for (const nlohmann::json& t : j["tokens"]) {
    text += t["text"].get<std::string>();
    ids.push_back(t["id"].get<int32_t>());
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    ASSERT_EQ(t["top_logprobs"].size(), 2u);
    // Greedy: each token is its position's most likely one.
    EXPECT_EQ(t["top_logprobs"][0]["id"], t["id"]);
    EXPECT_EQ(t["top_logprobs"][0]["logprob"], t["logprob"]);
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(),
              t["top_logprobs"][1]["logprob"].get<double>());
  }
  EXPECT_EQ(text, j["text"]);
  EXPECT_EQ((*tokenizer)->Decode(ids), j["text"].get<std::string>().substr(
                                           j["text"].get<std::string>().find_first_not_of(' ')));
}

TEST(MoeCliTest, HelpListsTheFlags) {
  Result r = RunCli("--help");
  for (const char* flag : {"--max_tokens", "--temperature", "--server", "--model", "--stop"}) {
    EXPECT_THAT(r.output, HasSubstr(flag)) << r.output;
  }
}

TEST(MoeCliTest, DashedAndUnderscoredFlagsAreTheSame) {
  Result a = RunCli(std::string("generate --model ") + kFixture +
                    " --prompt x --max-tokens 3 --ignore-eos");
  Result b = RunCli(std::string("generate --model ") + kFixture +
                    " --prompt x --max_tokens 3 --ignore_eos");
  EXPECT_THAT(a.output, HasSubstr("3 generated"));
  EXPECT_THAT(b.output, HasSubstr("3 generated"));
}

TEST(MoeCliTest, UsageWithoutSubcommand) {
  Result r = RunCli("");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("moe-cli generate --model DIR"));
}

}  // namespace
}  // namespace moe
