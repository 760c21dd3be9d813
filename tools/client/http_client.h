// A minimal HTTP/1.1 client for moe-cli's use of the coordinator's OpenAI-compatible API: one
// POST of a JSON body per connection, the answer read whole or as server-sent events.
#ifndef MOE_TOOLS_CLIENT_HTTP_CLIENT_H_
#define MOE_TOOLS_CLIENT_HTTP_CLIENT_H_

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moe {

struct HttpAnswer {
  int status = 0;
  std::string body;
};

// POSTs `body` to http://`server``path` (server: HOST:PORT or http://HOST:PORT; IPv4 or a name).
// With `on_event`, a 200 answer is read as server-sent events: each `data:` payload is passed
// on as it arrives (the answer's body then stays empty); return false to stop reading.
// UNAVAILABLE when the server cannot be reached, DEADLINE_EXCEEDED after `timeout` of silence.
// `api_token`: sent as "Authorization: Bearer <token>" (empty: none).
absl::StatusOr<HttpAnswer> HttpPostJson(const std::string& server, const std::string& path,
                                        const std::string& body,
                                        const std::function<bool(const std::string&)>& on_event,
                                        const std::string& api_token = "",
                                        absl::Duration timeout = absl::Seconds(300));

// The error message of an OpenAI-style error body ({"error": {"message": ...}}), else the body.
std::string HttpErrorMessage(const HttpAnswer& answer);

}  // namespace moe

#endif  // MOE_TOOLS_CLIENT_HTTP_CLIENT_H_
