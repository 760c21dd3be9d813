// A frame channel: an ordered, reliable, bidirectional channel of byte frames between the
// coordinator and one expert worker, used as the data path instead of the gRPC Forward stream
// where something faster connects them: NCCL between GPUs (one two-rank communicator per
// coordinator-worker pair, see nccl_channel.h), or an in-memory pair between two objects of one
// process (tests). The frames are the same serialized ForwardRequest / ForwardResponse messages
// the gRPC stream carries, so both sides validate them exactly as they do over gRPC.
//
// Each direction is used by one thread at a time (the coordinator's I/O thread for a worker, the
// worker's serving thread); Abort may be called from any thread.
#ifndef MOE_COMMON_FRAME_CHANNEL_H_
#define MOE_COMMON_FRAME_CHANNEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moe {

class FrameChannel {
 public:
  virtual ~FrameChannel() = default;
  // Sends `frame`; returns once the bytes are handed over (NCCL: received by the peer), or
  // UNAVAILABLE when the channel failed or was aborted.
  virtual absl::Status Send(const std::string& frame) = 0;
  // Receives the next frame into *frame, blocking until one arrives or the channel fails or is
  // aborted (UNAVAILABLE). A frame announced longer than `max_bytes` is refused
  // (RESOURCE_EXHAUSTED) before any of it is received, and the channel is then unusable.
  virtual absl::Status Receive(int64_t max_bytes, std::string* frame) = 0;
  // From any thread: makes pending and later Send/Receive fail with UNAVAILABLE (NCCL: aborts
  // the communicator), on both ends where the channel can tell the peer.
  virtual void Abort() = 0;
  // "nccl" or "memory": what the status API shows as the worker's transport.
  virtual std::string kind() const = 0;
};

// Two connected ends: what one Sends the other Receives. Aborting either aborts both.
std::pair<std::unique_ptr<FrameChannel>, std::unique_ptr<FrameChannel>> MemoryChannelPair();

// In-process hand-over of a memory channel's end by name (how a test coordinator gives a worker
// in the same process its end through the OpenChannel RPC). Take returns NOT_FOUND for a name
// never offered or already taken.
void OfferMemoryChannel(const std::string& name, std::unique_ptr<FrameChannel> end);
absl::StatusOr<std::unique_ptr<FrameChannel>> TakeMemoryChannel(const std::string& name);

}  // namespace moe

#endif  // MOE_COMMON_FRAME_CHANNEL_H_
