// The cluster as users run it: real moe-expert-worker and moe-coordinator processes on loopback
// (free ports, READY lines instead of sleeps), queried through the public gRPC API.
#include <signal.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <regex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/checkpoint.h"
#include "common/fingerprint.h"
#include "common/model_config.h"
#include "common/rpc/rpc_util.h"
#include "common/rpc/tls.h"
#include "common/status_macros.h"
#include "coordinator/generator.h"
#include "coordinator/local_model.h"
#include "coordinator/transport/grpc_transport.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moecluster/v1/expert.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/integration/cluster_harness.h"
#include "tests/testutil/checkpoint_writer.h"
#include "tests/testutil/golden_fixture.h"
#include "tests/testutil/http.h"

namespace moe {
namespace {

namespace pb = moecluster::v1;
using testing::Cluster;
using testing::ContiguousRanges;
using ::testing::HasSubstr;

constexpr char kModels[] = "tests/testdata/models/";

std::string ModelDir(const std::string& name) { return std::string(kModels) + name; }

// The fixture's reference outputs; fails the calling test when they cannot be read.
testing::GoldenExpected Expected(const std::string& dir) {
  auto e = testing::LoadExpected(dir);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : testing::GoldenExpected{};
}

// The same generation in this process with 2 in-process expert slices (the placement of the
// 2-worker clusters below: bit-identical logits), with logprobs; fails the test on error.
GenerationOutput InProcessWithLogprobs(const std::string& dir, const std::vector<int32_t>& prompt,
                                       int64_t max_tokens, int32_t logprobs,
                                       int32_t prompt_logprobs) {
  LocalModelOptions options;
  options.model_dir = dir;
  options.in_process_workers = 2;
  auto local = LocalModel::Create(options);
  EXPECT_TRUE(local.ok()) << local.status();
  if (!local.ok()) return {};
  GenerationRequest r;
  r.prompt = prompt;
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  r.params.logprobs = logprobs;
  r.params.prompt_logprobs = prompt_logprobs;
  auto out = Generate((*local)->engine(), (*local)->tokenizer(), {&r, 1}, nullptr);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? std::move((*out)[0]) : GenerationOutput{};
}

pb::GenerateRequest IdsRequest(const std::vector<int32_t>& prompt, int max_tokens) {
  pb::GenerateRequest r;
  r.mutable_prompt_ids()->mutable_ids()->Assign(prompt.begin(), prompt.end());
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  return r;
}

// --- Every fixture, 1-3 workers (uneven splits included): transformers' greedy tokens. ---

struct GoldenCase {
  std::string fixture;
  int64_t workers;
};

class ClusterGoldenTest : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(ClusterGoldenTest, GreedyTokensEqualTransformersAndInProcess) {
  const std::string dir = ModelDir(GetParam().fixture);
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok());
  auto cluster =
      Cluster::Start(dir, ContiguousRanges(config->num_local_experts, GetParam().workers));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const testing::GoldenExpected expected = Expected(dir);
  auto result = (*cluster)->client().Generate(IdsRequest(expected.prompt, 16));
  ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();
  EXPECT_EQ(result->tokens, expected.greedy);
  EXPECT_EQ(result->final.finish_reason(), pb::FINISH_REASON_LENGTH);
  EXPECT_EQ(result->final.usage().prompt_tokens(), expected.prompt.size());
  EXPECT_EQ(result->final.usage().completion_tokens(), 16u);

  // The same text the single-process engine produces.
  LocalModelOptions options;
  options.model_dir = dir;
  auto local = LocalModel::Create(options);
  ASSERT_TRUE(local.ok());
  GenerationRequest r;
  r.prompt = expected.prompt;
  r.params.max_tokens = 16;
  r.params.ignore_eos = true;
  auto solo = Generate((*local)->engine(), (*local)->tokenizer(), {&r, 1}, nullptr);
  ASSERT_TRUE(solo.ok());
  EXPECT_EQ(result->text, (*solo)[0].text);
  EXPECT_EQ(result->final.text(), (*solo)[0].text);
}

std::vector<GoldenCase> GoldenCases() {
  std::vector<GoldenCase> cases;
  for (const char* f : {"mixtral_32e_gqa_fp16", "mixtral_16e_mha_hd100", "mixtral_3e_sliding_bf16",
                        "mixtral_4e_tied_fused_sharded", "mixtral_8e_top3_no_rope_theta"}) {
    for (int64_t w = 1; w <= 3; ++w) cases.push_back({f, w});
  }
  cases.push_back({"llama_dense", 1});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ClusterGoldenTest, ::testing::ValuesIn(GoldenCases()),
                         [](const ::testing::TestParamInfo<GoldenCase>& info) {
                           return info.param.fixture + "_" + std::to_string(info.param.workers) +
                                  "w";
                         });

// --- GGUF models through the real binaries: coordinator (tokenizer from the GGUF metadata)
// and 2 workers each mapping its experts' slices; text prompts and greedy tokens. ---

TEST(ClusterGgufTest, TextPromptThroughCoordinatorAndWorkersEqualsTransformers) {
  for (const char* name : {"mixtral_32e_gqa_fp16/mixtral_32e_gqa_fp16-q8_0",
                           "mixtral_8e_top3_no_rope_theta/mixtral_8e_top3_no_rope_theta-q4_0"}) {
    SCOPED_TRACE(name);
    const std::string gguf = std::string("tests/testdata/gguf/") + name + ".gguf";
    auto checkpoint = Checkpoint::Open(gguf);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    auto expected = testing::LoadGgufExpected(gguf, (*checkpoint)->config().vocab_size);
    ASSERT_TRUE(expected.ok()) << expected.status();
    auto cluster =
        Cluster::Start(gguf, ContiguousRanges((*checkpoint)->config().num_local_experts, 2));
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    // The fixtures' prompt text; its ids are the transformers prompt ids (BOS first).
    pb::GenerateRequest request;
    request.set_prompt("A Fox one day spied a bunch of ripe grapes hanging from a vine.");
    request.set_max_tokens(16);
    request.set_ignore_eos(true);
    auto result = (*cluster)->client().Generate(request);
    ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();
    EXPECT_EQ(result->final.usage().prompt_tokens(), expected->prompt.size());
    EXPECT_EQ(result->tokens, expected->greedy);
  }
}

// --- Logprobs through the cluster: per token (streamed) and the prompt's, as in-process. ---

TEST(ClusterLogprobsTest, StreamedAndPromptLogprobsEqualInProcess) {
  const std::string dir = "tests/testdata/models/mixtral_32e_gqa_fp16";
  const testing::GoldenExpected expected = Expected(dir);
  auto cluster = Cluster::Start(dir, ContiguousRanges(32, 2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  pb::GenerateRequest request = IdsRequest(expected.prompt, 5);
  request.set_logprobs(2);
  request.set_prompt_logprobs(3);
  std::vector<pb::TokenLogprob> streamed;
  auto result = (*cluster)->client().Generate(request, [&](const pb::TokenDelta& d) {
    EXPECT_EQ(d.logprobs_size(), d.token_ids_size());
    streamed.insert(streamed.end(), d.logprobs().begin(), d.logprobs().end());
  });
  ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();

  const GenerationOutput o = InProcessWithLogprobs(dir, expected.prompt, 5, 2, 3);
  ASSERT_EQ(o.prompt_logprobs.size(), expected.prompt.size() - 1);
  ASSERT_EQ(streamed.size(), o.logprobs.size());
  for (size_t i = 0; i < streamed.size(); ++i) {
    EXPECT_EQ(streamed[i].token_id(), o.tokens[i]);
    EXPECT_EQ(streamed[i].logprob(), o.logprobs[i].logprob) << i;
    ASSERT_EQ(streamed[i].top_size(), 2);
    EXPECT_EQ(streamed[i].top(1).token_id(), o.logprobs[i].top[1].token);
  }
  ASSERT_EQ(result->final.prompt_logprobs_size(), static_cast<int>(expected.prompt.size()) - 1);
  for (size_t i = 0; i + 1 < expected.prompt.size(); ++i) {
    const pb::TokenLogprob& p = result->final.prompt_logprobs(static_cast<int>(i));
    EXPECT_EQ(p.token_id(), expected.prompt[i + 1]);
    EXPECT_EQ(p.logprob(), o.prompt_logprobs[i].logprob) << i;
    EXPECT_EQ(p.top_size(), 3);
  }
}

// --- Logits over gRPC equal the in-process transport's bit for bit (same placement). ---

// `model`: a fixture directory or a GGUF file; `expected`: its golden prompt and tokens.
// The logits of `expected`'s prompt (every position) and then of each of its greedy tokens fed
// back, from worker processes (contiguous slices, the gRPC transport with `wire`) and from the
// in-process engine with the same placement: {remote, local}, each [positions, vocab].
std::pair<std::vector<float>, std::vector<float>> RemoteAndLocalLogits(
    const std::string& model, const testing::GoldenExpected& expected, int64_t workers,
    WireDType wire) {
  auto checkpoint = Checkpoint::Open(model);
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  if (!checkpoint.ok()) return {};
  std::vector<testing::WorkerProcess> procs;
  std::vector<std::string> addresses;
  for (const std::string& range :
       ContiguousRanges((*checkpoint)->config().num_local_experts, workers)) {
    auto w = testing::StartWorker(model, range);
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return {};
    addresses.push_back(w->address);
    procs.push_back(std::move(*w));
  }
  LocalModelOptions remote_options;
  remote_options.model_dir = model;
  remote_options.load_tokenizer = false;
  remote_options.transport_factory =
      [&](const Checkpoint& checkpoint) -> absl::StatusOr<std::unique_ptr<ExpertTransport>> {
    GrpcTransportOptions t;
    t.worker_addresses = addresses;
    t.model_fingerprint = checkpoint.fingerprint();
    t.wire = wire;
    auto transport = GrpcTransport::Create(checkpoint.config(), t);
    if (!transport.ok()) return transport.status();
    return std::unique_ptr<ExpertTransport>(std::move(*transport));
  };
  auto remote = LocalModel::Create(remote_options);
  EXPECT_TRUE(remote.ok()) << remote.status();
  LocalModelOptions local_options;
  local_options.model_dir = model;
  local_options.in_process_workers = workers;
  local_options.load_tokenizer = false;
  auto local = LocalModel::Create(local_options);
  EXPECT_TRUE(local.ok()) << local.status();
  if (!remote.ok() || !local.ok()) return {};

  std::vector<float> all_a, all_b, a, b;
  SequenceState sa, sb;
  StepInput ia{&sa, expected.prompt, true}, ib{&sb, expected.prompt, true};
  EXPECT_TRUE((*remote)->engine()->Step({&ia, 1}, &all_a).ok());
  EXPECT_TRUE((*local)->engine()->Step({&ib, 1}, &all_b).ok());
  for (int32_t token : expected.greedy) {  // decode steps too
    ia = {&sa, {&token, 1}, false};
    ib = {&sb, {&token, 1}, false};
    EXPECT_TRUE((*remote)->engine()->Step({&ia, 1}, &a).ok());
    EXPECT_TRUE((*local)->engine()->Step({&ib, 1}, &b).ok());
    all_a.insert(all_a.end(), a.begin(), a.end());
    all_b.insert(all_b.end(), b.begin(), b.end());
  }
  return {std::move(all_a), std::move(all_b)};
}

void ExpectLogitsBitIdentical(const std::string& model, const testing::GoldenExpected& expected,
                              int64_t workers) {
  const auto [remote, local] = RemoteAndLocalLogits(model, expected, workers, WireDType::kF32);
  ASSERT_FALSE(local.empty()) << model;
  ASSERT_EQ(remote.size(), local.size());
  EXPECT_EQ(0, std::memcmp(remote.data(), local.data(), remote.size() * sizeof(float))) << model;
}

// --- The OpenAI HTTP API through workers: the in-process numbers, moe-cli chat, a dead worker. ---

TEST(ClusterHttpTest, EchoLogprobsEqualInProcessChatWorksAndAWorkerDownIs503) {
  const std::string dir = "tests/testdata/models/mixtral_32e_gqa_fp16";
  const std::string chatml = "tests/testdata/chat_templates/chatml.jinja";
  const testing::GoldenExpected expected = Expected(dir);
  auto cluster = Cluster::Start(
      dir, ContiguousRanges(32, 2),
      {"--http-listen", "127.0.0.1:0", "--chat-template", chatml, "--step-timeout", "3s"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  const std::string http = c.http_address();
  ASSERT_FALSE(http.empty()) << c.Logs();

  const nlohmann::json body = {{"prompt", expected.prompt},
                               {"max_tokens", 3},
                               {"temperature", 0},
                               {"echo", true},
                               {"logprobs", 2},
                               {"ignore_eos", true}};
  const testing::HttpReply reply =
      testing::ParseHttpReply(testing::HttpPost(http, "/v1/completions", body.dump()));
  ASSERT_EQ(reply.status, 200) << reply.body << c.Logs();
  const nlohmann::json lp = nlohmann::json::parse(reply.body)["choices"][0]["logprobs"];

  const GenerationOutput o = InProcessWithLogprobs(dir, expected.prompt, 3, 2, 2);
  ASSERT_EQ(o.prompt_logprobs.size(), expected.prompt.size() - 1);
  ASSERT_EQ(o.logprobs.size(), 3u);
  const size_t n = expected.prompt.size();
  ASSERT_EQ(lp["token_logprobs"].size(), n + 3);
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  for (size_t i = 1; i < n; ++i) {
    EXPECT_EQ(lp["token_logprobs"][i].get<float>(), o.prompt_logprobs[i - 1].logprob) << i;
  }
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(lp["token_logprobs"][n + i].get<float>(), o.logprobs[i].logprob) << i;
  }

  // moe-cli chat through the coordinator's chat API.
  const std::string cmd = absl::StrCat(MOE_CLI_PATH, " chat --server ", http,
                                       " --message 'hello there' --max-tokens 4 --ignore-eos 2>&1");
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string cli;
  char buf[4096];
  for (size_t k; (k = fread(buf, 1, sizeof(buf), pipe)) > 0;) cli.append(buf, k);
  EXPECT_EQ(pclose(pipe), 0) << cli;
  EXPECT_THAT(cli, HasSubstr("4 generated, finish: length")) << cli;

  // A worker dies: the next completion gets 503 naming it, then /health says so too; the
  // server stays up.
  c.workers()[1].process->Stop(SIGKILL);
  const testing::HttpReply down = testing::ParseHttpReply(
      testing::HttpPost(http, "/v1/completions", R"({"prompt": [1, 2, 3], "max_tokens": 2})"));
  EXPECT_EQ(down.status, 503) << down.body;
  EXPECT_THAT(down.body, HasSubstr(c.workers()[1].address)) << down.body;
  testing::HttpReply health;
  for (int i = 0; i < 100; ++i) {
    health = testing::ParseHttpReply(testing::HttpGet(http, "/health"));
    if (health.status == 503) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(health.status, 503) << health.body;
  EXPECT_EQ(testing::ParseHttpReply(testing::HttpGet(http, "/v1/models")).status, 200);
}

// --- API tokens and hostile prompt text (issue 11's first findings). ---

TEST(ClusterAuthTest, TokensGuardBothApisAndHostileTextIsRefusedBeforeTokenizing) {
  const std::string dir = ModelDir("demo_mixtral");
  const std::string tokens = testing::TempDir("cluster_auth") + "/tokens";
  std::ofstream(tokens) << "# the demo's token\n0123456789abcdef0123\n";
  auto cluster = Cluster::Start(dir, ContiguousRanges(8, 2),
                                {"--api-token-file", tokens, "--http-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  // Health is open; the API is not.
  ASSERT_TRUE(c.client().WaitForHealth(true, absl::Seconds(10)).ok());
  auto refused = c.client().Generate(IdsRequest({1, 450, 29}, 4));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnauthenticated) << refused.status();
  EXPECT_THAT(refused.status().message(), HasSubstr("authorization: Bearer"));
  EXPECT_EQ(c.client().GetClusterStatus().status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(InferenceClient(c.address(), "wrong-token-0123456789").GetModelInfo().status().code(),
            absl::StatusCode::kUnauthenticated);
  InferenceClient client(c.address(), "0123456789abcdef0123");
  auto ok = client.Generate(IdsRequest({1, 450, 29}, 4));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->tokens.size(), 4u);
  EXPECT_TRUE(client.GetClusterStatus().ok());
  // moe-cli with the token file (gRPC and HTTP).
  for (const std::string& args :
       {absl::StrCat("generate --server ", c.address(), " --prompt Hello --max-tokens 3"),
        absl::StrCat("status --server ", c.address())}) {
    const std::string with =
        absl::StrCat(MOE_CLI_PATH, " ", args, " --api-token-file ", tokens, " >/dev/null 2>&1");
    const std::string without = absl::StrCat(MOE_CLI_PATH, " ", args, " >/dev/null 2>&1");
    EXPECT_EQ(std::system(with.c_str()), 0) << args;
    EXPECT_NE(std::system(without.c_str()), 0) << args;
  }
  const std::string http = c.http_address();
  EXPECT_EQ(testing::ParseHttpReply(testing::HttpGet(http, "/v1/models")).status, 401);
  EXPECT_EQ(testing::ParseHttpReply(testing::HttpGet(http, "/health")).status, 200);

  // Prompt text is checked before the tokenizer sees it: invalid UTF-8 names its byte, and 60 MB
  // of text is refused at once without the coordinator's memory growing.
  pb::GenerateRequest bad_utf8;
  bad_utf8.set_prompt(std::string("ok \xff\xfe"));
  bad_utf8.set_max_tokens(2);
  auto utf8 = client.Generate(bad_utf8);
  EXPECT_EQ(utf8.status().code(), absl::StatusCode::kInvalidArgument) << utf8.status();
  EXPECT_THAT(utf8.status().message(), HasSubstr("prompt is not valid UTF-8 (byte 3)"));
  const uint64_t rss_before = c.coordinator().RssBytes();
  pb::GenerateRequest huge;
  huge.set_prompt(std::string(60 << 20, 'a'));
  huge.set_max_tokens(2);
  auto too_long = client.Generate(huge);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument) << too_long.status();
  EXPECT_THAT(too_long.status().message(), HasSubstr("cannot fit the model's context"));
  // The message itself is held while it is checked (60 MB, plus gRPC's copy), never tokenized
  // (~240 bytes per byte: gigabytes).
  EXPECT_LT(c.coordinator().RssBytes(), rss_before + (uint64_t{400} << 20));
}

TEST(ClusterLogitsTest, GrpcEqualsInProcessBitForBit) {
  for (const auto& [fixture, workers] :
       std::vector<std::pair<std::string, int64_t>>{{"mixtral_32e_gqa_fp16", 3},
                                                    {"mixtral_3e_sliding_bf16", 2},
                                                    {"mixtral_8e_top3_no_rope_theta", 2}}) {
    ExpectLogitsBitIdentical(ModelDir(fixture), Expected(ModelDir(fixture)), workers);
  }
}

// Every GGUF fixture through 2 worker processes (1 for a dense model) that map only their experts'
// slices of the stacked tensors: bit-identical to the in-process engine on the same file.
TEST(ClusterLogitsTest, GgufThroughTwoWorkersEqualsInProcessBitForBit) {
  int files = 0;
  for (const std::string& gguf : testing::GgufFixtureFiles()) {
    auto checkpoint = Checkpoint::Open(gguf);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    auto expected = testing::LoadGgufExpected(gguf, (*checkpoint)->config().vocab_size);
    ASSERT_TRUE(expected.ok()) << expected.status();
    // Dense models have one expert: one worker.
    const int64_t workers = std::min<int64_t>(2, (*checkpoint)->config().num_local_experts);
    ExpectLogitsBitIdentical(gguf, *expected, workers);
    ++files;
  }
  EXPECT_EQ(files, 25);  // every fixture file (GgufGoldenCasesTest lists them by directory)
  // Workers and coordinator opening a split set (3 files) by its directory.
  auto expected = testing::LoadGgufExpected(
      "tests/testdata/gguf/mixtral_8e_top3_no_rope_theta/mixtral_8e_top3_no_rope_theta-q8_0.gguf",
      1000);
  ASSERT_TRUE(expected.ok()) << expected.status();
  ExpectLogitsBitIdentical("tests/testdata/gguf/split", *expected, 2);
}

// --wire-dtype bf16: hidden rows and partial sums rounded to bf16 on the wire. Every position's
// greedy token equals the f32 engine's wherever its top logit leads by more than 0.05 (and at
// least 3 positions in 4 of each fixture), and the logits move by at most 2 % of their range;
// the error is printed per fixture.
TEST(ClusterWireTest, Bf16WireKeepsGreedyTokensAndReportsTheLogitError) {
  for (const char* fixture :
       {"mixtral_32e_gqa_fp16", "mixtral_16e_mha_hd100", "mixtral_3e_sliding_bf16",
        "mixtral_4e_tied_fused_sharded", "mixtral_8e_top3_no_rope_theta"}) {
    SCOPED_TRACE(fixture);
    const std::string dir = ModelDir(fixture);
    const testing::GoldenExpected expected = Expected(dir);
    const auto [remote, local] = RemoteAndLocalLogits(dir, expected, 2, WireDType::kBF16);
    ASSERT_FALSE(local.empty());
    ASSERT_EQ(remote.size(), local.size());
    const size_t positions = expected.prompt.size() + expected.greedy.size();
    const size_t vocab = local.size() / positions;
    float worst = 0, range = 0;
    size_t compared = 0, differing_bits = 0;
    for (size_t p = 0; p < positions; ++p) {
      const float* l = &local[p * vocab];
      const float* r = &remote[p * vocab];
      std::vector<float> sorted(l, l + vocab);
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
      range = std::max(range, sorted[0] - *std::min_element(l, l + vocab));
      for (size_t i = 0; i < vocab; ++i) {
        worst = std::max(worst, std::fabs(l[i] - r[i]));
        differing_bits += l[i] != r[i];
      }
      if (sorted[0] - sorted[1] <= 0.05f) continue;
      EXPECT_EQ(std::max_element(r, r + vocab) - r, std::max_element(l, l + vocab) - l)
          << "position " << p;
      ++compared;
    }
    std::printf(
        "%s: bf16 wire, 2 workers: max |logit - f32 logit| %.4g (logit range %.3g), %zu of "
        "%zu positions compared\n",
        fixture, worst, range, compared, positions);
    EXPECT_GE(4 * compared, 3 * positions);
    EXPECT_LE(worst, 0.02f * range);
    EXPECT_GT(differing_bits, 0u);  // the wire did round: this is not the f32 path
  }
}

// --experts-per-token on the coordinator: workers compute whatever pairs arrive, so the cluster
// gives transformers' greedy tokens for that top-k and says so in GetModelInfo.
TEST(ClusterExpertsPerTokenTest, CoordinatorOverrideReachesTransformersTopOneTokens) {
  const std::string dir = ModelDir("mixtral_8e_top3_no_rope_theta");
  auto expected =
      testing::LoadExpected(dir + "/top1.expected.json", dir + "/top1.expected.safetensors", 1000);
  ASSERT_TRUE(expected.ok()) << expected.status();
  auto cluster = Cluster::Start(dir, {"0-3", "4-7"}, {"--experts-per-token", "1"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto info = (*cluster)->client().GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->experts_per_token(), 1);
  EXPECT_EQ(info->model_experts_per_token(), 3);
  auto result = (*cluster)->client().Generate(
      IdsRequest(expected->prompt, static_cast<int>(expected->greedy.size())));
  ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();
  EXPECT_EQ(result->tokens, expected->greedy);
  EXPECT_THAT((*cluster)->Logs(), HasSubstr("routing each token to 1 of its 8 experts"));
}

// Per request (GenerateRequest.experts_per_token) on a coordinator routing to the model's 3:
// top-2 tokens for the request that asks, traced routes of 2 experts per layer, the model's
// tokens for one that does not, and more than the server's refused naming the bound.
TEST(ClusterExpertsPerTokenTest, PerRequestOverrideThroughWorkers) {
  const std::string dir = ModelDir("mixtral_8e_top3_no_rope_theta");
  auto top2 =
      testing::LoadExpected(dir + "/top2.expected.json", dir + "/top2.expected.safetensors", 1000);
  ASSERT_TRUE(top2.ok()) << top2.status();
  auto cluster = Cluster::Start(dir, {"0-4", "3-7"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  pb::GenerateRequest asks = IdsRequest(top2->prompt, static_cast<int>(top2->greedy.size()));
  asks.set_experts_per_token(2);
  asks.set_trace_routing(true);
  int traced = 0;
  auto result = (*cluster)->client().Generate(asks, [&](const pb::TokenDelta& d) {
    for (const pb::TokenRoute& route : d.routing()) {
      for (const pb::LayerRoute& layer : route.layers()) {
        EXPECT_EQ(layer.experts_size(), 2);
        EXPECT_NEAR(layer.weights(0) + layer.weights(1), 1.0f, 1e-5f);
      }
      ++traced;
    }
  });
  ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();
  EXPECT_EQ(result->tokens, top2->greedy);
  EXPECT_GT(traced, 0);
  const testing::GoldenExpected model = Expected(dir);
  auto plain = (*cluster)->client().Generate(IdsRequest(model.prompt, 16));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->tokens, model.greedy);
  asks.set_experts_per_token(4);
  auto bad = (*cluster)->client().Generate(asks);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("experts_per_token must be in [1, 3]"));
}

// --- Concurrency: 8 different requests at once get what each gets alone. ---

TEST(ClusterKvPressureTest, SixteenLongRequestsOnASmallCacheAllCompleteAsSolo) {
  // 24 blocks of 16 tokens (384 tokens) for 16 requests of ~124 tokens each (~2000): running
  // sequences are preempted and resumed, none fails, each gets its solo tokens.
  const std::string dir = ModelDir("demo_mixtral");
  auto cluster = Cluster::Start(dir, ContiguousRanges(8, 2),
                                {"--kv-cache-blocks", "24", "--metrics-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  std::vector<pb::GenerateRequest> requests;
  for (int i = 0; i < 16; ++i) {
    pb::GenerateRequest r = IdsRequest({1, 450 + i, 29}, 120);
    if (i % 3 == 1) {
      r.set_temperature(0.8f);
      r.set_seed(7 + i);
    }
    requests.push_back(r);
  }
  std::vector<ClientResult> solo;
  for (const pb::GenerateRequest& r : requests) {
    auto result = (*cluster)->client().Generate(r);
    ASSERT_TRUE(result.ok()) << result.status();
    solo.push_back(*result);
  }
  std::vector<absl::StatusOr<ClientResult>> together(16, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < 16; ++i) {
    threads.emplace_back([&, i] { together[i] = (*cluster)->client().Generate(requests[i]); });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(together[i].ok()) << i << ": " << together[i].status();
    EXPECT_EQ(together[i]->tokens, solo[i].tokens) << i;
  }
  const auto metrics = testing::ParseMetricsText(
      testing::HttpGet((*cluster)->coordinator().Announced("METRICS"), "/metrics"));
  ASSERT_TRUE(metrics.count("moe_preemptions_total")) << (*cluster)->Logs();
  EXPECT_GT(metrics.at("moe_preemptions_total"), 0);
}

TEST(ClusterConcurrencyTest, EightConcurrentRequestsEqualSolo) {
  const std::string dir = ModelDir("demo_mixtral");
  auto cluster = Cluster::Start(dir, ContiguousRanges(8, 2), {"--max-running", "4"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const char* prompts[] = {"We hold these truths",
                           "Four score",
                           "And God said",
                           "The Fox",
                           "Congress shall make no law",
                           "In the beginning",
                           "When in the Course of human events",
                           "A"};
  std::vector<pb::GenerateRequest> requests;
  for (int i = 0; i < 8; ++i) {
    pb::GenerateRequest r;
    r.set_prompt(prompts[i]);
    r.set_max_tokens(6 + 3 * i);
    r.set_ignore_eos(true);
    if (i % 2 == 1) {
      r.set_temperature(0.7f + 0.1f * i);
      r.set_top_p(0.9f);
      r.set_top_k(20 + i);
      r.set_seed(100 + i);
    }
    if (i == 4) r.set_repetition_penalty(1.3f);
    requests.push_back(r);
  }
  // Request 6 stops at a string taken from the middle of its own unstopped output.
  auto unstopped = (*cluster)->client().Generate(requests[6]);
  ASSERT_TRUE(unstopped.ok());
  ASSERT_GT(unstopped->text.size(), 12u);
  requests[6].add_stop(unstopped->text.substr(unstopped->text.size() / 2, 4));
  std::vector<ClientResult> solo;
  for (const pb::GenerateRequest& r : requests) {
    auto result = (*cluster)->client().Generate(r);
    ASSERT_TRUE(result.ok()) << result.status();
    solo.push_back(*result);
  }
  std::vector<absl::StatusOr<ClientResult>> together(8, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] { together[i] = (*cluster)->client().Generate(requests[i]); });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(together[i].ok()) << together[i].status();
    EXPECT_EQ(together[i]->tokens, solo[i].tokens) << "request " << i;
    EXPECT_EQ(together[i]->text, solo[i].text) << "request " << i;
  }
  EXPECT_EQ(solo[6].final.finish_reason(), pb::FINISH_REASON_STOP);
}

// --- Memory: a worker maps only its experts; the coordinator maps no expert tensor. ---

TEST(ClusterMemoryTest, WorkersMapTheirSliceCoordinatorMapsNoExperts) {
  const std::string dir = testing::TempDir("memory");
  testing::TinyShape shape;
  shape.vocab = 1000;  // the committed tokenizer's
  shape.hidden = 256;
  shape.ffn = 1024;
  shape.heads = 4;
  shape.kv_heads = 2;
  shape.experts = 8;
  testing::WriteTinyModel(dir, shape);
  std::filesystem::copy_file("tests/testdata/tokenizer/tokenizer.model", dir + "/tokenizer.model");
  auto cluster = Cluster::Start(dir, {"0-3", "4-7"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string file = dir + "/model.safetensors";
  const uint64_t expert_bytes = shape.layers * shape.experts * 3 * shape.hidden * shape.ffn * 4;
  const uint64_t file_bytes = std::filesystem::file_size(file);
  for (testing::WorkerProcess& w : (*cluster)->workers()) {
    const uint64_t mapped = testing::MappedFileBytes(w.process->pid(), file);
    // Half the experts, plus at most a page of slack per tensor.
    EXPECT_GE(mapped, expert_bytes / 2);
    EXPECT_LE(mapped, expert_bytes / 2 + 2 * shape.layers * 4 * 3 * 4096);
  }
  const uint64_t coordinator = testing::MappedFileBytes((*cluster)->coordinator().pid(), file);
  EXPECT_GT(coordinator, 0u);
  EXPECT_LE(coordinator, file_bytes - expert_bytes + 64 * 4096);
  auto result = (*cluster)->client().Generate(IdsRequest({1, 5, 9}, 4));
  EXPECT_TRUE(result.ok()) << result.status();
}

// --- Failures: a worker dies mid-generation, then comes back. ---

TEST(ClusterFailureTest, WorkerDeathFailsRequestThenRecovers) {
  const std::string dir = ModelDir("demo_mixtral");
  const std::string address = "127.0.0.1:" + std::to_string(testing::PickFreePort());
  auto cluster = Cluster::Start(dir, {"0-3", "4-7"}, {"--step-timeout", "3s"}, {"", address});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  ASSERT_TRUE(c.client().WaitForHealth(true, absl::Seconds(10)).ok());

  // A long generation; kill worker 1 once tokens are flowing.
  absl::Notification streaming;
  const absl::Time start = absl::Now();
  std::thread killer([&] {
    streaming.WaitForNotification();
    c.workers()[1].process->Stop(SIGKILL);
  });
  pb::GenerateRequest r = IdsRequest({1, 450, 29}, 400);
  auto result = c.client().Generate(r, [&](const pb::TokenDelta&) {
    if (!streaming.HasBeenNotified()) streaming.Notify();
  });
  killer.join();
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
  EXPECT_THAT(result.status().message(), HasSubstr(address));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));  // bounded by the step deadline, no hang

  // The coordinator stays up and says it is not serving; new requests fail fast.
  EXPECT_TRUE(c.client().WaitForHealth(false, absl::Seconds(10)).ok());
  auto status = c.client().GetClusterStatus();
  ASSERT_TRUE(status.ok());
  EXPECT_FALSE(status->serving());
  EXPECT_EQ(status->workers(1).state(), pb::WORKER_STATE_UNAVAILABLE);
  auto rejected = c.client().Generate(IdsRequest({1, 450, 29}, 4));
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kUnavailable);

  // The worker comes back at the same address: the coordinator reconnects and serves again.
  auto again = testing::StartWorker(dir, "4-7", address);
  ASSERT_TRUE(again.ok()) << again.status();
  c.workers()[1] = std::move(*again);
  ASSERT_TRUE(c.client().WaitForHealth(true, absl::Seconds(20)).ok()) << c.Logs();
  auto ok = c.client().Generate(IdsRequest({1, 450, 29}, 8));
  EXPECT_TRUE(ok.ok()) << ok.status();
}

// --- Failover: every expert on 2 workers (segments [0, 4) and [4, 8), as the 2-slice
// in-process engine); workers die, hang and restart under load and no request notices. ---

const std::vector<std::string> kReplicated = {"0-3", "4-7", "0-3", "4-7"};

// The replicated cluster (workers at `listens` when given), with metrics, once it serves.
absl::StatusOr<std::unique_ptr<Cluster>> StartReplicated(const std::string& dir,
                                                         const std::vector<std::string>& listens) {
  auto cluster = Cluster::Start(dir, kReplicated, {"--metrics-listen", "127.0.0.1:0"}, listens);
  if (cluster.ok())
    MOE_RETURN_IF_ERROR((*cluster)->client().WaitForHealth(true, absl::Seconds(10)));
  return cluster;
}

std::vector<std::string> FreeAddresses(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) {
    out.push_back("127.0.0.1:" + std::to_string(testing::PickFreePort()));
  }
  return out;
}

// 8 greedy requests and their tokens from the in-process engine.
struct FailoverLoad {
  std::vector<pb::GenerateRequest> requests;
  std::vector<std::vector<int32_t>> expected;

  FailoverLoad(const std::string& dir, int max_tokens) {
    for (int i = 0; i < 8; ++i) {
      const std::vector<int32_t> prompt = {1, 450 + 7 * i, 29, 100 + i};
      requests.push_back(IdsRequest(prompt, max_tokens));
      expected.push_back(InProcessWithLogprobs(dir, prompt, max_tokens, -1, -1).tokens);
    }
  }
};

struct Streamed {
  absl::StatusOr<ClientResult> result = absl::UnknownError("not run");
  std::vector<absl::Time> token_times;
};

// Runs `requests` concurrently; `fault` runs once, as soon as every stream has a token.
std::vector<Streamed> RunConcurrently(Cluster& c, const std::vector<pb::GenerateRequest>& requests,
                                      const std::function<void()>& fault) {
  std::vector<Streamed> out(requests.size());
  absl::Mutex mu;
  size_t streaming = 0;
  absl::Notification all_streaming;
  std::vector<std::thread> threads;
  for (size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] {
      out[i].result = c.client().Generate(requests[i], [&](const pb::TokenDelta&) {
        absl::MutexLock lock(&mu);
        out[i].token_times.push_back(absl::Now());
        if (out[i].token_times.size() == 1 && ++streaming == requests.size()) {
          all_streaming.Notify();
        }
      });
    });
  }
  if (all_streaming.WaitForNotificationWithTimeout(absl::Seconds(30))) fault();
  for (std::thread& t : threads) t.join();
  return out;
}

// The longest pause between two tokens of one stream.
absl::Duration LongestGap(const std::vector<Streamed>& streams) {
  absl::Duration gap;
  for (const Streamed& s : streams) {
    for (size_t i = 1; i < s.token_times.size(); ++i) {
      gap = std::max(gap, s.token_times[i] - s.token_times[i - 1]);
    }
  }
  return gap;
}

// Waits (polling the status API) until worker `index` is in `state`; the time it took.
absl::StatusOr<absl::Duration> WaitForWorkerState(Cluster& c, int index, pb::WorkerState state,
                                                  absl::Duration timeout) {
  const absl::Time start = absl::Now();
  while (absl::Now() - start < timeout) {
    auto status = c.client().GetClusterStatus();
    if (status.ok() && status->workers(index).state() == state) return absl::Now() - start;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::DeadlineExceededError(absl::StrCat("worker ", index, " never reached state ",
                                                  pb::WorkerState_Name(state), "\n", c.Logs()));
}

double WorkerRows(Cluster& c, const std::string& worker) {
  const auto metrics =
      testing::ParseMetricsText(testing::HttpGet(c.coordinator().Announced("METRICS"), "/metrics"));
  const auto it = metrics.find("moe_dispatch_rows_total{worker=\"" + worker + "\"}");
  return it == metrics.end() ? -1 : it->second;
}

// 4 clients sending load.requests (40 tokens each) in a loop until Stop(); counts what
// failed and what came back with other tokens than the in-process engine's.
class ContinuousLoad {
 public:
  ContinuousLoad(Cluster& c, const FailoverLoad& load) {
    for (int k = 0; k < 4; ++k) {
      clients_.emplace_back([&, k] {
        for (int i = k; !stop_; i = (i + 4) % 8) {
          pb::GenerateRequest r = load.requests[i];
          r.set_max_tokens(40);
          const absl::Time start = absl::Now();
          auto result = c.client().Generate(r);
          {
            absl::MutexLock lock(&mu_);
            latencies_.push_back(absl::ToDoubleSeconds(absl::Now() - start));
          }
          if (!result.ok()) {
            ++failed;
            ADD_FAILURE() << result.status();
            continue;
          }
          ++served;
          const std::vector<int32_t> want(load.expected[i].begin(), load.expected[i].begin() + 40);
          if (result->tokens != want) ++wrong;
        }
      });
    }
  }
  ~ContinuousLoad() { Stop(); }
  void Stop() {
    stop_ = true;
    for (std::thread& t : clients_) t.join();
    clients_.clear();
  }
  // The q-quantile of the request latencies so far, in seconds; then starts a new window.
  double TakeQuantile(double q) {
    absl::MutexLock lock(&mu_);
    std::vector<double> l;
    l.swap(latencies_);
    if (l.empty()) return 0;
    std::sort(l.begin(), l.end());
    return l[std::min(l.size() - 1, static_cast<size_t>(q * static_cast<double>(l.size())))];
  }
  // Prints what was served under `what` and expects nothing lost: no failure, no other tokens,
  // more than `at_least` served.
  void ExpectNoLoss(const std::string& what, int at_least = 8) {
    std::printf("%s: %d requests served, %d failed, %d with other tokens\n", what.c_str(),
                served.load(), failed.load(), wrong.load());
    EXPECT_GT(served, at_least) << what;
    EXPECT_EQ(failed, 0) << what;
    EXPECT_EQ(wrong, 0) << what;
  }
  std::atomic<int> served{0}, failed{0}, wrong{0};

 private:
  absl::Mutex mu_;
  std::vector<double> latencies_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::vector<std::thread> clients_;
};

// Restarts worker w at its address and waits until it is READY and takes rows again (within a
// second of READY); fails the test otherwise.
void RestartAndAwaitUse(Cluster& c, const std::string& dir, int w,
                        const std::vector<std::string>& listens) {
  auto again = testing::StartWorker(dir, kReplicated[w], listens[w]);
  ASSERT_TRUE(again.ok()) << again.status();
  c.workers()[w] = std::move(*again);
  auto ready = WaitForWorkerState(c, w, pb::WORKER_STATE_READY, absl::Seconds(10));
  ASSERT_TRUE(ready.ok()) << ready.status();
  const double before = WorkerRows(c, listens[w]);
  const absl::Time readmitted = absl::Now();
  while (WorkerRows(c, listens[w]) <= before && absl::Now() - readmitted < absl::Seconds(5)) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_LT(absl::Now() - readmitted, absl::Seconds(1)) << "worker " << w << " unused";
}

TEST(ClusterFailoverTest, KillMidGenerationAndRollingRestartLoseNoRequest) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 160);
  const std::vector<std::string> listens = FreeAddresses(4);
  auto cluster = StartReplicated(dir, listens);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;

  // kill -9 worker 0 while 8 streams are running.
  const std::vector<Streamed> killed =
      RunConcurrently(c, load.requests, [&] { c.workers()[0].process->Stop(SIGKILL); });
  for (size_t i = 0; i < killed.size(); ++i) {
    ASSERT_TRUE(killed[i].result.ok()) << i << ": " << killed[i].result.status() << c.Logs();
    EXPECT_EQ(killed[i].result->tokens, load.expected[i]) << i;
  }
  ASSERT_TRUE(WaitForWorkerState(c, 0, pb::WORKER_STATE_UNAVAILABLE, absl::Seconds(5)).ok());
  std::printf("kill -9 under load: longest pause between tokens %s\n",
              absl::FormatDuration(LongestGap(killed)).c_str());

  // Rolling restart under continuous load: each worker in turn is killed (worker 0 already
  // is), restarted at its address, and waited for until the coordinator uses it again.
  ContinuousLoad traffic(c, load);
  for (int w = 0; w < 4; ++w) {
    if (w != 0) c.workers()[w].process->Stop(SIGKILL);
    RestartAndAwaitUse(c, dir, w, listens);
  }
  traffic.Stop();
  traffic.ExpectNoLoss("rolling restart (kill -9)");
}

// --- Drain: SIGTERM on a worker moves its traffic to replicas before it exits; SIGTERM on the
// coordinator finishes what it accepted and exits 0. ---

TEST(ClusterDrainTest, RollingRestartWithSigtermLosesNoRequest) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 40);
  const std::vector<std::string> listens = FreeAddresses(4);
  auto cluster = StartReplicated(dir, listens);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  ContinuousLoad traffic(c, load);
  absl::Duration slowest;
  for (int w = 0; w < 4; ++w) {
    const absl::Time start = absl::Now();
    EXPECT_EQ(c.workers()[w].process->Stop(SIGTERM), 0) << "worker " << w << " exit code";
    slowest = std::max(slowest, absl::Now() - start);
    RestartAndAwaitUse(c, dir, w, listens);
  }
  traffic.Stop();
  traffic.ExpectNoLoss(absl::StrCat("rolling restart (SIGTERM, slowest worker exit ",
                                    absl::FormatDuration(slowest), ")"));
  EXPECT_LT(slowest, absl::Seconds(5));  // quiet after ~1 s, far below --drain-timeout
}

TEST(ClusterDrainTest, CoordinatorSigtermFinishesInFlightRequestsAndExitsZero) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 200);
  auto cluster = Cluster::Start(dir, ContiguousRanges(8, 2), {"--http-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  absl::Time signalled;
  const std::vector<Streamed> out = RunConcurrently(c, load.requests, [&] {
    signalled = absl::Now();
    ASSERT_EQ(kill(c.coordinator().pid(), SIGTERM), 0);
    // Not serving at once: health says so, new requests are refused over both APIs.
    ASSERT_TRUE(c.client().WaitForHealth(false, absl::Seconds(2)).ok());
    auto refused = c.client().Generate(IdsRequest({1, 450, 29}, 4));
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
    EXPECT_THAT(refused.status().message(), HasSubstr("shutting down"));
    const testing::HttpReply health =
        testing::ParseHttpReply(testing::HttpGet(c.http_address(), "/health"));
    EXPECT_EQ(health.status, 503);
  });
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_TRUE(out[i].result.ok()) << i << ": " << out[i].result.status() << c.Logs();
    EXPECT_EQ(out[i].result->tokens, load.expected[i]) << i;
  }
  EXPECT_EQ(c.coordinator().WaitForExit(absl::Seconds(20)), 0) << c.Logs();
  std::printf("coordinator SIGTERM under 8 streams: exited 0 after %s\n",
              absl::FormatDuration(absl::Now() - signalled).c_str());
}

TEST(ClusterFailoverTest, StoppedWorkerIsFailedOverWithinASecondAndRejoinsWhenContinued) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 200);
  auto cluster = StartReplicated(dir, {});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  const pid_t pid = c.workers()[1].process->pid();
  const std::vector<Streamed> stopped =
      RunConcurrently(c, load.requests, [&] { ASSERT_EQ(kill(pid, SIGSTOP), 0); });
  for (size_t i = 0; i < stopped.size(); ++i) {
    ASSERT_TRUE(stopped[i].result.ok()) << i << ": " << stopped[i].result.status() << c.Logs();
    EXPECT_EQ(stopped[i].result->tokens, load.expected[i]) << i;
  }
  // The stall the stopped worker caused is the failover time (normal steps take milliseconds).
  const absl::Duration failover = LongestGap(stopped);
  std::printf("SIGSTOP under load: failed over in %s\n", absl::FormatDuration(failover).c_str());
  EXPECT_LT(failover, absl::Milliseconds(1500));
  auto status = c.client().GetClusterStatus();
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(status->workers(1).state(), pb::WORKER_STATE_UNAVAILABLE);
  EXPECT_TRUE(status->serving());  // its replica serves its experts

  // Continued, it reconnects and takes rows again.
  const double before = WorkerRows(c, c.workers()[1].address);
  ASSERT_EQ(kill(pid, SIGCONT), 0);
  ASSERT_TRUE(WaitForWorkerState(c, 1, pb::WORKER_STATE_READY, absl::Seconds(10)).ok());
  for (int i = 0; i < 2; ++i) {
    auto r = c.client().Generate(IdsRequest({1, 450, 29}, 4));
    ASSERT_TRUE(r.ok()) << r.status();
  }
  EXPECT_GT(WorkerRows(c, c.workers()[1].address), before);
}

TEST(ClusterFailoverTest, DeadOrStoppedIdleReplicaIsNoticedWithinASecond) {
  auto cluster = Cluster::Start(ModelDir("demo_mixtral"), kReplicated);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  ASSERT_TRUE(c.client().WaitForHealth(true, absl::Seconds(10)).ok());
  c.workers()[2].process->Stop(SIGKILL);
  auto dead = WaitForWorkerState(c, 2, pb::WORKER_STATE_UNAVAILABLE, absl::Seconds(5));
  ASSERT_TRUE(dead.ok()) << dead.status();
  ASSERT_EQ(kill(c.workers()[3].process->pid(), SIGSTOP), 0);
  auto hung = WaitForWorkerState(c, 3, pb::WORKER_STATE_UNAVAILABLE, absl::Seconds(5));
  kill(c.workers()[3].process->pid(), SIGCONT);
  ASSERT_TRUE(hung.ok()) << hung.status();
  std::printf("idle replica noticed: killed after %s, stopped after %s\n",
              absl::FormatDuration(*dead).c_str(), absl::FormatDuration(*hung).c_str());
  EXPECT_LT(*dead, absl::Milliseconds(1200));
  EXPECT_LT(*hung, absl::Milliseconds(1500));
  EXPECT_TRUE(c.client().WaitForHealth(true, absl::Seconds(1)).ok());  // the others serve
}

// --- Chaos: random kill -9 / SIGSTOP / SIGTERM of workers under continuous load, one fault
// at a time so that every expert keeps a live copy. MOE_CHAOS_SECONDS sets the fault phase
// (default 45 s; the note's figures come from 180 s). ---

TEST(ClusterChaosTest, RandomFaultsUnderLoadFailNoRequest) {
  const char* env = std::getenv("MOE_CHAOS_SECONDS");
  const absl::Duration chaos = absl::Seconds(env != nullptr ? std::atoi(env) : 45);
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 40);
  const std::vector<std::string> listens = FreeAddresses(4);
  auto cluster = StartReplicated(dir, listens);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  ContinuousLoad traffic(c, load);
  // Baseline: the same load without faults.
  const absl::Time baseline_end = absl::Now() + chaos / 6;
  while (absl::Now() < baseline_end) absl::SleepFor(absl::Milliseconds(50));
  const int baseline_served = traffic.served;
  const double p99_calm = traffic.TakeQuantile(0.99);

  const uint32_t seed = static_cast<uint32_t>(absl::ToUnixNanos(absl::Now()));
  std::mt19937 rng(seed);
  auto uniform = [&](double lo, double hi) {
    return absl::Seconds(std::uniform_real_distribution<double>(lo, hi)(rng));
  };
  int kills = 0, stops = 0, terms = 0;
  const absl::Time end = absl::Now() + chaos;
  while (absl::Now() < end) {
    const int w = static_cast<int>(rng() % 4);
    testing::Subprocess& p = *c.workers()[w].process;
    switch (rng() % 3) {
      case 0:
        ++kills;
        p.Stop(SIGKILL);
        absl::SleepFor(uniform(0.2, 1.5));  // down for a while
        RestartAndAwaitUse(c, dir, w, listens);
        break;
      case 1:
        ++stops;
        ASSERT_EQ(kill(p.pid(), SIGSTOP), 0);
        absl::SleepFor(uniform(0.5, 3.0));  // hung for a while
        ASSERT_EQ(kill(p.pid(), SIGCONT), 0);
        ASSERT_TRUE(WaitForWorkerState(c, w, pb::WORKER_STATE_READY, absl::Seconds(10)).ok());
        break;
      default:
        ++terms;
        EXPECT_EQ(p.Stop(SIGTERM), 0);
        RestartAndAwaitUse(c, dir, w, listens);
        break;
    }
    absl::SleepFor(uniform(0.1, 1.0));  // up for a while
  }
  const double p99_chaos = traffic.TakeQuantile(0.99);
  traffic.Stop();
  std::printf(
      "chaos (seed %u, %s): %d kill -9, %d SIGSTOP, %d SIGTERM; %d requests served "
      "(%d in the calm %s before), %d failed, %d with other tokens; p99 latency %.3f s "
      "during faults vs %.3f s without\n",
      seed, absl::FormatDuration(chaos).c_str(), kills, stops, terms,
      traffic.served.load() - baseline_served, baseline_served,
      absl::FormatDuration(chaos / 6).c_str(), traffic.failed.load(), traffic.wrong.load(),
      p99_chaos, p99_calm);
  traffic.ExpectNoLoss("chaos, all phases", baseline_served + 8);
}

// --- No replica: --on-expert-loss fail ends the requests, reroute completes them flagged. ---

TEST(ClusterExpertLossTest, FailEndsEveryInFlightRequestNamingTheWorker) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 300);
  auto cluster = Cluster::Start(dir, {"0-3", "4-7"}, {"--on-expert-loss", "fail"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  const absl::Time start = absl::Now();
  const std::vector<Streamed> out =
      RunConcurrently(c, load.requests, [&] { c.workers()[1].process->Stop(SIGKILL); });
  EXPECT_LT(absl::Now() - start, absl::Seconds(12));  // the step deadline bounds it
  for (const Streamed& s : out) {
    ASSERT_FALSE(s.result.ok());
    EXPECT_EQ(s.result.status().code(), absl::StatusCode::kUnavailable) << s.result.status();
    EXPECT_THAT(s.result.status().message(), HasSubstr(c.workers()[1].address));
  }
  EXPECT_TRUE(c.client().WaitForHealth(false, absl::Seconds(5)).ok());
}

TEST(ClusterExpertLossTest, RerouteCompletesEveryRequestFlaggedAndCounted) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 120);
  auto cluster = Cluster::Start(dir, {"0-3", "4-7"},
                                {"--on-expert-loss", "reroute", "--metrics-listen", "127.0.0.1:0",
                                 "--http-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  auto exact = c.client().Generate(load.requests[0]);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ(exact->tokens, load.expected[0]);
  EXPECT_EQ(exact->final.degraded_tokens(), 0u);  // nothing lost yet: the exact model

  const std::vector<Streamed> out =
      RunConcurrently(c, load.requests, [&] { c.workers()[1].process->Stop(SIGKILL); });
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_TRUE(out[i].result.ok()) << i << ": " << out[i].result.status() << c.Logs();
    EXPECT_EQ(out[i].result->tokens.size(), 120u);
    EXPECT_GT(out[i].result->final.degraded_tokens(), 0u) << i;
  }
  // Serving, flagged degraded; new requests are served by experts 0-3 alone.
  EXPECT_TRUE(c.client().WaitForHealth(true, absl::Seconds(1)).ok());
  auto status = c.client().GetClusterStatus();
  ASSERT_TRUE(status.ok());
  EXPECT_TRUE(status->serving());
  EXPECT_TRUE(status->degraded());
  EXPECT_EQ(status->workers(1).state(), pb::WORKER_STATE_UNAVAILABLE);
  auto after = c.client().Generate(IdsRequest({1, 450, 29}, 8));
  ASSERT_TRUE(after.ok()) << after.status();
  // Rows whose experts were all live in every layer are not counted; at most every row fed
  // (the last token is not).
  EXPECT_GT(after->final.degraded_tokens(), 0u);
  EXPECT_LE(after->final.degraded_tokens(), 3u + 8u - 1u);
  const testing::HttpReply http = testing::ParseHttpReply(testing::HttpPost(
      c.http_address(), "/v1/completions", R"({"prompt": [1, 450, 29], "max_tokens": 8})"));
  ASSERT_EQ(http.status, 200) << http.body;
  const nlohmann::json choice = nlohmann::json::parse(http.body)["choices"][0];
  ASSERT_TRUE(choice.contains("degraded_tokens")) << http.body;
  EXPECT_GT(choice["degraded_tokens"].get<int>(), 0);
  EXPECT_LE(choice["degraded_tokens"].get<int>(), 10);
  for (const pb::ExpertLoad& layer : status->load()) {
    for (int e = 4; e < 8; ++e) EXPECT_GT(layer.tokens(e), 0u) << "before the loss";
  }
  const auto metrics =
      testing::ParseMetricsText(testing::HttpGet(c.coordinator().Announced("METRICS"), "/metrics"));
  double degraded = 0;
  for (int l = 0; l < 2; ++l) {
    degraded += metrics.at("moe_degraded_tokens_total{layer=\"" + std::to_string(l) + "\"}");
  }
  EXPECT_GE(degraded, static_cast<double>(after->final.degraded_tokens()));
}

// --- A gRPC deadline ends the request on the server too and frees its blocks. ---

TEST(ClusterDeadlineTest, GrpcDeadlineEndsTheRequestAndFreesItsBlocks) {
  auto cluster = Cluster::Start(ModelDir("demo_mixtral"), ContiguousRanges(8, 2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  auto r =
      c.client().Generate(IdsRequest({1, 450, 29}, 500), nullptr, [](grpc::ClientContext* context) {
        context->set_deadline(absl::ToChronoTime(absl::Now() + absl::Milliseconds(100)));
      });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  const absl::Time start = absl::Now();
  absl::StatusOr<pb::ClusterStatus> status;
  do {
    status = c.client().GetClusterStatus();
    ASSERT_TRUE(status.ok());
  } while ((status->running_requests() > 0 || status->kv_cache_usage() > 0) &&
           absl::Now() - start < absl::Seconds(5));
  EXPECT_EQ(status->running_requests(), 0);
  EXPECT_EQ(status->kv_cache_usage(), 0);
}

// --- TLS: mTLS between the coordinator and the workers, TLS on the public gRPC API. ---

constexpr char kTls[] = "tests/testdata/tls/";
std::string TlsFile(const std::string& name) { return std::string(kTls) + name; }

// GetInfo on a worker with these client credentials.
grpc::Status WorkerGetInfo(const std::string& address,
                           std::shared_ptr<grpc::ChannelCredentials> credentials) {
  auto stub = pb::ExpertWorker::NewStub(grpc::CreateChannel(address, credentials));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  pb::WorkerInfo info;
  return stub->GetInfo(&context, pb::GetInfoRequest(), &info);
}

TEST(ClusterTlsTest, WorkersRefuseClientsWithoutAValidCertificateAndTheClusterServesOverTls) {
  const std::vector<std::string> worker_tls = {"--tls-cert", TlsFile("worker.pem"),
                                               "--tls-key",  TlsFile("worker.key"),
                                               "--tls-ca",   TlsFile("ca.pem")};
  const std::vector<std::string> coordinator_tls = {"--tls-cert", TlsFile("coordinator.pem"),
                                                    "--tls-key",  TlsFile("coordinator.key"),
                                                    "--tls-ca",   TlsFile("ca.pem")};
  auto cluster = Cluster::Start(ModelDir("demo_mixtral"), ContiguousRanges(8, 2), coordinator_tls,
                                {}, worker_tls);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  const std::string worker = c.workers()[0].address;

  // The coordinator's own certificate gets in; nothing else does.
  auto creds = [](const std::string& cert, const std::string& key) {
    auto made = ChannelCredentials(
        {cert.empty() ? "" : TlsFile(cert), key.empty() ? "" : TlsFile(key), TlsFile("ca.pem")});
    EXPECT_TRUE(made.ok()) << made.status();
    return *made;
  };
  EXPECT_TRUE(WorkerGetInfo(worker, creds("coordinator.pem", "coordinator.key")).ok());
  for (const auto& [cert, key, what] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"", "", "no client certificate"},
           {"stranger.pem", "stranger.key", "a certificate from another CA"},
           {"expired.pem", "expired.key", "an expired certificate"}}) {
    const grpc::Status s = WorkerGetInfo(worker, creds(cert, key));
    EXPECT_FALSE(s.ok()) << what;
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << what << ": " << s.error_message();
  }
  EXPECT_FALSE(WorkerGetInfo(worker, grpc::InsecureChannelCredentials()).ok()) << "plaintext";

  // The public API over TLS (server certificate checked against the CA); plaintext is refused.
  auto public_creds = ChannelCredentials({"", "", TlsFile("ca.pem")});
  ASSERT_TRUE(public_creds.ok());
  InferenceClient tls_client(c.address(), "", *public_creds);
  auto r = tls_client.Generate(IdsRequest({1, 450, 29}, 8));
  ASSERT_TRUE(r.ok()) << r.status() << c.Logs();
  EXPECT_EQ(r->tokens,
            InProcessWithLogprobs(ModelDir("demo_mixtral"), {1, 450, 29}, 8, -1, -1).tokens);
  EXPECT_FALSE(c.client().Generate(IdsRequest({1, 450, 29}, 2)).ok());
}

TEST(ClusterTlsTest, BadTlsFlagsAreRefusedAtStart) {
  auto half = testing::StartWorker(
      ModelDir("demo_mixtral"), "all", "127.0.0.1:0",
      {"--tls-cert", TlsFile("worker.pem"), "--tls-key", TlsFile("worker.key")});
  ASSERT_FALSE(half.ok());
  EXPECT_THAT(half.status().message(), HasSubstr("--tls-ca"));
  auto missing = testing::StartWorker(ModelDir("demo_mixtral"), "all", "127.0.0.1:0",
                                      {"--tls-cert", TlsFile("nope.pem"), "--tls-key",
                                       TlsFile("worker.key"), "--tls-ca", TlsFile("ca.pem")});
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("--tls-cert tests/testdata/tls/nope.pem"));
}

// --- Worker limits: message size from the model's shape, bounded streams. ---

int ThreadCount(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  }
  return -1;
}

TEST(ClusterLimitsTest, A256MbForwardIsRefusedByTheSizeCapNeverDecoded) {
  auto w = testing::StartWorker(ModelDir("demo_mixtral"), "all");
  ASSERT_TRUE(w.ok()) << w.status();
  const uint64_t rss_before = w->process->RssBytes();
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(512 << 20);
  auto stub = pb::ExpertWorker::NewStub(
      grpc::CreateCustomChannel(w->address, grpc::InsecureChannelCredentials(), args));
  pb::ForwardRequest request;
  request.set_step(1);
  pb::Tensor* hidden = request.mutable_hidden();
  hidden->set_dtype(pb::DTYPE_F32);
  hidden->add_shape((256 << 20) / (128 * 4));
  hidden->add_shape(128);
  hidden->mutable_data()->resize(256 << 20);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  auto stream = stub->Forward(&context);
  stream->Write(request);
  stream->WritesDone();
  pb::ForwardResponse response;
  EXPECT_FALSE(stream->Read(&response));
  const grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  const uint64_t rss_after = w->process->RssBytes();
  // The worker still serves.
  grpc::ClientContext info_context;
  pb::WorkerInfo info;
  ASSERT_TRUE(stub->GetInfo(&info_context, pb::GetInfoRequest(), &info).ok());
  ASSERT_GT(info.max_rows(), 0);
  auto config = LoadModelConfig(ModelDir("demo_mixtral"));
  ASSERT_TRUE(config.ok()) << config.status();
  const int64_t quota = WorkerMemoryQuotaBytes(MaxForwardMessageBytes(*config, info.max_rows()));
  std::printf("256 MB Forward: worker RSS %.1f -> %.1f MB (memory quota %.1f MB)\n",
              rss_before / 1e6, rss_after / 1e6, quota / 1e6);
  // Never decoded or copied into a request (that cost 2.5 GB), and gRPC (1.51 checks the size
  // only once a message is assembled) buffers no more of it than the worker's memory quota
  // (without the quota: 180 MB of the 256), give or take the allocator's slack.
  ASSERT_LT(quota, 64 << 20);
  EXPECT_LT(rss_after, rss_before + quota + (16 << 20));
}

TEST(ClusterLimitsTest, StreamsBeyondMaxStreamsAreRefusedAndThreadsStayBounded) {
  auto w =
      testing::StartWorker(ModelDir("demo_mixtral"), "all", "127.0.0.1:0", {"--max-streams", "4"});
  ASSERT_TRUE(w.ok()) << w.status();
  auto stub = pb::ExpertWorker::NewStub(
      grpc::CreateChannel(w->address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext info_context;
  pb::WorkerInfo info;
  ASSERT_TRUE(stub->GetInfo(&info_context, pb::GetInfoRequest(), &info).ok());
  const int threads_before = ThreadCount(w->process->pid());
  constexpr int kStreams = 40;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReaderWriter<pb::ForwardRequest, pb::ForwardResponse>>>
      streams;
  for (int i = 0; i < kStreams; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
    streams.push_back(stub->Forward(contexts.back().get()));
  }
  // An empty request on each: the streams served answer it (and stay open); the others end
  // with RESOURCE_EXHAUSTED.
  pb::ForwardRequest empty;
  empty.set_step(1);
  empty.mutable_hidden()->set_dtype(pb::DTYPE_F32);
  empty.mutable_hidden()->add_shape(0);
  empty.mutable_hidden()->add_shape(info.hidden_size());
  empty.add_row_offsets(0);
  int served = 0, refused = 0;
  for (int i = 0; i < kStreams; ++i) {
    pb::ForwardResponse response;
    if (streams[i]->Write(empty) && streams[i]->Read(&response)) {
      ++served;
      continue;
    }
    const grpc::Status s = streams[i]->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
    ++refused;
  }
  const int threads_open = ThreadCount(w->process->pid());
  std::printf("%d Forward streams: %d served, %d refused; worker threads %d -> %d\n", kStreams,
              served, refused, threads_before, threads_open);
  EXPECT_EQ(served, 4);
  EXPECT_EQ(refused, kStreams - 4);
  for (int i = 0; i < kStreams; ++i) contexts[i]->TryCancel();
  EXPECT_LE(threads_open, threads_before + 4 + 8);
}

TEST(ClusterLimitsTest, OneClientCannotHoldMoreThanItsShareOfStreams) {
  auto cluster = Cluster::Start(ModelDir("demo_mixtral"), ContiguousRanges(8, 2),
                                {"--max-streams-per-client", "2", "--http-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  absl::Mutex mu;
  std::vector<grpc::ClientContext*> open;
  absl::BlockingCounter streaming(2);
  std::vector<std::thread> holders;
  std::vector<absl::Status> ended(2);
  for (int i = 0; i < 2; ++i) {
    holders.emplace_back([&, i] {
      bool first = true;
      auto r = c.client().Generate(
          IdsRequest({1, 450, 29}, 500),
          [&](const pb::TokenDelta&) {
            if (first) streaming.DecrementCount();
            first = false;
          },
          [&](grpc::ClientContext* context) {
            absl::MutexLock lock(&mu);
            open.push_back(context);
          });
      ended[i] = r.status();
    });
  }
  streaming.Wait();
  auto third = c.client().Generate(IdsRequest({1, 450, 29}, 2));
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_THAT(third.status().message(), HasSubstr("--max-streams-per-client 2"));
  // The HTTP API shares the client's budget.
  const testing::HttpReply http = testing::ParseHttpReply(testing::HttpPost(
      c.http_address(), "/v1/completions", R"({"prompt": [1, 450, 29], "max_tokens": 2})"));
  EXPECT_EQ(http.status, 429) << http.body;
  EXPECT_THAT(http.body, HasSubstr("--max-streams-per-client 2"));
  {
    absl::MutexLock lock(&mu);
    for (grpc::ClientContext* context : open) context->TryCancel();
  }
  for (std::thread& t : holders) t.join();
  // Once the server has ended them (its handlers see the cancellation within ~50 ms), the
  // client may stream again.
  absl::StatusOr<ClientResult> again;
  const absl::Time start = absl::Now();
  do {
    again = c.client().Generate(IdsRequest({1, 450, 29}, 2));
  } while (absl::IsResourceExhausted(again.status()) && absl::Now() - start < absl::Seconds(5));
  EXPECT_TRUE(again.ok()) << again.status();
}

// --- Cancellation frees the sequence's KV blocks. ---

TEST(ClusterCancelTest, CancelMidStreamFreesKvBlocks) {
  auto cluster = Cluster::Start(ModelDir("demo_mixtral"), ContiguousRanges(8, 2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  auto before = c.client().GetClusterStatus();
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(before->kv_cache_usage(), 0.0);
  grpc::ClientContext* context = nullptr;
  int deltas = 0;
  double usage_while_running = 0;
  auto result = c.client().Generate(
      IdsRequest({1, 450, 29}, 400),
      [&](const pb::TokenDelta&) {
        if (++deltas == 3) {
          auto mid = c.client().GetClusterStatus();
          if (mid.ok()) usage_while_running = mid->kv_cache_usage();
          context->TryCancel();
        }
      },
      [&](grpc::ClientContext* ctx) { context = ctx; });
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_GT(usage_while_running, 0.0);
  // The server notices the cancellation between steps; wait (bounded) for the blocks to return.
  double usage = 1;
  int running = 1;
  for (const absl::Time deadline = absl::Now() + absl::Seconds(10);
       absl::Now() < deadline && (usage > 0 || running > 0);) {
    auto s = c.client().GetClusterStatus();
    ASSERT_TRUE(s.ok());
    usage = s->kv_cache_usage();
    running = s->running_requests();
  }
  EXPECT_EQ(usage, before->kv_cache_usage());
  EXPECT_EQ(running, 0);
}

// --- Invalid requests: INVALID_ARGUMENT naming the parameter. ---

TEST(ClusterValidationTest, InvalidRequestsNameTheParameter) {
  auto cluster = Cluster::Start(ModelDir("mixtral_32e_gqa_fp16"), ContiguousRanges(32, 2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  struct Bad {
    std::function<void(pb::GenerateRequest*)> mutate;
    const char* parameter;
  };
  const std::vector<Bad> cases = {
      {[](pb::GenerateRequest* r) { r->set_temperature(-0.5f); }, "temperature"},
      {[](pb::GenerateRequest* r) { r->set_temperature(std::nanf("")); }, "temperature"},
      {[](pb::GenerateRequest* r) { r->set_top_p(0.0f); }, "top_p"},
      {[](pb::GenerateRequest* r) { r->set_top_p(1.5f); }, "top_p"},
      {[](pb::GenerateRequest* r) { r->set_top_k(-3); }, "top_k"},
      {[](pb::GenerateRequest* r) { r->set_repetition_penalty(0.0f); }, "repetition_penalty"},
      {[](pb::GenerateRequest* r) { r->set_max_tokens(0); }, "max_tokens"},
      {[](pb::GenerateRequest* r) { r->set_max_tokens(-5); }, "max_tokens"},
      {[](pb::GenerateRequest* r) { r->set_max_tokens(100000); }, "max_tokens"},
      {[](pb::GenerateRequest* r) { r->clear_prompt_ids(); }, "prompt"},
      {[](pb::GenerateRequest* r) { r->set_prompt(""); }, "prompt"},
      {[](pb::GenerateRequest* r) { r->mutable_prompt_ids()->add_ids(1000); }, "vocabulary"},
      {[](pb::GenerateRequest* r) { r->mutable_prompt_ids()->add_ids(-1); }, "vocabulary"},
      {[](pb::GenerateRequest* r) { r->add_stop(""); }, "stop"},
  };
  for (const Bad& b : cases) {
    pb::GenerateRequest r = IdsRequest({1, 5, 9}, 4);
    b.mutate(&r);
    auto result = (*cluster)->client().Generate(r);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument)
        << b.parameter << ": " << result.status();
    EXPECT_THAT(result.status().message(), HasSubstr(b.parameter));
  }
  // The server is unharmed.
  EXPECT_TRUE((*cluster)->client().Generate(IdsRequest({1, 5, 9}, 4)).ok());
}

TEST(ClusterValidationTest, FullQueueIsResourceExhausted) {
  auto cluster = Cluster::Start(ModelDir("demo_mixtral"), ContiguousRanges(8, 1),
                                {"--max-running", "1", "--max-waiting", "1"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  absl::Notification first_streaming, second_queued;
  grpc::ClientContext* first_context = nullptr;
  grpc::ClientContext* second_context = nullptr;
  std::thread first([&] {
    c.client()
        .Generate(
            IdsRequest({1, 450}, 400),
            [&](const pb::TokenDelta&) {
              if (!first_streaming.HasBeenNotified()) first_streaming.Notify();
            },
            [&](grpc::ClientContext* ctx) { first_context = ctx; })
        .status()
        .IgnoreError();  // ends CANCELLED: the test cancels it
  });
  first_streaming.WaitForNotification();
  std::thread second([&] {
    c.client()
        .Generate(IdsRequest({1, 29}, 4), nullptr,
                  [&](grpc::ClientContext* ctx) { second_context = ctx; })
        .status()
        .IgnoreError();  // ends CANCELLED: the test cancels it
  });
  // Bounded wait until the second request is queued behind the first.
  for (const absl::Time deadline = absl::Now() + absl::Seconds(10); absl::Now() < deadline;) {
    auto s = c.client().GetClusterStatus();
    if (s.ok() && s->waiting_requests() == 1) break;
  }
  auto third = c.client().Generate(IdsRequest({1, 30}, 4));
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted) << third.status();
  EXPECT_THAT(third.status().message(), HasSubstr("max_waiting"));
  first_context->TryCancel();
  first.join();
  second.join();
}

// --- Start-up checks: the coordinator refuses to start and names what is wrong. ---

TEST(ClusterStartupTest, RefusesWhenExpertsAreMissing) {
  const std::string dir = ModelDir("mixtral_32e_gqa_fp16");
  auto w = testing::StartWorker(dir, "0-15");
  ASSERT_TRUE(w.ok()) << w.status();
  testing::Subprocess coordinator;
  const std::string log = testing::TempDir("refuse") + "/coordinator.log";
  ASSERT_TRUE(coordinator
                  .Start(MOE_COORDINATOR_PATH,
                         {"--model", dir, "--workers", w->address, "--listen", "127.0.0.1:0"}, log)
                  .ok());
  EXPECT_EQ(coordinator.WaitForExit(absl::Seconds(60)), 1);
  EXPECT_THAT(testing::ReadLog(log),
              HasSubstr("experts [16, 32) of every layer are hosted by no worker"));
}

// --- Per-layer placement (--placement FILE, --placement-from-record FILE). ---

// Rows worker `w` computed for (layer, expert), from its metrics.
double ComputedRows(testing::WorkerProcess& w, int layer, int expert) {
  const auto metrics =
      testing::ParseMetricsText(testing::HttpGet(w.process->Announced("METRICS"), "/metrics"));
  const auto it = metrics.find(
      absl::StrCat("moe_worker_rows_total{expert=\"", expert, "\",layer=\"", layer, "\"}"));
  return it == metrics.end() ? 0 : it->second;
}

// Two workers that loaded every expert serve different halves in each layer (and share one
// expert of layer 0): transformers' greedy tokens, and each worker computed only what the file
// gives it.
TEST(ClusterPlacementTest, APerLayerPlacementFileIsServedAsWritten) {
  const std::string dir = ModelDir("mixtral_32e_gqa_fp16");
  auto cluster = Cluster::StartWithPlacement(
      dir, {"all", "all"},
      [](const std::vector<std::string>& a) {
        return absl::StrCat(R"({"workers": [
          {"address": ")",
                            a[0], R"(", "experts": "0-15", "layers": {"1": "16-31"}},
          {"address": ")",
                            a[1], R"(", "layers": {"0": "3,16-31", "1": "0-15"}}]})");
      },
      {}, {"--metrics-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const testing::GoldenExpected expected = Expected(dir);
  auto result = (*cluster)->client().Generate(IdsRequest(expected.prompt, 16));
  ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();
  EXPECT_EQ(result->tokens, expected.greedy);
  auto& workers = (*cluster)->workers();
  double layer0_low = 0, layer1_high = 0;
  for (int e = 0; e < 32; ++e) {
    const bool low = e < 16;
    // Worker 0: 0-15 of layer 0, 16-31 of layer 1; worker 1 the rest (and a copy of 3).
    EXPECT_EQ(ComputedRows(workers[0], 0, e) > 0 && !low, false) << "layer 0 expert " << e;
    EXPECT_EQ(ComputedRows(workers[0], 1, e) > 0 && low, false) << "layer 1 expert " << e;
    EXPECT_EQ(ComputedRows(workers[1], 0, e) > 0 && low && e != 3, false) << "layer 0 " << e;
    EXPECT_EQ(ComputedRows(workers[1], 1, e) > 0 && !low, false) << "layer 1 expert " << e;
    layer0_low += ComputedRows(workers[0], 0, e);
    layer1_high += ComputedRows(workers[0], 1, e);
  }
  EXPECT_GT(layer0_low, 0);
  EXPECT_GT(layer1_high, 0);
}

TEST(ClusterPlacementTest, BadPlacementsAreRefusedAtStartNamingTheProblem) {
  const std::string dir = ModelDir("mixtral_32e_gqa_fp16");
  auto half = testing::StartWorker(dir, "0-15");
  ASSERT_TRUE(half.ok()) << half.status();
  auto all = testing::StartWorker(dir, "all");
  ASSERT_TRUE(all.ok()) << all.status();
  struct Case {
    std::string json;
    const char* message;
  };
  const std::vector<Case> cases = {
      {absl::StrCat(R"({"workers": [{"address": ")", all->address, R"(", "experts": "0-31",
          "layers": {"1": "0-7"}}]})"),
       "experts [8, 32) of layer 1 are served by no worker"},
      {absl::StrCat(R"({"workers": [{"address": ")", half->address, R"(", "experts": "0-15",
          "layers": {"1": "0-31"}}, {"address": ")",
                    all->address, R"(", "experts": "16-31"}]})"),
       "serve experts [0, 32) in layer 1, which it has not loaded: start it with --experts "
       "covering 0-31"},
      {R"({"workers": [{"address": "127.0.0.1:1", "experts": "0-40"}]})",
       "\"0-40\" is not an expert E or inclusive range A-B of the model's experts 0-31"},
      {R"({"workers": [{"address": "127.0.0.1:1", "experts": "all", "layer": {}}]})",
       "unknown key \"layer\""},
      {"[1, 2]", "not a JSON object"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = testing::TempDir("bad_placement") + "/" + std::to_string(i) + ".json";
    std::ofstream(path) << cases[i].json;
    testing::Subprocess coordinator;
    const std::string log = path + ".log";
    ASSERT_TRUE(coordinator
                    .Start(MOE_COORDINATOR_PATH,
                           {"--model", dir, "--listen", "127.0.0.1:0", "--placement", path}, log)
                    .ok());
    EXPECT_EQ(coordinator.WaitForExit(absl::Seconds(60)), 1) << i;
    EXPECT_THAT(testing::ReadLog(log), HasSubstr(cases[i].message)) << i;
  }
}

// A recorded load whose hot experts (8-15) both workers loaded (0-23 and 8-31) but which, with
// the workers' own ranges, go to one of them per step: the placement from the record spreads
// them; the tokens stay transformers'; the log gives the busiest worker's share before and after.
TEST(ClusterPlacementTest, PlacementFromARecordBalancesItsLoad) {
  const std::string dir = ModelDir("mixtral_32e_gqa_fp16");
  const std::string record = testing::TempDir("record") + "/load.csv";
  {
    std::ofstream out(record);
    out << "layer,expert,tokens\n";
    for (int l = 0; l < 2; ++l) {
      for (int e = 0; e < 32; ++e)
        out << l << "," << e << "," << (e >= 8 && e < 16 ? 1000 : 10) << "\n";
    }
  }
  auto cluster = Cluster::Start(dir, {"0-23", "8-31"}, {"--placement-from-record", record});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const testing::GoldenExpected expected = Expected(dir);
  auto result = (*cluster)->client().Generate(IdsRequest(expected.prompt, 16));
  ASSERT_TRUE(result.ok()) << result.status() << (*cluster)->Logs();
  EXPECT_EQ(result->tokens, expected.greedy);
  const std::string logs = (*cluster)->Logs();
  const std::regex line(R"(gets ([0-9.]+)x the mean .* ([0-9.]+)x with the new placement)");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(logs, m, line)) << logs;
  const double before = std::stod(m[1]), after = std::stod(m[2]);
  EXPECT_GT(before, 1.9);  // 8080 of 8240 tokens per layer on one worker
  EXPECT_LT(after, 1.05);
}

// Live rebalancing under continuous load: workers 0-5 and 2-7 of the demo model (its router
// sends a third of a layer's tokens to one expert); with their own ranges the shared experts
// 2-5 go to one of them per step. The rebalancer switches placements between steps: no request
// fails or changes a token, and the rows the workers get become more even.
TEST(ClusterRebalanceTest, LiveRebalanceUnderLoadLosesNothingAndEvensTheRows) {
  const std::string dir = ModelDir("demo_mixtral");
  const FailoverLoad load(dir, 40);
  auto cluster =
      Cluster::Start(dir, {"0-5", "2-7"},
                     {"--rebalance-interval", "500ms", "--rebalance-window", "60s",
                      "--rebalance-min-gain", "0.05", "--metrics-listen", "127.0.0.1:0"});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  Cluster& c = **cluster;
  // The busiest worker's rows per exchange over the mean rows per worker, from the metrics.
  auto counters = [&c] {
    const auto m = testing::ParseMetricsText(
        testing::HttpGet(c.coordinator().Announced("METRICS"), "/metrics"));
    double rows = 0;
    for (const auto& [name, value] : m) {
      if (name.rfind("moe_dispatch_rows_total{", 0) == 0) rows += value;
    }
    return std::make_pair(m.at("moe_dispatch_busiest_worker_rows_total"), rows);
  };
  ContinuousLoad traffic(c, load);
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (c.Logs().find("rebalanced (placement generation 1)") == std::string::npos &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(100));
  }
  const auto [busiest_a, rows_a] = counters();
  // Serve a while under the new placement (later checks find nothing better to do).
  absl::SleepFor(absl::Seconds(3));
  const auto [busiest_b, rows_b] = counters();
  traffic.Stop();
  traffic.ExpectNoLoss("live rebalance");
  const std::string logs = c.Logs();
  const std::regex line(
      R"(rebalanced \(placement generation 1\).* gets ([0-9.]+)x .* ([0-9.]+)x with)");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(logs, m, line)) << logs;
  EXPECT_LT(std::stod(m[2]), std::stod(m[1]));
  ASSERT_GT(rows_a, 0);
  ASSERT_GT(rows_b - rows_a, 0);
  const double before = busiest_a / (rows_a / 2);
  const double after = (busiest_b - busiest_a) / ((rows_b - rows_a) / 2);
  std::printf("busiest worker's rows per exchange / mean: %.3f before the rebalance, %.3f after\n",
              before, after);
  EXPECT_LT(after, before);
}

// --nccl-device: a CUDA device and --workers, in a build with NCCL (this one, the CPU build,
// has none); each refusal names what to change, before any worker is contacted.
TEST(ClusterStartupTest, NcclDeviceFlagIsCheckedAtStart) {
  const std::string dir = ModelDir("demo_mixtral");
  struct Case {
    std::vector<std::string> args;
    const char* message;
  };
  const std::vector<Case> cases = {
      {{"--nccl-device", "cuda:0"},
       "--nccl-device reaches expert workers over NCCL: give --workers"},
      {{"--nccl-device", "cpu", "--workers", "127.0.0.1:1"},
       "--nccl-device must be cuda or cuda:N, not 'cpu'"},
#ifndef MOE_HAVE_CUDA
      {{"--nccl-device", "cuda:0", "--workers", "127.0.0.1:1"},
       "--nccl-device cuda:0: this build has no NCCL channels: build with scripts/build.sh "
       "-DMOE_ENABLE_CUDA=ON"},
#endif
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::vector<std::string> args = {"--model", dir, "--listen", "127.0.0.1:0"};
    args.insert(args.end(), cases[i].args.begin(), cases[i].args.end());
    testing::Subprocess coordinator;
    const std::string log = testing::TempDir("nccl_flag") + "/" + std::to_string(i) + ".log";
    ASSERT_TRUE(coordinator.Start(MOE_COORDINATOR_PATH, args, log).ok());
    EXPECT_EQ(coordinator.WaitForExit(absl::Seconds(60)), 1) << i;
    EXPECT_THAT(testing::ReadLog(log), HasSubstr(cases[i].message)) << i;
  }
}

TEST(ClusterStartupTest, RefusesAWorkerServingAnotherModel) {
  auto w = testing::StartWorker(ModelDir("mixtral_4e_tied_fused_sharded"), "all");
  ASSERT_TRUE(w.ok()) << w.status();
  testing::Subprocess coordinator;
  const std::string log = testing::TempDir("other") + "/coordinator.log";
  ASSERT_TRUE(coordinator
                  .Start(MOE_COORDINATOR_PATH,
                         {"--model", ModelDir("mixtral_3e_sliding_bf16"), "--workers", w->address,
                          "--listen", "127.0.0.1:0"},
                         log)
                  .ok());
  EXPECT_EQ(coordinator.WaitForExit(absl::Seconds(60)), 1);
  EXPECT_THAT(testing::ReadLog(log), HasSubstr("serves a different model"));
}

// --- The status API reports placement and load consistent with what was generated. ---

TEST(ClusterStatusTest, ExpertLoadCountsEveryRoutedToken) {
  const std::string dir = ModelDir("mixtral_8e_top3_no_rope_theta");
  auto cluster = Cluster::Start(dir, ContiguousRanges(8, 3));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const testing::GoldenExpected e = Expected(dir);
  auto result = (*cluster)->client().Generate(IdsRequest(e.prompt, 5));
  ASSERT_TRUE(result.ok());
  auto status = (*cluster)->client().GetClusterStatus();
  ASSERT_TRUE(status.ok());
  EXPECT_TRUE(status->serving());
  ASSERT_EQ(status->workers_size(), 3);
  EXPECT_EQ(status->workers(2).expert_begin(), 5);
  EXPECT_EQ(status->workers(2).expert_end(), 8);
  ASSERT_EQ(status->load_size(), 2);
  // Every position that went through the model (prompt + all generated but the last) was routed
  // to top-3 experts in each layer.
  const uint64_t positions = e.prompt.size() + 5 - 1;
  for (const pb::ExpertLoad& l : status->load()) {
    uint64_t total = 0;
    for (uint64_t t : l.tokens()) total += t;
    EXPECT_EQ(total, positions * 3) << "layer " << l.layer();
  }

  // moe-cli record-experts: since the start, the same table as CSV; over a window without
  // traffic, zeros; without --out, a clear error.
  const std::string csv = testing::TempDir("record") + "/load.csv";
  const std::string cli =
      absl::StrCat(MOE_CLI_PATH, " record-experts --server ", (*cluster)->address());
  ASSERT_EQ(std::system(absl::StrCat(cli, " --out ", csv, " 2>/dev/null").c_str()), 0);
  std::string want = "layer,expert,tokens\n";
  for (const pb::ExpertLoad& l : status->load()) {
    for (int e = 0; e < l.tokens_size(); ++e)
      absl::StrAppend(&want, l.layer(), ",", e, ",", l.tokens(e), "\n");
  }
  EXPECT_EQ(testing::ReadLog(csv), want);
  ASSERT_EQ(std::system(absl::StrCat(cli, " --seconds 0.2s --out ", csv, " 2>/dev/null").c_str()),
            0);
  std::string zeros = "layer,expert,tokens\n";
  for (int l = 0; l < 2; ++l) {
    for (int e = 0; e < 8; ++e) absl::StrAppend(&zeros, l, ",", e, ",0\n");
  }
  EXPECT_EQ(testing::ReadLog(csv), zeros);
  const std::string err = testing::TempDir("record") + "/err.txt";
  EXPECT_NE(std::system(absl::StrCat(cli, " 2>", err).c_str()), 0);
  EXPECT_THAT(testing::ReadLog(err), HasSubstr("record-experts needs --out FILE"));
}

}  // namespace
}  // namespace moe
