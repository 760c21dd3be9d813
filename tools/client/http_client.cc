#include "tools/client/http_client.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moe {

namespace {

// A connected socket to HOST:PORT, or -1 with *error set.
int Connect(const std::string& server, std::string* error) {
  std::string address = server;
  if (absl::StartsWith(address, "http://")) address = address.substr(7);
  while (!address.empty() && address.back() == '/') address.pop_back();
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    *error = absl::StrCat("--server must be HOST:PORT, got \"", server, "\"");
    return -1;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string host = address.substr(0, colon), port = address.substr(colon + 1);
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    *error = absl::StrCat("cannot resolve ", address, ": ", gai_strerror(rc));
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      *error = absl::StrCat("cannot connect to ", address, ": ", std::strerror(errno));
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  return fd;
}

}  // namespace

absl::StatusOr<HttpAnswer> HttpPostJson(const std::string& server, const std::string& path,
                                        const std::string& body,
                                        const std::function<bool(const std::string&)>& on_event,
                                        const std::string& api_token, absl::Duration timeout) {
  std::string error;
  const int fd = Connect(server, &error);
  if (fd < 0) return absl::UnavailableError(error);
  const std::string request = absl::StrCat(
      "POST ", path, " HTTP/1.1\r\nHost: ", server,
      "\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: ", body.size(),
      api_token.empty() ? "" : absl::StrCat("\r\nAuthorization: Bearer ", api_token),
      "\r\nConnection: close\r\n\r\n", body);
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      close(fd);
      return absl::UnavailableError(absl::StrCat("sending to ", server, " failed"));
    }
    sent += static_cast<size_t>(n);
  }
  HttpAnswer answer;
  std::string raw;      // bytes not parsed yet
  std::string payload;  // de-chunked body not yet split into events
  bool headers = false, chunked = false, done = false, stopped = false;
  size_t chunk_left = 0;  // bytes of the current chunk still to come
  char buf[16384];
  absl::Status status;
  while (!done) {
    pollfd p{fd, POLLIN, 0};
    const int ready = poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
    if (ready == 0) {
      status = absl::DeadlineExceededError(absl::StrCat(server, " did not answer in time"));
      break;
    }
    const ssize_t n = ready < 0 ? -1 : read(fd, buf, sizeof(buf));
    if (n <= 0) break;  // closed: the body ends here
    raw.append(buf, static_cast<size_t>(n));
    if (!headers) {
      const size_t end = raw.find("\r\n\r\n");
      if (end == std::string::npos) continue;
      if (!absl::StartsWith(raw, "HTTP/1.")) {
        status = absl::InternalError(absl::StrCat(server, " does not speak HTTP"));
        break;
      }
      answer.status = std::atoi(raw.c_str() + 9);
      chunked = absl::StrContains(absl::AsciiStrToLower(raw.substr(0, end)),
                                  "transfer-encoding: chunked");
      raw.erase(0, end + 4);
      headers = true;
    }
    if (!chunked) {
      payload += raw;
      raw.clear();
    } else {
      while (!raw.empty()) {
        if (chunk_left > 0) {
          const size_t take = std::min(chunk_left, raw.size());
          payload.append(raw, 0, take);
          raw.erase(0, take);
          chunk_left -= take;
          continue;
        }
        const size_t line = raw.find("\r\n");
        if (line == std::string::npos) break;
        if (line == 0) {  // the CRLF after a chunk
          raw.erase(0, 2);
          continue;
        }
        chunk_left = std::strtoul(raw.c_str(), nullptr, 16);
        raw.erase(0, line + 2);
        if (chunk_left == 0) {
          done = true;
          break;
        }
      }
    }
    if (on_event && answer.status == 200) {
      for (size_t end; !stopped && (end = payload.find("\n\n")) != std::string::npos;) {
        std::string event = payload.substr(0, end);
        payload.erase(0, end + 2);
        if (absl::StartsWith(event, "data: ") && !on_event(event.substr(6))) stopped = true;
      }
      if (stopped) done = true;
    }
  }
  close(fd);
  if (!status.ok()) return status;
  if (!headers) return absl::UnavailableError(absl::StrCat(server, " closed the connection"));
  if (!on_event || answer.status != 200) answer.body = std::move(payload);
  return answer;
}

std::string HttpErrorMessage(const HttpAnswer& answer) {
  const nlohmann::json j = nlohmann::json::parse(answer.body, nullptr, false);
  if (j.is_object() && j.contains("error") && j["error"].is_object() &&
      j["error"].value("message", nlohmann::json()).is_string()) {
    return absl::StrCat("HTTP ", answer.status, ": ", j["error"]["message"].get<std::string>());
  }
  return absl::StrCat("HTTP ", answer.status, ": ", answer.body.substr(0, 500));
}

}  // namespace moe
