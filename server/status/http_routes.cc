#include "server/status/http_routes.h"

#include <CivetServer.h>
#include <civetweb.h>

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace tokenbroker {
namespace {

struct Route {
  HttpHandler handler;
  int calls = 0;  // in progress
};

// Routes by port. Entries are only touched under `mu`; a handler runs outside it (counted in
// `calls`) so a slow page never holds up another port's requests.
struct Registry {
  absl::Mutex mu;
  absl::flat_hash_map<int, std::shared_ptr<Route>> routes ABSL_GUARDED_BY(mu);
};

Registry& Routes() {
  static auto* const registry = new Registry();
  return *registry;
}

int BeginRequest(mg_connection* conn) {
  const mg_request_info* info = mg_get_request_info(conn);
  if (info == nullptr) return 0;
  Registry& r = Routes();
  std::shared_ptr<Route> route;
  {
    absl::MutexLock lock(&r.mu);
    auto it = r.routes.find(info->server_port);
    if (it == r.routes.end()) return 0;
    route = it->second;
    ++route->calls;
  }
  IncomingHttpRequest request;
  request.method = info->request_method != nullptr ? info->request_method : "";
  request.path = info->local_uri != nullptr ? info->local_uri : "";
  request.query = info->query_string != nullptr ? info->query_string : "";
  if (const char* auth = mg_get_header(conn, "Authorization"); auth != nullptr) request.authorization = auth;
  std::optional<OutgoingHttpResponse> response = route->handler(request);
  {
    absl::MutexLock lock(&r.mu);
    --route->calls;
  }
  if (!response) return 0;
  std::string head = absl::StrCat("HTTP/1.1 ", response->status, " ", mg_get_response_code_text(conn, response->status),
                                  "\r\nContent-Type: ", response->content_type,
                                  "\r\nContent-Length: ", response->body.size(),
                                  "\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n");
  for (const auto& [name, value] : response->headers) absl::StrAppend(&head, name, ": ", value, "\r\n");
  absl::StrAppend(&head, "\r\n");
  mg_write(conn, head.data(), head.size());
  if (request.method != "HEAD") mg_write(conn, response->body.data(), response->body.size());
  return response->status;
}

}  // namespace

const CivetCallbacks* HttpRouteCallbacks() {
  static const CivetCallbacks* const callbacks = [] {
    auto* c = new CivetCallbacks();
    c->begin_request = &BeginRequest;
    return c;
  }();
  return callbacks;
}

HttpRoute::HttpRoute(int port, HttpHandler handler) : port_(port) {
  auto route = std::make_shared<Route>();
  route->handler = std::move(handler);
  Registry& r = Routes();
  absl::MutexLock lock(&r.mu);
  r.routes[port_] = std::move(route);
}

HttpRoute::~HttpRoute() {
  Registry& r = Routes();
  absl::MutexLock lock(&r.mu);
  auto it = r.routes.find(port_);
  if (it == r.routes.end()) return;
  std::shared_ptr<Route> route = it->second;
  r.routes.erase(it);
  auto idle = [&route] { return route->calls == 0; };
  r.mu.Await(absl::Condition(&idle));
}

}  // namespace tokenbroker
