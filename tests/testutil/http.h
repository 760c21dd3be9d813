// A minimal HTTP/1.1 GET for tests (no dependency beyond sockets) and a parser for the
// Prometheus text exposition format.
#ifndef MOE_TESTS_TESTUTIL_HTTP_H_
#define MOE_TESTS_TESTUTIL_HTTP_H_

#include <map>
#include <string>

namespace moe::testing {

// GET http://HOST:PORT/path (IPv4 host). The raw response — status line, headers, body — or ""
// when the connection fails.
std::string HttpGet(const std::string& address, const std::string& path);

// Sample lines of a text-format body: `name{labels}` exactly as written -> value. Comments
// and blank lines are skipped.
std::map<std::string, double> ParseMetricsText(const std::string& body);

}  // namespace moe::testing

#endif  // MOE_TESTS_TESTUTIL_HTTP_H_
