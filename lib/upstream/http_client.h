#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Where a call leaves from (README "Egress"): directly when proxy_url is empty, else through that
// HTTP(S) or SOCKS proxy. Only the id may be shown: the URL may carry credentials and never
// appears in a log line, an error, a metric or a page.
struct EgressRoute {
  std::string id;
  std::string proxy_url;  // secret
  bool direct() const { return proxy_url.empty(); }
};

struct HttpRequest {
  std::string url;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  absl::Duration timeout = absl::Seconds(10);
  EgressRoute egress;  // default: direct
};

struct HttpResponse {
  long status = 0;
  std::string body;
  std::string retry_after;  // the Retry-After header, if any
};

// POSTs (and GETs: `body` is then ignored) over HTTP(S) with libcurl. Thread-safe: every call uses its own handle. Any HTTP status
// is a successful call; transport failures are UNAVAILABLE (connection) or DEADLINE_EXCEEDED
// (timeout), and their messages never include headers or bodies. Through an egress the call is
// tunnelled (HTTP CONNECT, or SOCKS): a failure before the tunnel to the upstream stands (the
// proxy refused, could not be reached, answered the CONNECT with an error, or did not answer in
// time) is UNAVAILABLE "egress <id> unreachable: ..." and IsEgressFailure; its message names the
// egress id, never the proxy URL.
class HttpClient {
 public:
  HttpClient();
  absl::StatusOr<HttpResponse> Post(const HttpRequest& request) const;
  absl::StatusOr<HttpResponse> Get(const HttpRequest& request) const;

 private:
  absl::StatusOr<HttpResponse> Perform(const HttpRequest& request, absl::string_view verb) const;
};

// Whether `status` is a failure of the egress (HttpClient), not of the upstream: the account's
// path out is broken.
bool IsEgressFailure(const absl::Status& status);
// For such a failure, "egress <id> unreachable: <why>" (safe to log and return); else "".
std::string EgressFailureReason(const absl::Status& status);

// application/x-www-form-urlencoded encoding of one value.
std::string FormEncode(absl::string_view value);

}  // namespace tokenbroker
