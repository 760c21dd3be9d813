#include "common/compute_backend.h"

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/expert_ffn.h"
#include "common/expert_grouping.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#ifdef MOE_HAVE_CUDA
#include <dlfcn.h>

#include "common/cuda/cuda_experts.h"
#include "common/cuda_plugin.h"
#include "common/plugin_loader.h"
#endif

namespace moe {
namespace {

class CpuRunner : public ExpertRunner {
 public:
  explicit CpuRunner(const ModelWeights* weights) : ffn_(weights) {}
  absl::Status Forward(const ExpertBatch& batch, float* out) override {
    ffn_.Forward(batch, out);
    return absl::OkStatus();
  }

 private:
  ExpertFfn ffn_;
};

class CpuBackend : public ComputeBackend {
 public:
  explicit CpuBackend(const ModelWeights* weights) : weights_(weights) {}
  std::string Describe() const override { return "cpu"; }
  absl::StatusOr<std::unique_ptr<ExpertRunner>> NewRunner() const override {
    return std::make_unique<CpuRunner>(weights_);
  }

 private:
  const ModelWeights* weights_;
};

#ifdef MOE_HAVE_CUDA

class CudaRunnerAdapter : public ExpertRunner {
 public:
  CudaRunnerAdapter(const ModelWeights* weights, std::string device,
                    std::unique_ptr<cuda::CudaRunner> runner)
      : weights_(weights), device_(std::move(device)), runner_(std::move(runner)) {}
  absl::Status Forward(const ExpertBatch& b, float* out) override {
    GroupByExpert(b, weights_->hosted_experts(), &grouping_);
    cuda::GroupedBatch g;
    g.layer = b.layer;
    g.rows = b.rows;
    g.slots = grouping_.slots();
    g.x = b.x;
    g.offsets = b.offsets.data();
    g.expert_begin = grouping_.expert_begin.data();
    g.slot_row = grouping_.slot_row.data();
    g.slot_weight = grouping_.slot_weight.data();
    g.row_slots = grouping_.row_slots.data();
    if (std::string e = runner_->Forward(g, out); !e.empty()) {
      return absl::InternalError(absl::StrCat(device_, ": ", e));
    }
    return absl::OkStatus();
  }

 private:
  const ModelWeights* weights_;
  const std::string device_;
  std::unique_ptr<cuda::CudaRunner> runner_;
  ExpertGrouping grouping_;
};

class CudaBackend : public ComputeBackend {
 public:
  CudaBackend(const ModelWeights* weights, int index, std::unique_ptr<cuda::CudaExperts> experts)
      : weights_(weights),
        index_(index),
        device_(absl::StrCat("cuda:", index)),
        experts_(std::move(experts)) {}
  std::string Describe() const override { return experts_->Describe(); }
  int cuda_device() const override { return index_; }
  absl::StatusOr<std::unique_ptr<ExpertRunner>> NewRunner() const override {
    std::string error;
    std::unique_ptr<cuda::CudaRunner> r = experts_->NewRunner(&error);
    if (r == nullptr) return absl::InternalError(absl::StrCat(device_, ": ", error));
    return std::make_unique<CudaRunnerAdapter>(weights_, device_, std::move(r));
  }

 private:
  const ModelWeights* weights_;
  const int index_;
  const std::string device_;
  std::unique_ptr<cuda::CudaExperts> experts_;
};

absl::StatusOr<cuda::HostMatrix> HostMatrixOf(const WeightMatrix& m, const std::string& what) {
  cuda::HostMatrix h{m.data, cuda::HostType::kBF16, m.rows, m.cols, m.row_stride};
  switch (m.dtype) {
    case DType::kBF16:
      break;
    case DType::kF16:
      h.type = cuda::HostType::kF16;
      break;
    case DType::kF32:
      h.type = cuda::HostType::kF32;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "--device cuda: ", what, " is ", std::string(DTypeName(m.dtype)),
          "; the CUDA backend takes BF16, F16 or F32 experts (quantized models run with "
          "--device cpu)"));
  }
  return h;
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> CreateCuda(const DeviceSpec& spec,
                                                           const ModelWeights* weights) {
  const ModelConfig& c = weights->config();
  const ExpertRange& hosted = weights->hosted_experts();
  std::vector<cuda::HostExpert> experts;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t e = hosted.begin; e < hosted.end; ++e) {
      const ExpertWeights& w = weights->expert(l, e);
      const std::string what = absl::StrCat("layer ", l, " expert ", e);
      cuda::HostExpert h;
      MOE_ASSIGN_OR_RETURN(h.w1, HostMatrixOf(w.w1, what + " w1"));
      MOE_ASSIGN_OR_RETURN(h.w3, HostMatrixOf(w.w3, what + " w3"));
      MOE_ASSIGN_OR_RETURN(h.w2, HostMatrixOf(w.w2, what + " w2"));
      experts.push_back(h);
    }
  }
  const std::string device = spec.ToString();
  uint64_t last_logged = 0;
  const auto progress = [&](uint64_t done, uint64_t total) {
    if (done - last_logged < (uint64_t{1} << 30) && done != total) return;
    last_logged = done;
    LOG(INFO) << device << ": uploaded " << done / (1 << 20) << " / " << total / (1 << 20)
              << " MiB of experts";
  };
  std::string error;
  MOE_ASSIGN_OR_RETURN(const cuda::Api* api, CudaApi());
  std::unique_ptr<cuda::CudaExperts> uploaded =
      api->create(spec.index, c.num_hidden_layers, hosted.size(), c.hidden_size,
                  c.intermediate_size, experts, progress, &error);
  if (uploaded == nullptr) return absl::FailedPreconditionError(error);
  return std::make_unique<CudaBackend>(weights, spec.index, std::move(uploaded));
}

#endif  // MOE_HAVE_CUDA

}  // namespace

std::string DeviceSpec::ToString() const {
  return kind == Kind::kCpu ? "cpu" : absl::StrCat("cuda:", index);
}

absl::StatusOr<DeviceSpec> ParseDevice(absl::string_view spelled) {
  absl::string_view text = spelled;
  DeviceSpec d;
  if (text == "cpu") return d;
  d.kind = DeviceSpec::Kind::kCuda;
  if (text == "cuda") return d;
  if (absl::ConsumePrefix(&text, "cuda:") && absl::SimpleAtoi(text, &d.index) && d.index >= 0 &&
      !text.empty() && text.find_first_not_of("0123456789") == absl::string_view::npos) {
    return d;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device: '", spelled, "' is not a device; use cpu, cuda or cuda:N"));
}

#ifdef MOE_HAVE_CUDA
absl::StatusOr<const cuda::Api*> CudaApi() {
  static const auto* const loaded = [] {
    std::string error;
    using Entry = const cuda::Api* (*)();
    auto entry = reinterpret_cast<Entry>(LoadPluginSymbol(
        "libmoe_cuda.so", MOE_CUDA_BUILD_PATH, MOE_CUDA_API_SYMBOL, RTLD_NOW | RTLD_LOCAL, &error));
    return new absl::StatusOr<const cuda::Api*>(
        entry != nullptr
            ? absl::StatusOr<const cuda::Api*>(entry())
            : absl::FailedPreconditionError("the CUDA backend (libmoe_cuda.so): " + error));
  }();
  return *loaded;
}
#endif  // MOE_HAVE_CUDA

absl::StatusOr<int> CudaDeviceCount() {
#ifdef MOE_HAVE_CUDA
  MOE_ASSIGN_OR_RETURN(const cuda::Api* api, CudaApi());
  int count = 0;
  if (std::string e = api->device_count(&count); !e.empty()) {
    return absl::FailedPreconditionError(e);
  }
  return count;
#else
  return absl::FailedPreconditionError("this build has no CUDA backend");
#endif
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> CreateComputeBackend(const DeviceSpec& device,
                                                                     const ModelWeights* weights) {
  if (device.kind == DeviceSpec::Kind::kCpu) return std::make_unique<CpuBackend>(weights);
#ifdef MOE_HAVE_CUDA
  return CreateCuda(device, weights);
#else
  return absl::FailedPreconditionError(absl::StrCat(
      "--device ", device.ToString(),
      ": this build has no CUDA backend; build with scripts/build.sh -DMOE_ENABLE_CUDA=ON on a "
      "machine with the CUDA toolkit, or use --device cpu"));
#endif
}

}  // namespace moe
