#include "coordinator/transport/nccl_transport.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/nccl_channel.h"
#include "common/status_macros.h"

namespace moe {
namespace {

class Nccl final : public ChannelFactory {
 public:
  Nccl(int device, absl::Duration timeout) : device_(device), timeout_(timeout) {}
  std::string kind() const override { return "nccl"; }
  bool Accepts(const std::vector<std::string>& offered) const override {
    return std::find(offered.begin(), offered.end(), "nccl") != offered.end();
  }
  bool Bf16ByDefault() const override { return true; }
  absl::StatusOr<std::unique_ptr<FrameChannel>> Open(
      const std::function<absl::Status(const ChannelRequest&)>& ask_worker) override {
    ChannelRequest request;
    request.kind = "nccl";
    MOE_ASSIGN_OR_RETURN(request.nccl_unique_id, NewNcclUniqueId());
    MOE_RETURN_IF_ERROR(ask_worker(request));
    return ConnectNcclChannel(request.nccl_unique_id, /*rank=*/0, device_, timeout_);
  }

 private:
  const int device_;
  const absl::Duration timeout_;
};

class Memory final : public ChannelFactory {
 public:
  std::string kind() const override { return "memory"; }
  bool Accepts(const std::vector<std::string>&) const override { return true; }
  bool Bf16ByDefault() const override { return false; }
  absl::StatusOr<std::unique_ptr<FrameChannel>> Open(
      const std::function<absl::Status(const ChannelRequest&)>& ask_worker) override {
    auto [ours, theirs] = MemoryChannelPair();
    ChannelRequest request;
    request.kind = "memory";
    request.memory_name =
        absl::StrCat("coordinator-", reinterpret_cast<uintptr_t>(this), "-", next_++);
    OfferMemoryChannel(request.memory_name, std::move(theirs));
    absl::Status s = ask_worker(request);
    if (!s.ok()) {
      TakeMemoryChannel(request.memory_name).IgnoreError();  // not taken: drop it
      return s;
    }
    return std::move(ours);
  }

 private:
  std::atomic<int64_t> next_{0};
};

}  // namespace

std::unique_ptr<ChannelFactory> NcclChannelFactory(int device, absl::Duration timeout) {
  return std::make_unique<Nccl>(device, timeout);
}

std::unique_ptr<ChannelFactory> MemoryChannelFactory() { return std::make_unique<Memory>(); }

}  // namespace moe
