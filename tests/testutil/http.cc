#include "tests/testutil/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <sstream>

namespace moe::testing {

int ConnectTcp(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return -1;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(std::atoi(address.c_str() + colon + 1)));
  if (inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr) != 1) return -1;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string HttpExchange(const std::string& address, const std::string& request) {
  const int fd = ConnectTcp(address);
  if (fd < 0) return "";
  std::string out;
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = write(fd, request.data() + sent, request.size() - sent);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, n);
  close(fd);
  return out;
}

std::string HttpGet(const std::string& address, const std::string& path) {
  return HttpExchange(
      address, "GET " + path + " HTTP/1.1\r\nHost: " + address + "\r\nConnection: close\r\n\r\n");
}

std::string HttpPost(const std::string& address, const std::string& path, const std::string& body) {
  return HttpExchange(address, "POST " + path + " HTTP/1.1\r\nHost: " + address +
                                   "\r\nContent-Type: application/json\r\nContent-Length: " +
                                   std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" +
                                   body);
}

HttpReply ParseHttpReply(const std::string& raw) {
  HttpReply reply;
  const size_t head_end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.1 ", 0) != 0 || head_end == std::string::npos) return reply;
  reply.status = std::atoi(raw.c_str() + 9);
  reply.headers = raw.substr(0, head_end + 2);
  const std::string rest = raw.substr(head_end + 4);
  if (reply.headers.find("Transfer-Encoding: chunked") == std::string::npos) {
    reply.body = rest;
    return reply;
  }
  for (size_t pos = 0;;) {
    const size_t line_end = rest.find("\r\n", pos);
    if (line_end == std::string::npos) break;
    const size_t size = std::strtoul(rest.c_str() + pos, nullptr, 16);
    if (size == 0) {
      reply.complete_chunks = true;
      break;
    }
    reply.body += rest.substr(line_end + 2, size);
    pos = line_end + 2 + size + 2;
  }
  return reply;
}

std::map<std::string, double> ParseMetricsText(const std::string& body) {
  std::map<std::string, double> out;
  std::istringstream in(body.substr(std::min(body.size(), body.find("\r\n\r\n") + 4)));
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    if (space == std::string::npos) continue;
    out[line.substr(0, space)] = std::strtod(line.c_str() + space + 1, nullptr);
  }
  return out;
}

}  // namespace moe::testing
