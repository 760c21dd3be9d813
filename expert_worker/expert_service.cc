#include "expert_worker/expert_service.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/nccl_channel.h"
#include "common/rpc/rpc_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"

namespace moe {
namespace {

namespace pb = moecluster::v1;

// Counts itself in `*n` while it lives.
class Counted {
 public:
  explicit Counted(std::atomic<int>* n) : n_(n) { ++*n_; }
  ~Counted() { --*n_; }
  Counted(const Counted&) = delete;
  Counted& operator=(const Counted&) = delete;

 private:
  std::atomic<int>* n_;
};

// One Forward stream's compute and buffers (see the class comment on ExpertService).
class StreamState {
 public:
  StreamState(const ModelWeights* weights, int64_t max_rows, std::unique_ptr<ExpertRunner> runner)
      : weights_(weights),
        max_rows_(max_rows),
        runner_(std::move(runner)),
        hidden_(weights->config().hidden_size),
        // Never empty, so data() is never null even for a step of 0 rows.
        x_(hidden_),
        out_(hidden_),
        last_row_(weights->hosted_experts().size()),
        rows_per_expert_(weights->hosted_experts().size()) {}

  // Rows per hosted expert of the last successful Decode.
  std::span<const int64_t> rows_per_expert() const { return rows_per_expert_; }

  // The one check of a ForwardRequest: every field of `req` against the service's contract
  // (which makes the batch well-formed in ExpertBatch's sense). When all pass, points batch_
  // at its rows (copied to an aligned buffer) and its (expert, weight) pairs. `req` must
  // outlive Run().
  absl::Status Decode(const pb::ForwardRequest& req) {
    const int64_t layers = weights_->config().num_hidden_layers;
    if (req.layer() < 0 || req.layer() >= layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", req.layer(), " is out of range [0, ", layers, ")"));
    }
    int64_t rows = 0;
    absl::Status s = DecodeHidden(req.hidden(), &rows);
    if (s.ok()) s = CheckRowOffsets(req, rows);
    if (s.ok()) s = DecodeAssignments(req, rows);
    if (!s.ok()) return s;
    batch_.layer = req.layer();
    batch_.rows = rows;
    batch_.x = x_.data();
    batch_.offsets = std::span<const int32_t>(req.row_offsets().data(), rows + 1);
    batch_.assignments = std::span<const ExpertAssignment>(assignments_.data(), req.experts_size());
    return absl::OkStatus();
  }

  // Computes the batch of the last successful Decode into `response`; the device's error when
  // it fails.
  absl::Status Run(uint64_t step, pb::ForwardResponse* response) {
    out_.resize(static_cast<size_t>(batch_.rows * hidden_));
    MOE_RETURN_IF_ERROR(runner_->Forward(batch_, out_.data()));  // out: [rows, hidden]
    response->set_step(step);
    // Answered in the request's wire dtype (F32, or BF16 rounded to nearest even).
    EncodeRowsTensor(out_.data(), batch_.rows, hidden_, wire_dtype_, response->mutable_output());
    return absl::OkStatus();
  }

 private:
  // hidden: [rows, hidden_size] F32 or BF16. Rows are bounded before any size is computed from
  // them.
  absl::Status DecodeHidden(const pb::Tensor& t, int64_t* rows) {
    if (t.shape_size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("hidden: shape must be [rows, ", hidden_,
                                                     "], got ", t.shape_size(), " dimensions"));
    }
    *rows = t.shape(0);
    if (*rows < 0 || *rows > max_rows_) {
      return absl::InvalidArgumentError(absl::StrCat("hidden: shape[0] = ", *rows,
                                                     " rows is outside [0, ", max_rows_,
                                                     "] (the worker's --max-forward-rows)"));
    }
    if (absl::Status s = CheckRowsTensor(t, *rows, hidden_, "hidden"); !s.ok()) return s;
    // Protobuf does not promise float alignment of bytes fields: copy (BF16 widens exactly).
    x_.resize(static_cast<size_t>(*rows * hidden_));
    DecodeRowsTensor(t, x_.data());
    wire_dtype_ = t.dtype();
    return absl::OkStatus();
  }

  // row_offsets: rows + 1 entries, 0 first, non-decreasing, experts_size last.
  static absl::Status CheckRowOffsets(const pb::ForwardRequest& req, int64_t rows) {
    const auto& off = req.row_offsets();
    if (off.size() != rows + 1) {
      return absl::InvalidArgumentError(absl::StrCat("row_offsets: expected rows + 1 = ", rows + 1,
                                                     " entries for ", rows, " hidden rows, got ",
                                                     off.size()));
    }
    if (off[0] != 0) {
      return absl::InvalidArgumentError(absl::StrCat("row_offsets[0] must be 0, got ", off[0]));
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (off[r + 1] < off[r]) {
        return absl::InvalidArgumentError(
            absl::StrCat("row_offsets decrease at row ", r, ": ", off[r], " then ", off[r + 1]));
      }
    }
    if (off[rows] != req.experts_size()) {
      return absl::InvalidArgumentError(absl::StrCat("row_offsets[", rows, "] = ", off[rows],
                                                     " must equal experts_size ",
                                                     req.experts_size()));
    }
    return absl::OkStatus();
  }

  // experts/weights: equal sizes, hosted experts, finite weights, each expert once per row.
  // REQUIRES: CheckRowOffsets(req, rows).ok().
  absl::Status DecodeAssignments(const pb::ForwardRequest& req, int64_t rows) {
    if (req.experts_size() != req.weights_size()) {
      return absl::InvalidArgumentError(absl::StrCat("experts_size ", req.experts_size(),
                                                     " != weights_size ", req.weights_size()));
    }
    const ExpertRange& hosted = weights_->hosted_experts();
    const int64_t begin = hosted.begin;
    if (assignments_.size() < static_cast<size_t>(req.experts_size())) {
      assignments_.resize(req.experts_size());
    }
    // last_row_[e - begin]: the last row that listed expert e; O(1) duplicate check per pair.
    std::fill(last_row_.begin(), last_row_.end(), -1);
    std::fill(rows_per_expert_.begin(), rows_per_expert_.end(), 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int32_t i = req.row_offsets(r); i < req.row_offsets(r + 1); ++i) {
        const int32_t e = req.experts(i);
        const float w = req.weights(i);
        if (!weights_->HostsExpert(e)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "experts[", i, "] = ", e, " is not hosted here (this worker hosts experts ",
              hosted.InclusiveSpelling(), ")"));
        }
        if (!std::isfinite(w)) {
          return absl::InvalidArgumentError(
              absl::StrCat("weights[", i, "] = ", w, " (expert ", e, ") is not finite"));
        }
        if (last_row_[e - begin] == r) {
          return absl::InvalidArgumentError(absl::StrCat("experts: row ", r, " lists expert ", e,
                                                         " more than once (experts[", i, "])"));
        }
        last_row_[e - begin] = r;
        ++rows_per_expert_[e - begin];
        assignments_[i] = {e, w};
      }
    }
    return absl::OkStatus();
  }

  const ModelWeights* weights_;
  const int64_t max_rows_;  // per request
  const std::unique_ptr<ExpertRunner> runner_;
  const int64_t hidden_;
  pb::DType wire_dtype_ = pb::DTYPE_F32;       // of the last request's rows
  std::vector<float> x_;                       // [rows, hidden], aligned copy of the request's
  std::vector<float> out_;                     // [rows, hidden]
  std::vector<ExpertAssignment> assignments_;  // [experts_size]
  std::vector<int64_t> last_row_;              // [hosted experts]
  std::vector<int64_t> rows_per_expert_;       // [hosted experts]
  ExpertBatch batch_;
};

}  // namespace

ExpertService::ExpertService(const ModelWeights* weights, const ComputeBackend* backend,
                             std::string fingerprint, int threads, int64_t max_rows,
                             int max_streams, ForwardObserver* observer)
    : weights_(weights),
      backend_(backend),
      fingerprint_(std::move(fingerprint)),
      threads_(threads),
      observer_(observer),
      max_rows_(max_rows),
      max_streams_(max_streams) {}

grpc::Status ExpertService::GetInfo(grpc::ServerContext*, const pb::GetInfoRequest*,
                                    pb::WorkerInfo* info) {
  const ModelConfig& c = weights_->config();
  info->set_model_fingerprint(fingerprint_);
  info->set_num_layers(static_cast<int32_t>(c.num_hidden_layers));
  info->set_num_experts(static_cast<int32_t>(c.num_local_experts));
  info->set_hidden_size(static_cast<int32_t>(c.hidden_size));
  info->set_expert_begin(static_cast<int32_t>(weights_->hosted_experts().begin));
  info->set_expert_end(static_cast<int32_t>(weights_->hosted_experts().end));
  info->set_weight_dtype(ToProtoDType(weights_->dtype()));
  info->set_draining(draining_);
  info->set_max_rows(max_rows_);
  info->set_device(backend_->Describe());
  for (const std::string& kind : ChannelKinds()) info->add_channels(kind);
  return grpc::Status::OK;
}

bool ExpertService::WaitUntilQuiet(absl::Duration quiet, absl::Time deadline) const {
  // Polls: this runs once, at shutdown, and a condition variable on the hot path would cost
  // every request a lock.
  while (true) {
    const absl::Time now = absl::Now();
    // No coordinator connected: nothing to move away. Else a quiet spell.
    if (streams_ == 0) return true;
    if (in_request_ == 0 && now - absl::FromUnixNanos(last_request_ns_) >= quiet) return true;
    if (now >= deadline) return false;
    absl::SleepFor(std::min(absl::Milliseconds(20), deadline - now));
  }
}

// Where a Forward exchange's messages come from and go to: the gRPC stream or a frame channel.
class ExpertService::ForwardIo {
 public:
  virtual ~ForwardIo() = default;
  // False when the peer has finished (or the transport failed).
  virtual bool Read(pb::ForwardRequest* request) = 0;
  virtual bool Write(const pb::ForwardResponse& response) = 0;
};

namespace {

class GrpcForwardIo final : public ExpertService::ForwardIo {
 public:
  explicit GrpcForwardIo(grpc::ServerReaderWriter<pb::ForwardResponse, pb::ForwardRequest>* stream)
      : stream_(stream) {}
  bool Read(pb::ForwardRequest* request) override { return stream_->Read(request); }
  bool Write(const pb::ForwardResponse& response) override { return stream_->Write(response); }

 private:
  grpc::ServerReaderWriter<pb::ForwardResponse, pb::ForwardRequest>* stream_;
};

// Each message one frame. `error` keeps why the exchange ended.
class ChannelForwardIo final : public ExpertService::ForwardIo {
 public:
  ChannelForwardIo(FrameChannel* channel, int64_t max_bytes)
      : channel_(channel), max_bytes_(max_bytes) {}
  bool Read(pb::ForwardRequest* request) override {
    error = channel_->Receive(max_bytes_, &frame_);
    if (!error.ok()) return false;
    if (!request->ParseFromString(frame_)) {
      error = absl::InvalidArgumentError("a frame that is not a ForwardRequest");
      return false;
    }
    return true;
  }
  bool Write(const pb::ForwardResponse& response) override {
    response.SerializeToString(&frame_);
    error = channel_->Send(frame_);
    return error.ok();
  }
  absl::Status error;

 private:
  FrameChannel* channel_;
  const int64_t max_bytes_;
  std::string frame_;
};

}  // namespace

grpc::Status ExpertService::Forward(
    grpc::ServerContext*,
    grpc::ServerReaderWriter<pb::ForwardResponse, pb::ForwardRequest>* stream) {
  // Each open stream holds a server thread: beyond max_streams_, refuse.
  const Counted open_stream(&streams_);
  if (streams_ > max_streams_) {
    return StreamLimit();
  }
  GrpcForwardIo io(stream);
  return ToGrpcStatus(Serve(&io));
}

absl::Status ExpertService::Serve(ForwardIo* io) {
  // OpenMP's team size is a per-thread setting; this is the thread that computes the stream.
  if (threads_ > 0) omp_set_num_threads(threads_);
  MOE_ASSIGN_OR_RETURN(std::unique_ptr<ExpertRunner> runner, backend_->NewRunner());
  StreamState state(weights_, max_rows_, std::move(runner));
  pb::ForwardRequest request;
  pb::ForwardResponse response;
  while (io->Read(&request)) {
    const Counted computing(&in_request_);
    last_request_ns_ = absl::GetCurrentTimeNanos();
    const auto start = std::chrono::steady_clock::now();
    absl::Status s = state.Decode(request);
    if (s.ok()) s = state.Run(request.step(), &response);
    if (!s.ok()) {
      if (s.code() != absl::StatusCode::kInvalidArgument) {
        LOG(ERROR) << "step " << request.step() << ": " << s;
      }
      return absl::Status(s.code(),
                          absl::StrCat("step ", request.step(), ": ", std::string(s.message())));
    }
    if (observer_ != nullptr) {
      observer_->OnForward(
          request.layer(), state.rows_per_expert(),
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    if (!io->Write(response)) {
      return absl::CancelledError("the client closed the Forward stream");
    }
  }
  return absl::OkStatus();
}

grpc::Status ExpertService::StreamLimit() const {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::StrCat("this worker serves at most ", max_streams_,
                                   " Forward streams and channels at once (--max-streams)"));
}

std::vector<std::string> ExpertService::ChannelKinds() const {
  if (backend_->cuda_device() >= 0) return {"nccl"};
  return {};
}

grpc::Status ExpertService::OpenChannel(grpc::ServerContext*, const pb::OpenChannelRequest* request,
                                        pb::OpenChannelResponse*) {
  const std::string& kind = request->kind();
  const int device = backend_->cuda_device();
  if (kind == "nccl") {
    if (device < 0) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this worker's experts are on the CPU (--device cpu): no NCCL channel");
    }
    if (request->nccl_unique_id().size() != kNcclUniqueIdBytes) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("nccl_unique_id must have ", kNcclUniqueIdBytes,
                                       " bytes, got ", request->nccl_unique_id().size()));
    }
  } else if (kind != "memory") {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("unknown channel kind '", kind, "' (nccl or memory)"));
  }
  std::unique_ptr<FrameChannel> memory_end;
  if (kind == "memory") {
    absl::StatusOr<std::unique_ptr<FrameChannel>> taken = TakeMemoryChannel(request->memory_name());
    if (!taken.ok()) return ToGrpcStatus(taken.status());
    memory_end = std::move(*taken);
  }
  absl::MutexLock lock(&channels_mu_);
  if (channels_stopped_) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker is shutting down");
  }
  // Finished channels' threads end by themselves: join them here.
  for (auto it = channels_.begin(); it != channels_.end();) {
    if ((*it)->finished) {
      (*it)->thread.join();
      it = channels_.erase(it);
    } else {
      ++it;
    }
  }
  // A channel holds a serving thread as a stream does.
  if (streams_ >= max_streams_) {
    return StreamLimit();
  }
  ++streams_;
  auto c = std::make_unique<Channel>();
  Channel* raw = c.get();
  const std::string id = request->nccl_unique_id();
  raw->thread = std::thread([this, raw, id, device, memory = std::move(memory_end)]() mutable {
    absl::StatusOr<std::unique_ptr<FrameChannel>> channel =
        memory != nullptr ? absl::StatusOr<std::unique_ptr<FrameChannel>>(std::move(memory))
                          : ConnectNcclChannel(id, /*rank=*/1, device, absl::Seconds(20));
    absl::Status s = channel.status();
    if (channel.ok()) {
      if (raw->Attach(channel->get())) {
        LOG(INFO) << "serving a " << (*channel)->kind() << " channel";
        ChannelForwardIo io(channel->get(), MaxForwardMessageBytes(weights_->config(), max_rows_));
        s = Serve(&io);
        if (s.ok()) s = io.error;
      }
      raw->Attach(nullptr);
    }
    LOG(INFO) << "channel closed: " << s;
    --streams_;
    absl::MutexLock lock(&channels_mu_);
    raw->finished = true;
  });
  channels_.push_back(std::move(c));
  return grpc::Status::OK;
}

bool ExpertService::Channel::Attach(FrameChannel* c) {
  absl::MutexLock lock(&mu);
  if (c != nullptr && aborted) return false;
  channel = c;
  return true;
}

void ExpertService::Channel::Abort() {
  absl::MutexLock lock(&mu);
  aborted = true;
  if (channel != nullptr) channel->Abort();
}

void ExpertService::StopChannels() {
  std::vector<std::unique_ptr<Channel>> channels;
  {
    absl::MutexLock lock(&channels_mu_);
    channels_stopped_ = true;
    channels.swap(channels_);
  }
  for (auto& c : channels) c->Abort();
  for (auto& c : channels) c->thread.join();
}

ExpertService::~ExpertService() { StopChannels(); }

}  // namespace moe
