// The OpenAI-compatible API over real HTTP (HttpServer on loopback) on a scheduler running a
// committed fixture model: log-probabilities against transformers' logits, the response shapes,
// streaming, and the refusals (each with its status and OpenAI's error shape).
#include "coordinator/openai_api.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_split.h"
#include "boost/asio.hpp"
#include "boost/asio/ssl.hpp"
#include "common/api_tokens.h"
#include "common/chat_template.h"
#include "coordinator/http_server.h"
#include "coordinator/local_model.h"
#include "coordinator/scheduler.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testutil/golden_fixture.h"
#include "tests/testutil/http.h"

namespace moe {
namespace {

using json = nlohmann::json;
using ::moe::testing::HttpExchange;
using ::moe::testing::HttpPost;
using ::moe::testing::ParseHttpReply;
using ::testing::HasSubstr;

constexpr char kModel[] = "tests/testdata/models/mixtral_32e_gqa_fp16";

std::vector<double> LogSoftmax(const float* row, int64_t n) {
  double max = row[0];
  for (int64_t i = 1; i < n; ++i) max = std::max<double>(max, row[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(row[i] - max);
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = row[i] - max - std::log(sum);
  return out;
}

class OpenAiApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    LocalModelOptions options;
    options.model_dir = kModel;
    options.in_process_workers = 2;
    auto model = LocalModel::Create(options);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
    auto expected = testing::LoadExpected(kModel);
    ASSERT_TRUE(expected.ok()) << expected.status();
    expected_ = new testing::GoldenExpected(std::move(*expected));
    auto source = ChatTemplate::ReadFile("tests/testdata/chat_templates/chatml.jinja");
    ASSERT_TRUE(source.ok()) << source.status();
    auto chat = ChatTemplate::Parse(*source);
    ASSERT_TRUE(chat.ok()) << chat.status();
    chat_ = chat->release();
    SchedulerOptions s;
    s.max_waiting = 8;
    scheduler_ = new Scheduler(model_->engine(), model_->tokenizer(), s);
    scheduler_->Start();
    OpenAiApiDeps deps;
    deps.scheduler = scheduler_;
    deps.tokenizer = model_->tokenizer();
    deps.config = &model_->config();
    deps.model_name = "fixture";
    deps.chat_template = chat_;
    deps.chat_template_source = *source;
    deps.max_sequences_per_request = 8;
    api_ = new OpenAiApi(deps);
    HttpServerOptions http;
    http.max_body_bytes = 1 << 20;
    http.handler_threads = 4;
    auto server = HttpServer::Start("127.0.0.1:0", http,
                                    [](const HttpRequest& r) { return api_->Handle(r); });
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    delete api_;
    delete scheduler_;
    delete chat_;
    delete expected_;
    delete model_;
  }

  static testing::HttpReply Post(const std::string& path, const std::string& body) {
    return ParseHttpReply(HttpPost(server_->address(), path, body));
  }
  static json PostJson(const std::string& path, const json& body, int want_status = 200) {
    const testing::HttpReply r = Post(path, body.dump());
    EXPECT_EQ(r.status, want_status) << path << " " << body.dump() << " -> " << r.body;
    return json::parse(r.body, nullptr, false);
  }
  // The `data:` events of an SSE body, [DONE] last.
  static std::vector<std::string> Events(const std::string& body) {
    std::vector<std::string> out;
    for (absl::string_view line : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
      EXPECT_TRUE(absl::StartsWith(line, "data: ")) << line;
      out.emplace_back(line.substr(6));
    }
    return out;
  }

  static LocalModel* model_;
  static testing::GoldenExpected* expected_;
  static ChatTemplate* chat_;
  static Scheduler* scheduler_;
  static OpenAiApi* api_;
  static HttpServer* server_;
};

LocalModel* OpenAiApiTest::model_ = nullptr;
testing::GoldenExpected* OpenAiApiTest::expected_ = nullptr;
ChatTemplate* OpenAiApiTest::chat_ = nullptr;
Scheduler* OpenAiApiTest::scheduler_ = nullptr;
OpenAiApi* OpenAiApiTest::api_ = nullptr;
HttpServer* OpenAiApiTest::server_ = nullptr;

TEST_F(OpenAiApiTest, EchoLogprobsOfThePromptMatchTransformers) {
  const int64_t vocab = model_->config().vocab_size;
  const std::vector<int32_t>& prompt = expected_->prompt;
  const json r = PostJson("/v1/completions", {{"model", "fixture"},
                                              {"prompt", prompt},
                                              {"max_tokens", 0},
                                              {"echo", true},
                                              {"logprobs", 3}});
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  const json& lp = r["choices"][0]["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), prompt.size());
  ASSERT_EQ(lp["tokens"].size(), prompt.size());
  ASSERT_EQ(lp["text_offset"].size(), prompt.size());
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  std::string joined;
  for (size_t i = 0; i < prompt.size(); ++i) {
    EXPECT_EQ(lp["text_offset"][i].get<size_t>(), joined.size()) << i;  // ASCII fixture text
    joined += lp["tokens"][i].get<std::string>();
  }
  EXPECT_EQ(r["choices"][0]["text"], joined);
  EXPECT_EQ(joined, model_->tokenizer()->Decode(prompt));
  for (size_t i = 1; i < prompt.size(); ++i) {
    const std::vector<double> ref = LogSoftmax(&expected_->logits[(i - 1) * vocab], vocab);
    EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), ref[prompt[i]], 1e-3) << i;
    const json& top = lp["top_logprobs"][i];
    ASSERT_TRUE(top.is_object());
    EXPECT_GE(top.size(), 1u);
    EXPECT_LE(top.size(), 4u);  // the 3 most likely and the prompt's own token
    ASSERT_TRUE(top.contains(lp["tokens"][i].get<std::string>())) << top.dump();
    EXPECT_EQ(top[lp["tokens"][i].get<std::string>()], lp["token_logprobs"][i]);
    double best = -1e9;
    for (auto it = top.begin(); it != top.end(); ++it) best = std::max(best, it->get<double>());
    EXPECT_NEAR(best, *std::max_element(ref.begin(), ref.end()), 1e-3) << i;
  }
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["usage"]["prompt_tokens"], prompt.size());
  EXPECT_EQ(r["usage"]["completion_tokens"], 0);
}

TEST_F(OpenAiApiTest, GreedyCompletionIsTransformersGreedyAndStreamsTheSameText) {
  const std::vector<int32_t>& greedy = expected_->greedy;
  const int64_t vocab = model_->config().vocab_size;
  const json body = {{"prompt", expected_->prompt},
                     {"max_tokens", greedy.size()},
                     {"temperature", 0},
                     {"ignore_eos", true},
                     {"logprobs", 1}};
  const json r = PostJson("/v1/completions", body);
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_THAT(r["id"].get<std::string>(), ::testing::StartsWith("cmpl-"));
  const json& choice = r["choices"][0];
  IncrementalDetokenizer detok(model_->tokenizer(), /*continuation=*/true);
  std::string want;
  for (int32_t t : greedy) want += detok.Add(t);
  want += detok.Finish();
  EXPECT_EQ(choice["text"], want);
  EXPECT_EQ(choice["finish_reason"], "length");
  EXPECT_EQ(r["usage"]["completion_tokens"], greedy.size());
  ASSERT_EQ(choice["logprobs"]["token_logprobs"].size(), greedy.size());
  for (size_t i = 0; i < greedy.size(); ++i) {
    const std::vector<double> ref = LogSoftmax(&expected_->decode_logits[i * vocab], vocab);
    EXPECT_NEAR(choice["logprobs"]["token_logprobs"][i].get<double>(), ref[greedy[i]], 1e-3);
  }

  json streamed = body;
  streamed["stream"] = true;
  streamed["stream_options"] = {{"include_usage", true}};
  const testing::HttpReply s = Post("/v1/completions", streamed.dump());
  ASSERT_EQ(s.status, 200) << s.body;
  EXPECT_THAT(s.headers, HasSubstr("text/event-stream"));
  EXPECT_TRUE(s.complete_chunks);
  const std::vector<std::string> events = Events(s.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  size_t streamed_logprobs = 0;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    ASSERT_EQ(chunk["choices"].size(), 1u) << events[i];
    text += chunk["choices"][0]["text"].get<std::string>();
    if (!chunk["choices"][0]["logprobs"].is_null()) {
      streamed_logprobs += chunk["choices"][0]["logprobs"]["token_logprobs"].size();
    }
    if (!chunk["choices"][0]["finish_reason"].is_null())
      finish = chunk["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, want);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(streamed_logprobs, greedy.size());
  const json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], greedy.size());
}

TEST_F(OpenAiApiTest, SeveralPromptsAndNGiveIndexedChoices) {
  const std::vector<int32_t> a(expected_->prompt.begin(), expected_->prompt.begin() + 5);
  const json r = PostJson("/v1/completions", {{"prompt", {a, expected_->prompt}},
                                              {"max_tokens", 3},
                                              {"n", 2},
                                              {"temperature", 0},
                                              {"ignore_eos", true}});
  ASSERT_EQ(r["choices"].size(), 4u) << r.dump();
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(r["choices"][i]["index"], i);
  // Greedy: both samples of one prompt agree.
  EXPECT_EQ(r["choices"][0]["text"], r["choices"][1]["text"]);
  EXPECT_EQ(r["choices"][2]["text"], r["choices"][3]["text"]);
  EXPECT_EQ(r["usage"]["prompt_tokens"], a.size() + expected_->prompt.size());
  EXPECT_EQ(r["usage"]["completion_tokens"], 12);
  // Seeded sampling is reproducible.
  const json sampled = {{"prompt", "Hello"}, {"max_tokens", 6}, {"temperature", 1.0},
                        {"seed", 7},         {"n", 2},          {"ignore_eos", true}};
  const json x = PostJson("/v1/completions", sampled);
  const json y = PostJson("/v1/completions", sampled);
  EXPECT_EQ(x["choices"], y["choices"]);
}

TEST_F(OpenAiApiTest, ChatUsesTheTemplateAndReportsChatLogprobs) {
  const std::vector<ChatMessage> messages = {{"system", "Be brief."}, {"user", "Hi there"}};
  auto ids = chat_->Encode(messages, true, *model_->tokenizer());
  ASSERT_TRUE(ids.ok()) << ids.status();
  const json body = {
      {"model", "fixture"},
      {"messages",
       {{{"role", "system"}, {"content", "Be brief."}},
        {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "Hi there"}}}}}}},
      {"max_tokens", 4},
      {"temperature", 0},
      {"logprobs", true},
      {"top_logprobs", 2}};
  const json r = PostJson("/v1/chat/completions", body);
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["usage"]["prompt_tokens"], ids->size());
  const json& choice = r["choices"][0];
  EXPECT_EQ(choice["message"]["role"], "assistant");
  const json& content = choice["logprobs"]["content"];
  ASSERT_EQ(content.size(), r["usage"]["completion_tokens"].get<size_t>());
  for (const json& entry : content) {
    ASSERT_EQ(entry["top_logprobs"].size(), 2u);
    // Greedy: the chosen token is the most likely one.
    EXPECT_EQ(entry["logprob"], entry["top_logprobs"][0]["logprob"]);
    std::string bytes;
    for (const json& b : entry["bytes"]) bytes += static_cast<char>(b.get<int>());
    EXPECT_EQ(bytes, entry["token"].get<std::string>());
  }

  json streamed = body;
  streamed["stream"] = true;
  const testing::HttpReply s = Post("/v1/chat/completions", streamed.dump());
  ASSERT_EQ(s.status, 200) << s.body;
  const std::vector<std::string> events = Events(s.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  const json first = json::parse(events[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (size_t i = 1; i + 1 < events.size(); ++i) {
    const json delta = json::parse(events[i])["choices"][0]["delta"];
    if (delta.contains("content")) text += delta["content"].get<std::string>();
  }
  EXPECT_EQ(text, choice["message"]["content"]);
}

TEST_F(OpenAiApiTest, ModelsTokenizeDetokenizeInfoHealth) {
  const json models =
      json::parse(ParseHttpReply(testing::HttpGet(server_->address(), "/v1/models")).body);
  EXPECT_EQ(models["data"][0]["id"], "fixture");
  const json t = PostJson("/tokenize", {{"prompt", "Hello world"}});
  EXPECT_EQ(t["tokens"].get<std::vector<int32_t>>(), model_->tokenizer()->Encode("Hello world"));
  EXPECT_EQ(t["count"], t["tokens"].size());
  const json d = PostJson("/detokenize", {{"tokens", t["tokens"]}});
  EXPECT_EQ(d["prompt"], "Hello world");
  const json info =
      json::parse(ParseHttpReply(testing::HttpGet(server_->address(), "/tokenizer_info")).body);
  EXPECT_EQ(info["eos_token"], model_->tokenizer()->TokenText(model_->tokenizer()->eos_ids()[0]));
  EXPECT_THAT(info["chat_template"].get<std::string>(), HasSubstr("<|im_start|>"));
  EXPECT_EQ(ParseHttpReply(testing::HttpGet(server_->address(), "/health")).status, 200);
}

// "experts_per_token": 1 (our extension): the prompt's logprobs are transformers' with
// num_experts_per_tok = 1 (tools/fixtures/gen_topk_override.py), not the model's top-2.
TEST_F(OpenAiApiTest, ExpertsPerTokenRoutesTheRequestToFewerExperts) {
  const int64_t vocab = model_->config().vocab_size;
  auto top1 = testing::LoadExpected(std::string(kModel) + "/top1.expected.json",
                                    std::string(kModel) + "/top1.expected.safetensors", vocab);
  ASSERT_TRUE(top1.ok()) << top1.status();
  const std::vector<int32_t>& prompt = top1->prompt;
  const json r = PostJson("/v1/completions", {{"prompt", prompt},
                                              {"max_tokens", 0},
                                              {"echo", true},
                                              {"logprobs", 0},
                                              {"experts_per_token", 1}});
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  const json& lp = r["choices"][0]["logprobs"]["token_logprobs"];
  ASSERT_EQ(lp.size(), prompt.size());
  double moved = 0;  // how far the model's own (top-2) logprobs are
  for (size_t i = 1; i < prompt.size(); ++i) {
    const std::vector<double> ref = LogSoftmax(&top1->logits[(i - 1) * vocab], vocab);
    EXPECT_NEAR(lp[i].get<double>(), ref[prompt[i]], 1e-3) << i;
    const std::vector<double> top2 = LogSoftmax(&expected_->logits[(i - 1) * vocab], vocab);
    moved = std::max(moved, std::fabs(top2[prompt[i]] - ref[prompt[i]]));
  }
  EXPECT_GT(moved, 0.1);  // the override changed the numbers
}

// "return_routing": true (ours): every generated token with its experts per layer — the
// transformers greedy tokens, top-2 (or experts_per_token) distinct hosted experts whose
// weights sum to 1 — whole and streamed alike.
TEST_F(OpenAiApiTest, ReturnRoutingListsEachTokensExperts) {
  const int64_t layers = model_->config().num_hidden_layers;
  const int64_t experts = model_->config().num_local_experts;
  const auto check = [&](const json& routing, size_t k) {
    ASSERT_EQ(routing.size(), 4u) << routing.dump();
    for (size_t t = 0; t < routing.size(); ++t) {
      EXPECT_EQ(routing[t]["token"], expected_->greedy[t]);
      ASSERT_EQ(routing[t]["layers"].size(), static_cast<size_t>(layers));
      for (const json& layer : routing[t]["layers"]) {
        ASSERT_EQ(layer["experts"].size(), k) << layer.dump();
        ASSERT_EQ(layer["weights"].size(), k);
        double sum = 0;
        std::set<int> seen;
        for (size_t j = 0; j < k; ++j) {
          const int e = layer["experts"][j].get<int>();
          EXPECT_TRUE(e >= 0 && e < experts) << e;
          seen.insert(e);
          sum += layer["weights"][j].get<double>();
        }
        EXPECT_EQ(seen.size(), k);
        EXPECT_NEAR(sum, 1.0, 1e-5);
      }
    }
  };
  const json body = {{"prompt", expected_->prompt},
                     {"max_tokens", 4},
                     {"temperature", 0},
                     {"return_routing", true}};
  json r = PostJson("/v1/completions", body);
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  check(r["choices"][0]["routing"], 2);
  json one = body;
  one["experts_per_token"] = 1;
  r = PostJson("/v1/completions", one);
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  EXPECT_EQ(r["choices"][0]["routing"].size(), 4u);
  for (const json& t : r["choices"][0]["routing"]) {
    for (const json& layer : t["layers"]) EXPECT_EQ(layer["experts"].size(), 1u);
  }
  json streamed = body;
  streamed["stream"] = true;
  const testing::HttpReply reply = Post("/v1/completions", streamed.dump());
  ASSERT_EQ(reply.status, 200);
  json all = json::array();
  for (const std::string& event : Events(reply.body)) {
    if (event == "[DONE]") continue;
    const json chunk = json::parse(event);
    for (const json& t : chunk["choices"][0].value("routing", json::array())) all.push_back(t);
  }
  check(all, 2);
  // Without it, no routing key.
  r = PostJson("/v1/completions", {{"prompt", expected_->prompt}, {"max_tokens", 1}});
  EXPECT_FALSE(r["choices"][0].contains("routing"));
}

TEST_F(OpenAiApiTest, BadRequestsGetTheirStatusAndOpenAiErrors) {
  struct Bad {
    std::string path;
    std::string body;
    int status;
    std::string param;  // "" : null
  };
  const std::string big_nest = std::string(100, '[') + std::string(100, ']');
  const std::vector<Bad> table = {
      {"/v1/completions", "{not json", 400, ""},
      {"/v1/completions", "[1, 2]", 400, ""},
      {"/v1/completions", R"({"prompt": "a", "bogus": 1})", 400, "bogus"},
      {"/v1/completions", R"({"prompt": 5})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": []})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": [1, "a"]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": [99999999]})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": "a", "max_tokens": "ten"})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "a", "max_tokens": 1000000000})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "a", "max_tokens": 0})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "a", "n": 100000})", 400, "n"},
      {"/v1/completions", R"({"prompt": "a", "n": 9})", 400, "n"},
      {"/v1/completions", R"({"prompt": "a", "logprobs": 1000})", 400, "logprobs"},
      {"/v1/completions", R"({"prompt": "a", "temperature": -1})", 400, "temperature"},
      {"/v1/completions", R"({"prompt": "a", "top_p": 0})", 400, "top_p"},
      {"/v1/completions", R"({"prompt": "a", "stop": [""]})", 400, "stop"},
      {"/v1/completions", R"({"prompt": "a", "presence_penalty": 1})", 400, "presence_penalty"},
      {"/v1/completions", R"({"prompt": "a", "model": "gpt-4"})", 404, "model"},
      {"/v1/completions", R"({"prompt": "a", "timeout": 0})", 400, "timeout"},
      {"/v1/completions", R"({"prompt": "a", "experts_per_token": 3})", 400, "experts_per_token"},
      {"/v1/completions", R"({"prompt": "a", "experts_per_token": "one"})", 400,
       "experts_per_token"},
      {"/v1/completions", R"({"prompt": "a", "timeout": "1s"})", 400, "timeout"},
      {"/v1/completions", R"({"prompt": "a", "timeout": 1e9})", 400, "timeout"},
      // A deadline that has passed before the first step: 504, nothing generated.
      {"/v1/completions", R"({"prompt": "a", "max_tokens": 200, "timeout": 1e-9})", 504, ""},
      {"/v1/completions", "{\"prompt\": \"\xff\xfe\"}", 400, ""},
      {"/v1/completions", big_nest, 400, ""},
      {"/v1/chat/completions", R"({"messages": "hi"})", 400, "messages"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": 3}]})", 400,
       "messages"},
      {"/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}], "tools": [{}]})",
       400, "tools"},
      {"/v1/chat/completions",
       R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", 400,
       "top_logprobs"},
      {"/detokenize", R"({"tokens": [-1]})", 400, "tokens"},
      {"/v1/nothing", "{}", 404, ""},
  };
  for (const Bad& bad : table) {
    const testing::HttpReply r = Post(bad.path, bad.body);
    EXPECT_EQ(r.status, bad.status) << bad.path << " " << bad.body << " -> " << r.body;
    const json e = json::parse(r.body, nullptr, false);
    ASSERT_TRUE(e.is_object() && e.contains("error")) << r.body;
    EXPECT_TRUE(e["error"]["message"].is_string()) << r.body;
    EXPECT_EQ(e["error"]["code"], bad.status) << r.body;
    if (bad.param.empty()) {
      EXPECT_TRUE(e["error"]["param"].is_null()) << bad.body << " -> " << r.body;
    } else {
      EXPECT_EQ(e["error"]["param"], bad.param) << bad.body << " -> " << r.body;
    }
  }
  // Text that cannot fit the context is refused before it is tokenized (tokenizing costs far
  // more memory than the text): 900 KB of prompt for a 256-token model.
  const std::string huge(900'000, 'a');
  for (const auto& [path, body, param] : std::vector<std::tuple<std::string, json, std::string>>{
           {"/v1/completions", {{"prompt", huge}}, "prompt"},
           {"/v1/completions", {{"prompt", {"ok", huge}}}, "prompt"},
           {"/v1/chat/completions",
            {{"messages", {{{"role", "user"}, {"content", huge}}}}},
            "messages"},
           {"/tokenize", {{"prompt", huge}}, "prompt"},
           {"/tokenize", {{"messages", {{{"role", "user"}, {"content", huge}}}}}, "messages"}}) {
    const testing::HttpReply r = Post(path, body.dump());
    EXPECT_EQ(r.status, 400) << path << " " << r.body;
    EXPECT_THAT(r.body, HasSubstr("cannot fit the model's context")) << path;
    EXPECT_EQ(json::parse(r.body)["error"]["param"], param) << path;
  }
  EXPECT_EQ(ParseHttpReply(testing::HttpGet(server_->address(), "/v1/completions")).status, 405);
  // Transport refusals: a body over the limit (refused from its Content-Length, unread), a
  // malformed request line.
  const std::string address = server_->address();
  testing::HttpReply big = ParseHttpReply(HttpExchange(
      address, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n{"));
  EXPECT_EQ(big.status, 413) << big.body;
  EXPECT_EQ(ParseHttpReply(HttpExchange(address, "NOT HTTP AT ALL\r\n\r\n")).status, 400);
  // Still serving.
  EXPECT_EQ(PostJson("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 1}})["choices"].size(),
            1u);
}

TEST_F(OpenAiApiTest, FullQueueIs429AndTheQueuedRequestStillCompletes) {
  // A scheduler of its own (own model: one engine per scheduler) that is not started yet, so the
  // first request stays queued; with max_waiting = 1 the second is refused.
  LocalModelOptions options;
  options.model_dir = kModel;
  auto model = LocalModel::Create(options);
  ASSERT_TRUE(model.ok()) << model.status();
  SchedulerOptions s;
  s.max_waiting = 1;
  Scheduler scheduler((*model)->engine(), (*model)->tokenizer(), s);
  OpenAiApiDeps deps;
  deps.scheduler = &scheduler;
  deps.tokenizer = (*model)->tokenizer();
  deps.config = &(*model)->config();
  deps.model_name = "fixture";
  int rejected = 0;
  deps.on_rejected = [&] { ++rejected; };
  OpenAiApi api(deps);
  HttpRequest request;
  request.method = "POST";
  request.path = "/v1/completions";
  request.body = R"({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": true})";
  HttpResponse first = api.Handle(request);
  ASSERT_EQ(first.status, 200) << first.body;
  ASSERT_TRUE(first.stream);
  const HttpResponse second = api.Handle(request);
  EXPECT_EQ(second.status, 429) << second.body;
  EXPECT_EQ(json::parse(second.body)["error"]["type"], "rate_limit_error");
  EXPECT_EQ(rejected, 1);
  scheduler.Start();
  std::string streamed;
  first.stream([&](std::string_view chunk) {
    streamed += chunk;
    return true;
  });
  EXPECT_THAT(streamed, HasSubstr("\"finish_reason\":\"length\""));
  EXPECT_THAT(streamed, ::testing::EndsWith("data: [DONE]\n\n"));
}

TEST_F(OpenAiApiTest, WithTokensEveryEndpointButHealthNeedsOne) {
  const std::string path = ::testing::TempDir() + "/api_tokens";
  std::ofstream(path) << "0123456789abcdef0123\n";
  auto tokens = ApiTokens::Load(path);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  OpenAiApiDeps deps;
  deps.scheduler = scheduler_;
  deps.tokenizer = model_->tokenizer();
  deps.config = &model_->config();
  deps.model_name = "fixture";
  deps.api_tokens = &*tokens;
  OpenAiApi api(deps);
  // The header travels from the HTTP request to the handler.
  auto server =
      HttpServer::Start("127.0.0.1:0", {}, [&](const HttpRequest& r) { return api.Handle(r); });
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string body = R"({"prompt": "Hello"})";  // valid for both endpoints
  auto post = [&](const std::string& target, const std::string& authorization) {
    return ParseHttpReply(
        HttpExchange((*server)->address(),
                     "POST " + target + " HTTP/1.1\r\nHost: x\r\n" +
                         (authorization.empty() ? "" : "Authorization: " + authorization + "\r\n") +
                         "Content-Length: " + std::to_string(body.size()) +
                         "\r\nConnection: close\r\n\r\n" + body));
  };
  for (const std::string target : {"/v1/completions", "/tokenize"}) {
    const testing::HttpReply none = post(target, "");
    EXPECT_EQ(none.status, 401) << target << " " << none.body;
    EXPECT_EQ(json::parse(none.body)["error"]["type"], "authentication_error");
    EXPECT_THAT(none.body, HasSubstr("Authorization: Bearer"));
    EXPECT_EQ(post(target, "Bearer wrong-token-0123456789").status, 401) << target;
    EXPECT_EQ(post(target, "Bearer 0123456789abcdef0123").status, 200) << target;
  }
  EXPECT_EQ(ParseHttpReply(testing::HttpGet((*server)->address(), "/v1/models")).status, 401);
  EXPECT_EQ(ParseHttpReply(testing::HttpGet((*server)->address(), "/health")).status, 200);
}

TEST_F(OpenAiApiTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  const int fd = testing::ConnectTcp(server_->address());
  ASSERT_GE(fd, 0);
  const std::string body = R"({"prompt": "Hello", "max_tokens": 2, "temperature": 0})";
  const std::string request =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) +
      "\r\n\r\n" + body;
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(write(fd, request.data(), request.size()), static_cast<ssize_t>(request.size()));
    std::string got;
    char buf[4096];
    while (got.find("\"usage\"") == std::string::npos || got.back() != '}') {
      const ssize_t n = read(fd, buf, sizeof(buf));
      ASSERT_GT(n, 0) << "request " << i << " got " << got;
      got.append(buf, n);
    }
    EXPECT_EQ(ParseHttpReply(got).status, 200) << got;
  }
  close(fd);
}

TEST_F(OpenAiApiTest, IdleConnectionsDoNotBlockRequests) {
  // Many more idle connections than handler threads (4): a request is still served at once.
  std::vector<int> idle;
  for (int i = 0; i < 500; ++i) {
    const int fd = testing::ConnectTcp(server_->address());
    ASSERT_GE(fd, 0);
    idle.push_back(fd);
  }
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(PostJson("/v1/completions", {{"prompt", "ok"}, {"max_tokens", 1}})["choices"].size(),
            1u);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  for (int fd : idle) close(fd);
}

// --- HTTPS: the same API behind TLS with the test CA's certificate. ---

// One HTTPS exchange: connects, verifies the server's certificate against `ca_file` for
// 127.0.0.1, sends `request` and reads until the server closes. "" when TLS fails.
std::string HttpsExchange(const std::string& address, const std::string& ca_file,
                          const std::string& request) {
  namespace net = boost::asio;
  namespace ssl = net::ssl;
  net::io_context io;
  ssl::context context(ssl::context::tls_client);
  context.load_verify_file(ca_file);
  context.set_verify_mode(ssl::verify_peer);
  ssl::stream<net::ip::tcp::socket> stream(io, context);
  stream.set_verify_callback(ssl::host_name_verification("127.0.0.1"));
  const size_t colon = address.rfind(':');
  boost::system::error_code ec;
  stream.next_layer().connect({net::ip::make_address(address.substr(0, colon)),
                               static_cast<uint16_t>(std::stoi(address.substr(colon + 1)))},
                              ec);
  if (ec) return "";
  stream.handshake(ssl::stream_base::client, ec);
  if (ec) return "";
  net::write(stream, net::buffer(request), ec);
  if (ec) return "";
  std::string out;
  char buf[4096];
  for (;;) {
    const size_t n = stream.read_some(net::buffer(buf), ec);
    out.append(buf, n);
    if (ec) break;  // EOF / stream truncated when the server closes
  }
  return out;
}

TEST_F(OpenAiApiTest, ServesHttpsWithTheCertificateAndRefusesPlaintextThere) {
  HttpServerOptions http;
  http.handler_threads = 2;
  http.tls_cert_file = "tests/testdata/tls/coordinator.pem";
  http.tls_key_file = "tests/testdata/tls/coordinator.key";
  auto server =
      HttpServer::Start("127.0.0.1:0", http, [](const HttpRequest& r) { return api_->Handle(r); });
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string address = (*server)->address();
  const std::string body = R"({"prompt": [1, 5, 9], "max_tokens": 3, "temperature": 0})";
  const std::string request =
      absl::StrCat("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
                   "Connection: close\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
  const testing::HttpReply tls =
      ParseHttpReply(HttpsExchange(address, "tests/testdata/tls/ca.pem", request));
  ASSERT_EQ(tls.status, 200) << tls.body;
  // The same completion as over plain HTTP.
  const testing::HttpReply plain = Post("/v1/completions", body);
  ASSERT_EQ(plain.status, 200);
  EXPECT_EQ(json::parse(tls.body)["choices"][0]["text"],
            json::parse(plain.body)["choices"][0]["text"]);
  // Streaming works through TLS too (chunks written by the handler thread).
  const std::string stream_body =
      R"({"prompt": [1, 5, 9], "max_tokens": 3, "temperature": 0, "stream": true})";
  const testing::HttpReply streamed = ParseHttpReply(HttpsExchange(
      address, "tests/testdata/tls/ca.pem",
      absl::StrCat("POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
                   "Content-Length: ", stream_body.size(), "\r\n\r\n", stream_body)));
  EXPECT_EQ(streamed.status, 200);
  EXPECT_THAT(streamed.body, HasSubstr("data: [DONE]"));
  // A client that trusts another CA does not get in; plaintext gets no HTTP answer.
  EXPECT_EQ(HttpsExchange(address, "tests/testdata/tls/other_ca.pem", request), "");
  EXPECT_EQ(ParseHttpReply(HttpExchange(address, request)).status, 0);
  // Bad files are refused naming the flag.
  http.tls_key_file = "tests/testdata/tls/missing.key";
  auto bad =
      HttpServer::Start("127.0.0.1:0", http, [](const HttpRequest&) { return HttpResponse{}; });
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("--tls-key tests/testdata/tls/missing.key"));
}

}  // namespace
}  // namespace moe
