#pragma once

// Extra HTTP routes on the /metrics server. prometheus-cpp's Exposer has no API for other handlers,
// but it hands its civetweb server our callbacks, and civetweb offers every request to
// `begin_request` before its own handlers: HttpRouteCallbacks() looks up a handler registered for
// the port the request came in on and lets it answer, or leaves the request to the Exposer.

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

struct CivetCallbacks;

namespace tokenbroker {

struct IncomingHttpRequest {
  std::string method;         // "GET", ...
  std::string path;           // URL-decoded, without the query
  std::string query;          // after '?', not decoded; empty when none
  std::string authorization;  // the Authorization header (secret); empty when none
};

struct OutgoingHttpResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers
};

// Answers a request, or returns nullopt to leave it to the Exposer (/metrics). Called on a
// civetweb worker thread.
using HttpHandler = std::function<std::optional<OutgoingHttpResponse>(const IncomingHttpRequest&)>;

// The callbacks to pass to prometheus::Exposer. Static storage; thread-safe.
const CivetCallbacks* HttpRouteCallbacks();

// Routes requests arriving on `port` to `handler` while alive. One route per port; the destructor
// waits for calls of the handler in progress, so what it uses may go once the route is gone.
// Thread-safe.
class HttpRoute {
 public:
  HttpRoute(int port, HttpHandler handler);
  ~HttpRoute();
  HttpRoute(const HttpRoute&) = delete;
  HttpRoute& operator=(const HttpRoute&) = delete;

 private:
  int port_;
};

}  // namespace tokenbroker
