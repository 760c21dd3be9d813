// A small HTTP/1.1 server for the coordinator's OpenAI-compatible API, on Boost.Beast/Asio.
//
// One I/O thread accepts connections and reads requests asynchronously, so an idle or slow
// connection costs a socket and a small buffer, never a thread: 10 k idle keep-alive
// connections do not keep a request from being served. A complete request goes to a bounded
// pool of handler threads (handlers may block for a whole generation); when every thread is
// busy and the queue is full the request is answered 503 at once. The handler's response is
// written by its thread with a deadline, either whole (Content-Length) or as a stream of chunks
// (Transfer-Encoding: chunked, for server-sent events).
//
// Limits (HttpServerOptions): request body size (413 before the body is read), header size
// (431), the time to receive one request (the connection is closed), idle keep-alive time,
// concurrent connections (beyond it new ones are closed at once).
#ifndef MOE_COORDINATOR_HTTP_SERVER_H_
#define MOE_COORDINATOR_HTTP_SERVER_H_

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moe {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // without the query string
  std::string body;
  std::string authorization;  // the Authorization header, "" when absent
  std::string peer;           // the client's IP address
  // True once the client closed its connection (or the server is shutting down): a handler
  // that waits long should check it and give up.
  std::function<bool()> client_gone = [] { return false; };
};

// Writes one chunk of a streamed response; false once the client is gone (stop then).
using ChunkWriter = std::function<bool(std::string_view chunk)>;

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  // When set, the response is streamed: status and headers are sent, then `stream` is called
  // (on the handler's thread) to write the chunks; `body` is ignored.
  std::function<void(const ChunkWriter& write)> stream;
};

using HttpHandler = std::function<HttpResponse(const HttpRequest& request)>;

struct HttpServerOptions {
  size_t max_body_bytes = size_t{8} << 20;
  size_t max_header_bytes = size_t{64} << 10;
  int handler_threads = 64;
  size_t max_queued = 256;           // complete requests waiting for a handler thread
  size_t max_connections = 100'000;  // open connections (also bounded by RLIMIT_NOFILE)
  absl::Duration read_timeout = absl::Seconds(30);   // to receive one whole request
  absl::Duration idle_timeout = absl::Seconds(120);  // keep-alive wait for the next request
  absl::Duration write_timeout = absl::Seconds(60);  // to send one response (or chunk)
  // PEM certificate chain and private key: serve HTTPS (TLS 1.2+). Empty: plain HTTP.
  std::string tls_cert_file;
  std::string tls_key_file;
};

class HttpServer {
 public:
  // Binds `listen` (HOST:PORT; port 0 picks a free one) and starts serving `handler`.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& listen,
                                                           const HttpServerOptions& options,
                                                           HttpHandler handler);
  ~HttpServer();  // Shutdown()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // HOST:PORT actually bound.
  const std::string& address() const;
  // Waits until no request is queued or being handled (responses written), or `deadline`;
  // false on the deadline. New requests are still served meanwhile.
  bool WaitUntilIdle(absl::Time deadline);
  // Stops accepting, tells running handlers their clients are gone, waits for them, closes every
  // connection. Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe

#endif  // MOE_COORDINATOR_HTTP_SERVER_H_
