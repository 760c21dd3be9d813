#include "coordinator/http_server.h"

#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <deque>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "boost/asio.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"
#include "boost/beast/ssl.hpp"
#include "glog/logging.h"

namespace moe {

namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

std::string StatusLine(int status) {
  const auto reason = http::obsolete_reason(http::int_to_status(static_cast<unsigned>(status)));
  return absl::StrCat("HTTP/1.1 ", status, " ", std::string(reason.data(), reason.size()), "\r\n");
}

// An error response in OpenAI's shape for what the transport itself refuses.
std::string ErrorReply(int status, const std::string& message, bool keep_alive) {
  const std::string body =
      absl::StrCat(R"({"error":{"message":")", message,
                   R"(","type":"invalid_request_error","param":null,"code":)", status, "}}");
  return absl::StrCat(StatusLine(status),
                      "Content-Type: application/json\r\nContent-Length: ", body.size(),
                      keep_alive ? "\r\n" : "\r\nConnection: close\r\n", "\r\n", body);
}

// Sends all of `data` on `fd` (blocking or not) before `deadline`. False on error or timeout.
bool SendAll(int fd, std::string_view data, absl::Time deadline) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return false;
    const int64_t wait_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (wait_ms <= 0) return false;
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<int64_t>(wait_ms, 1000))) < 0 && errno != EINTR) {
      return false;
    }
  }
  return true;
}

// True when the peer has closed (or reset) the connection.
bool PeerClosed(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

}  // namespace

class HttpServer::Impl {
 public:
  class Session;
  template <typename Stream>
  class SessionOf;

  Impl(const HttpServerOptions& options, HttpHandler handler)
      : options_(options), handler_(std::move(handler)), acceptor_(io_) {}

  ~Impl() { Shutdown(); }

  absl::Status Bind(const std::string& listen) {
    if (!options_.tls_cert_file.empty() || !options_.tls_key_file.empty()) {
      tls_.emplace(net::ssl::context::tls_server);
      tls_->set_options(net::ssl::context::default_workarounds | net::ssl::context::no_sslv2 |
                        net::ssl::context::no_sslv3 | net::ssl::context::no_tlsv1 |
                        net::ssl::context::no_tlsv1_1);
      beast::error_code ec;
      tls_->use_certificate_chain_file(options_.tls_cert_file, ec);
      if (ec) {
        return absl::InvalidArgumentError(absl::StrCat("--tls-cert ", options_.tls_cert_file,
                                                       ": cannot load for HTTPS: ", ec.message()));
      }
      tls_->use_private_key_file(options_.tls_key_file, net::ssl::context::pem, ec);
      if (ec) {
        return absl::InvalidArgumentError(absl::StrCat("--tls-key ", options_.tls_key_file,
                                                       ": cannot load for HTTPS: ", ec.message()));
      }
    }
    const size_t colon = listen.rfind(':');
    int port = 0;
    if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) ||
        port < 0 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--http-listen must be HOST:PORT, got \"", listen, "\""));
    }
    std::string host = listen.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    if (host.empty() || host == "*") host = "0.0.0.0";
    if (host == "localhost") host = "127.0.0.1";
    beast::error_code ec;
    const net::ip::address ip = net::ip::make_address(host, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("--http-listen: \"", host, "\" is not an IP address (", ec.message(), ")"));
    }
    const tcp::endpoint endpoint(ip, static_cast<uint16_t>(port));
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen on ", listen, " for HTTP: ", ec.message()));
    }
    const tcp::endpoint bound = acceptor_.local_endpoint();
    address_ = absl::StrCat(listen.substr(0, colon), ":", bound.port());
    return absl::OkStatus();
  }

  void Run() {
    Accept();
    io_thread_ = std::thread([this] { io_.run(); });
    for (int i = 0; i < options_.handler_threads; ++i) {
      handlers_.emplace_back([this] { HandlerLoop(); });
    }
  }

  void Shutdown() {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    net::post(io_, [this] {
      beast::error_code ec;
      acceptor_.close(ec);
    });
    for (std::thread& t : handlers_) t.join();  // running handlers see client_gone() == true
    handlers_.clear();
    io_.stop();
    if (io_thread_.joinable()) io_thread_.join();
    absl::MutexLock lock(&mu_);
    queue_.clear();
  }

  bool stopping() const {
    absl::MutexLock lock(&mu_);
    return stopping_;
  }
  bool WaitUntilIdle(absl::Time deadline);

  const std::string& address() const { return address_; }
  const HttpServerOptions& options() const { return options_; }

  // A complete request of `session`: queued for a handler thread, or false when the queue is
  // full (the caller answers 503).
  bool Enqueue(std::shared_ptr<Session> session, HttpRequest request);

  std::atomic<size_t> connections{0};

 private:
  void Accept();
  void HandlerLoop();

  const HttpServerOptions options_;
  const HttpHandler handler_;
  std::optional<net::ssl::context> tls_;  // with options_.tls_*_file
  net::io_context io_;
  tcp::acceptor acceptor_;
  std::optional<net::steady_timer> accept_retry_;
  std::string address_;
  std::thread io_thread_;
  std::vector<std::thread> handlers_;

  struct Job {
    std::shared_ptr<Session> session;
    HttpRequest request;
  };
  mutable absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int busy_ ABSL_GUARDED_BY(mu_) = 0;  // handlers running a request
};

// One connection. Reads run on the I/O thread; while a request is handled no read is pending
// and the handler thread owns the connection for writing (Send); it then hands the connection
// back to the I/O thread (next request, or close). SessionOf<Stream> is the plain
// (beast::tcp_stream) or TLS (beast::ssl_stream) kind.
class HttpServer::Impl::Session : public std::enable_shared_from_this<Session> {
 public:
  explicit Session(Impl* server) : server_(server) { server_->connections.fetch_add(1); }
  virtual ~Session() { server_->connections.fetch_sub(1); }

  virtual void Start() = 0;
  virtual int fd() = 0;
  // From the handler thread: writes all of `data` before `deadline`; false on error or timeout
  // (then the connection is closed).
  virtual bool Send(std::string_view data, absl::Time deadline) = 0;
  // From a handler thread: the response is written; continue on the I/O thread.
  virtual void Done(bool keep_alive) = 0;

  bool keep_alive_ = true;

 protected:
  Impl* const server_;
};

template <typename Stream>
class HttpServer::Impl::SessionOf : public Session {
 public:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

  SessionOf(tcp::socket socket, Impl* server)
      : Session(server), stream_(MakeStream(std::move(socket), server)) {}

  void Start() override {
    if constexpr (kTls) {
      // The handshake counts against the read timeout, as a slow request would.
      beast::get_lowest_layer(stream_).expires_after(
          std::chrono::milliseconds(absl::ToInt64Milliseconds(server_->options().read_timeout)));
      stream_.async_handshake(net::ssl::stream_base::server, [self = Self()](beast::error_code ec) {
        if (ec) return self->Close();  // not TLS, bad certificate, timeout
        self->Read();
      });
    } else {
      Read();
    }
  }

  int fd() override { return beast::get_lowest_layer(stream_).socket().native_handle(); }

  bool Send(std::string_view data, absl::Time deadline) override {
    if constexpr (!kTls) {
      return SendAll(fd(), data, deadline);
    } else {
      // Through the TLS engine, on the I/O thread with the stream's timer as the deadline; this
      // thread waits for it.
      absl::Notification done;
      bool ok = false;
      net::post(stream_.get_executor(), [&] {
        beast::get_lowest_layer(stream_).expires_after(std::chrono::milliseconds(
            std::max<int64_t>(1, absl::ToInt64Milliseconds(deadline - absl::Now()))));
        net::async_write(stream_, net::buffer(data.data(), data.size()),
                         [&](beast::error_code ec, size_t) {
                           ok = !ec;
                           done.Notify();
                         });
      });
      done.WaitForNotification();
      return ok;
    }
  }

  void Done(bool keep_alive) override {
    net::post(stream_.get_executor(), [self = Self(), keep_alive] {
      if (keep_alive && !self->server_->stopping()) {
        self->Read();
      } else {
        self->Close();
      }
    });
  }

 private:
  static Stream MakeStream(tcp::socket socket, Impl* server) {
    if constexpr (kTls) {
      return Stream(std::move(socket), *server->tls_);
    } else {
      (void)server;
      return Stream(std::move(socket));
    }
  }
  std::shared_ptr<SessionOf> Self() {
    return std::static_pointer_cast<SessionOf>(shared_from_this());
  }
  void ExpiresAfter(absl::Duration d) {
    beast::get_lowest_layer(stream_).expires_after(
        std::chrono::milliseconds(absl::ToInt64Milliseconds(d)));
  }

  void Read() {
    parser_.emplace();
    parser_->body_limit(server_->options().max_body_bytes);
    parser_->header_limit(static_cast<uint32_t>(server_->options().max_header_bytes));
    ExpiresAfter(first_request_ ? server_->options().read_timeout
                                : server_->options().idle_timeout);
    first_request_ = false;
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = Self()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(beast::error_code ec) {
    if (ec) return OnReadError(ec);
    ExpiresAfter(server_->options().read_timeout);
    const auto length = parser_->content_length();
    if (length.has_value() && *length > server_->options().max_body_bytes) {
      return Reply(413, absl::StrCat("request body of ", *length, " bytes is over the limit of ",
                                     server_->options().max_body_bytes, " bytes"));
    }
    const auto& header = parser_->get();
    if (beast::iequals(header[http::field::expect], "100-continue")) {
      auto reply = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
      net::async_write(stream_, net::buffer(*reply),
                       [self = Self(), reply](beast::error_code ec, size_t) {
                         if (ec) return self->Close();
                         self->ReadBody();
                       });
      return;
    }
    ReadBody();
  }

  void ReadBody() {
    http::async_read(stream_, buffer_, *parser_,
                     [self = Self()](beast::error_code ec, size_t) { self->OnBody(ec); });
  }

  void OnBody(beast::error_code ec) {
    if (ec) return OnReadError(ec);
    beast::get_lowest_layer(stream_).expires_never();
    auto& message = parser_->get();
    HttpRequest request;
    request.method = std::string(message.method_string());
    const std::string_view target(message.target().data(), message.target().size());
    request.path = std::string(target.substr(0, target.find('?')));
    request.body = std::move(message.body());
    const auto authorization = message[http::field::authorization];
    request.authorization.assign(authorization.data(), authorization.size());
    beast::error_code peer_ec;
    const auto remote = beast::get_lowest_layer(stream_).socket().remote_endpoint(peer_ec);
    if (!peer_ec) request.peer = remote.address().to_string();
    keep_alive_ = message.keep_alive();
    if (!server_->Enqueue(shared_from_this(), std::move(request))) {
      Reply(503, "the server is busy (every HTTP handler thread is taken); retry later");
    }
  }

  void OnReadError(beast::error_code ec) {
    if (ec == http::error::body_limit) {
      return Reply(413, absl::StrCat("request body is over the limit of ",
                                     server_->options().max_body_bytes, " bytes"));
    }
    if (ec == http::error::header_limit) {
      return Reply(431, "request headers are too large");
    }
    if (&ec.category() == &http::make_error_code(http::error::bad_target).category() &&
        ec != http::error::end_of_stream && ec != http::error::partial_message) {
      return Reply(400, absl::StrCat("malformed HTTP request: ", ec.message()));
    }
    Close();  // EOF, timeout, reset
  }

  // An error answer written from the I/O thread; the connection is closed after it.
  void Reply(int status, const std::string& message) {
    auto reply = std::make_shared<std::string>(ErrorReply(status, message, false));
    ExpiresAfter(server_->options().write_timeout);
    net::async_write(stream_, net::buffer(*reply),
                     [self = Self(), reply](beast::error_code, size_t) { self->Close(); });
  }

  void Close() {
    beast::error_code ec;
    auto& socket = beast::get_lowest_layer(stream_).socket();
    socket.shutdown(tcp::socket::shutdown_both, ec);
    socket.close(ec);
  }

  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool first_request_ = true;
};

void HttpServer::Impl::Accept() {
  acceptor_.async_accept(net::make_strand(io_), [this](beast::error_code ec, tcp::socket socket) {
    if (ec == net::error::operation_aborted || !acceptor_.is_open()) return;
    if (ec) {
      // Out of file descriptors (or a transient error): try again shortly instead of spinning.
      LOG_EVERY_N(WARNING, 100) << "HTTP accept: " << ec.message();
      accept_retry_.emplace(io_, std::chrono::milliseconds(50));
      accept_retry_->async_wait([this](beast::error_code) {
        if (acceptor_.is_open()) Accept();
      });
      return;
    }
    if (connections.load() >= options_.max_connections) {
      beast::error_code ignored;
      socket.close(ignored);
    } else {
      if (tls_) {
        std::make_shared<SessionOf<beast::ssl_stream<beast::tcp_stream>>>(std::move(socket), this)
            ->Start();
      } else {
        std::make_shared<SessionOf<beast::tcp_stream>>(std::move(socket), this)->Start();
      }
    }
    Accept();
  });
}

bool HttpServer::Impl::Enqueue(std::shared_ptr<Session> session, HttpRequest request) {
  absl::MutexLock lock(&mu_);
  if (stopping_ || queue_.size() >= options_.max_queued) return false;
  queue_.push_back({std::move(session), std::move(request)});
  return true;
}

void HttpServer::Impl::HandlerLoop() {
  for (;;) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Impl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (stopping_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      ++busy_;
    }
    Session* session = job.session.get();
    const int fd = session->fd();
    job.request.client_gone = [this, fd] { return stopping() || PeerClosed(fd); };
    HttpResponse response = handler_(job.request);
    const absl::Duration write_timeout = options_.write_timeout;
    bool keep_alive = session->keep_alive_;
    std::string head =
        absl::StrCat(StatusLine(response.status), "Content-Type: ", response.content_type, "\r\n");
    if (!keep_alive) absl::StrAppend(&head, "Connection: close\r\n");
    bool ok;
    if (response.stream) {
      absl::StrAppend(&head, "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n");
      ok = session->Send(head, absl::Now() + write_timeout);
      if (ok) {
        response.stream([&](std::string_view chunk) {
          if (!ok || chunk.empty()) return ok;
          ok = session->Send(
              absl::StrCat(absl::Hex(chunk.size()), "\r\n", std::string(chunk), "\r\n"),
              absl::Now() + write_timeout);
          return ok;
        });
      } else {
        response.stream([](std::string_view) { return false; });
      }
      ok = ok && session->Send("0\r\n\r\n", absl::Now() + write_timeout);
    } else {
      absl::StrAppend(&head, "Content-Length: ", response.body.size(), "\r\n\r\n", response.body);
      ok = session->Send(head, absl::Now() + write_timeout);
    }
    session->Done(ok && keep_alive);
    absl::MutexLock lock(&mu_);
    --busy_;
  }
}

bool HttpServer::Impl::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithDeadline(absl::Condition(
                                   +[](Impl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
                                     return self->busy_ == 0 && self->queue_.empty();
                                   },
                                   this),
                               deadline);
}

bool HttpServer::WaitUntilIdle(absl::Time deadline) {
  return impl_ == nullptr || impl_->WaitUntilIdle(deadline);
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& listen,
                                                              const HttpServerOptions& options,
                                                              HttpHandler handler) {
  if (options.handler_threads < 1 || options.max_queued < 1 || options.max_body_bytes < 1) {
    return absl::InvalidArgumentError(
        "HTTP server: handler_threads, max_queued and max_body_bytes must be >= 1");
  }
  auto impl = std::make_unique<Impl>(options, std::move(handler));
  if (absl::Status s = impl->Bind(listen); !s.ok()) return s;
  impl->Run();
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

const std::string& HttpServer::address() const { return impl_->address(); }

void HttpServer::Shutdown() {
  if (impl_ != nullptr) impl_->Shutdown();
}

}  // namespace moe
