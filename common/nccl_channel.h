// Frame channels over NCCL (frame_channel.h): one two-rank communicator per coordinator-worker
// pair, rank 0 the coordinator, rank 1 the worker, each on its own GPU. The coordinator makes the
// unique id and sends it to the worker in the OpenChannel RPC; both then join. One communicator
// per pair (not one for the whole cluster) keeps a worker's failure to its own channel: the
// coordinator aborts that communicator and fails the worker over as it does over gRPC, while the
// other workers' channels carry on. Needs the CUDA build with NCCL; FAILED_PRECONDITION
// otherwise.
#ifndef MOE_COMMON_NCCL_CHANNEL_H_
#define MOE_COMMON_NCCL_CHANNEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/frame_channel.h"

namespace moe {

// A new ncclUniqueId, as bytes.
absl::StatusOr<std::string> NewNcclUniqueId();

// Joins communicator `id` as `rank` (0 or 1) on CUDA device `device`; returns once the peer has
// joined too, or UNAVAILABLE after `timeout` or on NCCL's error.
absl::StatusOr<std::unique_ptr<FrameChannel>> ConnectNcclChannel(const std::string& id, int rank,
                                                                 int device,
                                                                 absl::Duration timeout);

}  // namespace moe

#endif  // MOE_COMMON_NCCL_CHANNEL_H_
