#include "coordinator/client_limit.h"

#include "absl/strings/str_cat.h"

namespace moe {

absl::Status ClientLimit::Acquire(const std::string& client, std::unique_ptr<Slot>* slot) {
  if (max_ > 0) {
    absl::MutexLock lock(&mu_);
    int& open = open_[client];
    if (open >= max_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "client ", client, " already has ", open,
          " generation requests open (--max-streams-per-client ", max_, "); retry when one ends"));
    }
    ++open;
  }
  slot->reset(new Slot(this, client));
  return absl::OkStatus();
}

void ClientLimit::Release(const std::string& client) {
  if (max_ <= 0) return;
  absl::MutexLock lock(&mu_);
  auto it = open_.find(client);
  if (it != open_.end() && --it->second <= 0) open_.erase(it);
}

std::string ClientLimit::HostOf(const std::string& peer) {
  const size_t colon = peer.rfind(':');
  std::string host = colon == std::string::npos ? peer : peer.substr(0, colon);
  if (host.rfind("ipv4:", 0) == 0 || host.rfind("ipv6:", 0) == 0) host = host.substr(5);
  return host;
}

}  // namespace moe
