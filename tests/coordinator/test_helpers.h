// Helpers shared by the coordinator's tests.
#ifndef MOE_TESTS_COORDINATOR_TEST_HELPERS_H_
#define MOE_TESTS_COORDINATOR_TEST_HELPERS_H_

#include <algorithm>
#include <string>
#include <vector>

#include "common/tokenizer.h"
#include "coordinator/generator.h"
#include "coordinator/local_model.h"
#include "coordinator/transport/expert_transport.h"
#include "gtest/gtest.h"
#include "tests/testutil/golden_fixture.h"

namespace moe::testing {

// A request for exactly `max_tokens` tokens (EOS ignored), greedy.
inline GenerationRequest FixedLengthRequest(const Tokenizer& tokenizer, const std::string& text,
                                            int64_t max_tokens) {
  GenerationRequest r;
  r.prompt = tokenizer.Encode(text);
  r.params.max_tokens = max_tokens;
  r.params.ignore_eos = true;
  return r;
}

// The prompt in one step: logits at every position vs the reference.
inline void ExpectPrefillMatchesGolden(LocalModel& model, const GoldenExpected& expected) {
  const int64_t vocab = model.config().vocab_size;
  SequenceState seq;
  StepInput in{&seq, expected.prompt, /*all_logits=*/true};
  std::vector<float> logits;
  ASSERT_TRUE(model.engine()->Step({&in, 1}, &logits).ok());
  ASSERT_EQ(logits.size(), expected.logits.size());
  for (size_t p = 0; p < expected.prompt.size(); ++p) {
    ExpectLogitsNear(&logits[p * vocab], &expected.logits[p * vocab], vocab,
                     "position " + std::to_string(p));
  }
  model.engine()->Release(&seq);
}

// The prompt, then the reference's greedy tokens one step at a time: each step's logits vs the
// reference, and the argmax of each equal to the reference's next token.
inline void ExpectDecodeMatchesGolden(LocalModel& model, const GoldenExpected& expected) {
  const int64_t vocab = model.config().vocab_size;
  SequenceState seq;
  StepInput in{&seq, expected.prompt, false};
  std::vector<float> logits;
  ASSERT_TRUE(model.engine()->Step({&in, 1}, &logits).ok());
  std::vector<int32_t> greedy;
  for (size_t i = 0; i < expected.greedy.size(); ++i) {
    ExpectLogitsNear(logits.data(), &expected.decode_logits[i * vocab], vocab,
                     "decode step " + std::to_string(i));
    greedy.push_back(
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    in = {&seq, {&expected.greedy[i], 1}, false};
    ASSERT_TRUE(model.engine()->Step({&in, 1}, &logits).ok());
  }
  EXPECT_EQ(greedy, expected.greedy);
  model.engine()->Release(&seq);
}

// Forwards to another transport, failing one Exchange on request.
class FailingTransport : public ExpertTransport {
 public:
  explicit FailingTransport(ExpertTransport* inner) : inner_(inner) {}
  absl::Status Exchange(int64_t layer, const Routing& routing, const float* x,
                        float* out) override {
    if (fail_in_ > 0 && --fail_in_ == 0) {
      return absl::UnavailableError("expert worker x failed");
    }
    return inner_->Exchange(layer, routing, x, out);
  }
  // The n-th Exchange from now fails (n >= 1).
  void FailAt(int n) { fail_in_ = n; }

 private:
  ExpertTransport* inner_;
  int fail_in_ = 0;
};

}  // namespace moe::testing

#endif  // MOE_TESTS_COORDINATOR_TEST_HELPERS_H_
