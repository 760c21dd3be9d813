// Frame channels as the data path of GrpcTransport: the NCCL transport. A worker whose
// WorkerInfo.channels offer a kind the coordinator's ChannelFactory accepts is reached over a
// frame channel (frame_channel.h) instead of its gRPC Forward stream; everything else stays as
// over gRPC — GetInfo, health probes, reconnects, the dispatch module's replica choice, deadlines
// and failover — so GPU workers over NCCL and CPU workers over gRPC mix in one cluster with one
// placement.
//
// NCCL: the coordinator (on its own GPU, --nccl-device) makes a unique id per worker, sends it in
// OpenChannel, and both join a two-rank communicator; each layer exchange is then the serialized
// request frame (its row count and byte size first, then the rows, BF16 by default) and the
// answer frame back. The dispatch/combine bookkeeping (which rows, in which order, added back how)
// is the dispatch module's, shared with the other transports and tested there bit for bit.
#ifndef MOE_COORDINATOR_TRANSPORT_NCCL_TRANSPORT_H_
#define MOE_COORDINATOR_TRANSPORT_NCCL_TRANSPORT_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/frame_channel.h"

namespace moe {

// What the OpenChannel RPC asks of a worker.
struct ChannelRequest {
  std::string kind;
  std::string nccl_unique_id;
  std::string memory_name;
};

class ChannelFactory {
 public:
  virtual ~ChannelFactory() = default;
  // The kind this factory opens ("nccl", "memory").
  virtual std::string kind() const = 0;
  // Whether a worker offering `offered` (its WorkerInfo.channels) gets a channel.
  virtual bool Accepts(const std::vector<std::string>& offered) const = 0;
  // Whether --wire-dtype auto means BF16 on these channels.
  virtual bool Bf16ByDefault() const = 0;
  // Opens a channel: `ask_worker` sends the worker its OpenChannel request; then this side
  // joins. Thread-safe.
  virtual absl::StatusOr<std::unique_ptr<FrameChannel>> Open(
      const std::function<absl::Status(const ChannelRequest&)>& ask_worker) = 0;
};

// NCCL channels with the coordinator's end on CUDA device `device`.
std::unique_ptr<ChannelFactory> NcclChannelFactory(int device,
                                                   absl::Duration timeout = absl::Seconds(20));

// In-process channels (tests): the worker's end is offered under a fresh name. Accepts every
// worker (a worker in this process always takes memory channels); f32 by default, so the
// results equal the in-process transport's bit for bit.
std::unique_ptr<ChannelFactory> MemoryChannelFactory();

}  // namespace moe

#endif  // MOE_COORDINATOR_TRANSPORT_NCCL_TRANSPORT_H_
