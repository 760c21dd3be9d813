// A minimal HTTP/1.1 GET for tests (no dependency beyond sockets) and a parser for the
// Prometheus text exposition format.
#ifndef MOE_TESTS_TESTUTIL_HTTP_H_
#define MOE_TESTS_TESTUTIL_HTTP_H_

#include <map>
#include <string>

namespace moe::testing {

// A TCP connection to HOST:PORT (IPv4), or -1.
int ConnectTcp(const std::string& address);
// Sends `request` (raw bytes) on a new connection and reads until the server closes it: the raw
// response, or "" when the connection fails.
std::string HttpExchange(const std::string& address, const std::string& request);
// GET http://HOST:PORT/path (IPv4 host). The raw response — status line, headers, body — or ""
// when the connection fails.
std::string HttpGet(const std::string& address, const std::string& path);
// POST of a JSON body, the same way.
std::string HttpPost(const std::string& address, const std::string& path, const std::string& body);

struct HttpReply {
  int status = 0;                // 0: no parsable response
  std::string headers;           // status line and headers
  std::string body;              // de-chunked
  bool complete_chunks = false;  // chunked: the last (empty) chunk arrived
};
HttpReply ParseHttpReply(const std::string& raw);

// Sample lines of a text-format body: `name{labels}` exactly as written -> value. Comments
// and blank lines are skipped.
std::map<std::string, double> ParseMetricsText(const std::string& body);

}  // namespace moe::testing

#endif  // MOE_TESTS_TESTUTIL_HTTP_H_
