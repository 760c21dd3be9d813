// Helpers shared by the coordinator's tests.
#ifndef MOE_TESTS_COORDINATOR_TEST_HELPERS_H_
#define MOE_TESTS_COORDINATOR_TEST_HELPERS_H_

#include <string>

#include "common/tokenizer.h"
#include "coordinator/generator.h"
#include "coordinator/transport/expert_transport.h"

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
