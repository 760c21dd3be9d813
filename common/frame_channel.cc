#include "common/frame_channel.h"

#include <deque>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace moe {
namespace {

// The state both ends of a memory pair share: a queue per direction.
struct MemoryLink {
  absl::Mutex mu;
  std::deque<std::string> queue[2] ABSL_GUARDED_BY(mu);  // queue[i]: frames for end i
  bool aborted ABSL_GUARDED_BY(mu) = false;
};

class MemoryEnd final : public FrameChannel {
 public:
  MemoryEnd(std::shared_ptr<MemoryLink> link, int self) : link_(std::move(link)), self_(self) {}
  ~MemoryEnd() override { Abort(); }

  absl::Status Send(const std::string& frame) override {
    absl::MutexLock lock(&link_->mu);
    if (link_->aborted) return absl::UnavailableError("the channel was aborted");
    link_->queue[1 - self_].push_back(frame);
    return absl::OkStatus();
  }

  absl::Status Receive(int64_t max_bytes, std::string* frame) override {
    absl::MutexLock lock(&link_->mu);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
      return link_->aborted || !link_->queue[self_].empty();
    };
    link_->mu.Await(absl::Condition(&ready));
    if (link_->aborted) return absl::UnavailableError("the channel was aborted");
    std::deque<std::string>& q = link_->queue[self_];
    if (static_cast<int64_t>(q.front().size()) > max_bytes) {
      link_->aborted = true;
      return absl::ResourceExhaustedError(
          absl::StrCat("a frame of ", q.front().size(), " bytes exceeds the limit of ", max_bytes));
    }
    *frame = std::move(q.front());
    q.pop_front();
    return absl::OkStatus();
  }

  void Abort() override {
    absl::MutexLock lock(&link_->mu);
    link_->aborted = true;
  }

  std::string kind() const override { return "memory"; }

 private:
  const std::shared_ptr<MemoryLink> link_;
  const int self_;
};

struct Offered {
  absl::Mutex mu;
  absl::flat_hash_map<std::string, std::unique_ptr<FrameChannel>> ends ABSL_GUARDED_BY(mu);
};

Offered& OfferedChannels() {
  static Offered* const offered = new Offered();
  return *offered;
}

}  // namespace

std::pair<std::unique_ptr<FrameChannel>, std::unique_ptr<FrameChannel>> MemoryChannelPair() {
  auto link = std::make_shared<MemoryLink>();
  return {std::make_unique<MemoryEnd>(link, 0), std::make_unique<MemoryEnd>(link, 1)};
}

void OfferMemoryChannel(const std::string& name, std::unique_ptr<FrameChannel> end) {
  Offered& o = OfferedChannels();
  absl::MutexLock lock(&o.mu);
  o.ends[name] = std::move(end);
}

absl::StatusOr<std::unique_ptr<FrameChannel>> TakeMemoryChannel(const std::string& name) {
  Offered& o = OfferedChannels();
  absl::MutexLock lock(&o.mu);
  auto it = o.ends.find(name);
  if (it == o.ends.end()) {
    return absl::NotFoundError(
        absl::StrCat("no memory channel named '", name,
                     "' in this process (memory channels join a coordinator and a worker of "
                     "the same process: tests only)"));
  }
  std::unique_ptr<FrameChannel> end = std::move(it->second);
  o.ends.erase(it);
  return end;
}

}  // namespace moe
