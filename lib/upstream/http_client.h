#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenbroker {

struct HttpRequest {
  std::string url;
  std::string body;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
  absl::Duration timeout = absl::Seconds(10);
};

struct HttpResponse {
  long status = 0;
  std::string body;
  std::string retry_after;  // the Retry-After header, if any
};

// POSTs (and GETs: `body` is then ignored) over HTTP(S) with libcurl. Thread-safe: every call uses its own handle. Any HTTP status
// is a successful call; transport failures are UNAVAILABLE (connection) or DEADLINE_EXCEEDED
// (timeout), and their messages never include headers or bodies.
class HttpClient {
 public:
  HttpClient();
  absl::StatusOr<HttpResponse> Post(const HttpRequest& request) const;
  absl::StatusOr<HttpResponse> Get(const HttpRequest& request) const;

 private:
  absl::StatusOr<HttpResponse> Perform(const HttpRequest& request, absl::string_view verb) const;
};

// application/x-www-form-urlencoded encoding of one value.
std::string FormEncode(absl::string_view value);

}  // namespace tokenbroker
