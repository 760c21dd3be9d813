#include "common/nccl_channel.h"

#include <utility>

#include "absl/strings/str_cat.h"
#ifdef MOE_HAVE_CUDA
#include "common/cuda_plugin.h"
#include "common/status_macros.h"
#endif

namespace moe {

#ifdef MOE_HAVE_CUDA
namespace {

class NcclChannel final : public FrameChannel {
 public:
  explicit NcclChannel(std::unique_ptr<cuda::NcclLink> link) : link_(std::move(link)) {}

  absl::Status Send(const std::string& frame) override {
    std::string e = link_->Send(frame);
    return e.empty() ? absl::OkStatus() : absl::UnavailableError(absl::StrCat("NCCL: ", e));
  }

  absl::Status Receive(int64_t max_bytes, std::string* frame) override {
    bool too_large = false;
    std::string e = link_->Receive(max_bytes, frame, &too_large);
    if (e.empty()) return absl::OkStatus();
    return too_large ? absl::ResourceExhaustedError(absl::StrCat("NCCL: ", e))
                     : absl::UnavailableError(absl::StrCat("NCCL: ", e));
  }

  void Abort() override { link_->Abort(); }
  std::string kind() const override { return "nccl"; }

 private:
  const std::unique_ptr<cuda::NcclLink> link_;
};

}  // namespace

absl::StatusOr<std::string> NewNcclUniqueId() {
  MOE_ASSIGN_OR_RETURN(const cuda::Api* api, CudaApi());
  std::string id;
  if (std::string e = api->nccl_unique_id(&id); !e.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("NCCL: ", e));
  }
  return id;
}

absl::StatusOr<std::unique_ptr<FrameChannel>> ConnectNcclChannel(const std::string& id, int rank,
                                                                 int device,
                                                                 absl::Duration timeout) {
  MOE_ASSIGN_OR_RETURN(const cuda::Api* api, CudaApi());
  std::string error;
  std::unique_ptr<cuda::NcclLink> link =
      api->nccl_connect(id, rank, device, absl::ToInt64Milliseconds(timeout), &error);
  if (link == nullptr) return absl::UnavailableError(absl::StrCat("NCCL: ", error));
  return std::make_unique<NcclChannel>(std::move(link));
}

#else  // !MOE_HAVE_CUDA

namespace {
absl::Status NoNccl() {
  return absl::FailedPreconditionError(
      "this build has no NCCL channels: build with scripts/build.sh -DMOE_ENABLE_CUDA=ON on a "
      "machine with the CUDA toolkit and NCCL");
}
}  // namespace

absl::StatusOr<std::string> NewNcclUniqueId() { return NoNccl(); }

absl::StatusOr<std::unique_ptr<FrameChannel>> ConnectNcclChannel(const std::string&, int, int,
                                                                 absl::Duration) {
  return NoNccl();
}

#endif  // MOE_HAVE_CUDA

}  // namespace moe
