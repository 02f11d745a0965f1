#include "lib/upstream/http_client.h"

#include <curl/curl.h>

#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace tokenbroker {
namespace {

size_t AppendBody(char* data, size_t size, size_t count, void* user) {
  static_cast<std::string*>(user)->append(data, size * count);
  return size * count;
}

size_t ReadHeader(char* data, size_t size, size_t count, void* user) {
  absl::string_view line(data, size * count);
  if (absl::StartsWithIgnoreCase(line, "retry-after:")) {
    line.remove_prefix(12);
    *static_cast<std::string*>(user) = std::string(absl::StripAsciiWhitespace(line));
  }
  return size * count;
}

constexpr char kEgressFailurePayload[] = "tokenbroker/egress-failure";

// Why the egress failed, in words that name neither the proxy URL nor its credentials.
std::string EgressProblem(CURL* c, CURLcode rc, const HttpRequest& request) {
  long connect_code = 0;
  curl_easy_getinfo(c, CURLINFO_HTTP_CONNECTCODE, &connect_code);
  if (connect_code == 407) return "the proxy refused our credentials (HTTP 407 to CONNECT)";
  if (connect_code != 0 && (connect_code < 200 || connect_code > 299)) {
    return absl::StrCat("the proxy answered HTTP ", connect_code, " to CONNECT");
  }
  if (rc == CURLE_OPERATION_TIMEDOUT) {
    return absl::StrCat("no tunnel through the proxy within ", absl::FormatDuration(request.timeout));
  }
  if (rc == CURLE_PROXY) {
    long proxy_error = 0;
    curl_easy_getinfo(c, CURLINFO_PROXY_ERROR, &proxy_error);
    return absl::StrCat(curl_easy_strerror(rc), " (proxy error ", proxy_error, ")");
  }
  return curl_easy_strerror(rc);
}

// Whether a failed call through a proxy failed before its tunnel to the upstream stood.
bool FailedAtProxy(CURL* c, CURLcode rc) {
  if (rc == CURLE_COULDNT_RESOLVE_PROXY || rc == CURLE_PROXY || rc == CURLE_COULDNT_CONNECT) return true;
  long connect_code = 0;
  curl_easy_getinfo(c, CURLINFO_HTTP_CONNECTCODE, &connect_code);
  if (connect_code != 0 && (connect_code < 200 || connect_code > 299)) return true;
  // Nothing was sent to the upstream yet: the tunnel (or the TLS through it) never came up.
  curl_off_t pretransfer = 0;
  curl_easy_getinfo(c, CURLINFO_PRETRANSFER_TIME_T, &pretransfer);
  return pretransfer == 0;
}

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};

}  // namespace

HttpClient::HttpClient() {
  static const bool initialised = [] { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK; }();
  (void)initialised;
}

absl::StatusOr<HttpResponse> HttpClient::Post(const HttpRequest& request) const { return Perform(request, "POST"); }

absl::StatusOr<HttpResponse> HttpClient::Get(const HttpRequest& request) const { return Perform(request, "GET"); }

absl::StatusOr<HttpResponse> HttpClient::Perform(const HttpRequest& request, absl::string_view verb) const {
  std::unique_ptr<CURL, CurlDeleter> curl(curl_easy_init());
  if (!curl) return absl::InternalError("curl_easy_init failed");
  std::unique_ptr<curl_slist, SlistDeleter> headers;
  auto add_header = [&](const std::string& h) {
    headers.reset(curl_slist_append(headers.release(), h.c_str()));
  };
  add_header(absl::StrCat("Content-Type: ", request.content_type));
  add_header("Expect:");
  for (const auto& [name, value] : request.headers) add_header(absl::StrCat(name, ": ", value));

  HttpResponse response;
  CURL* c = curl.get();
  curl_easy_setopt(c, CURLOPT_URL, request.url.c_str());
  if (verb == "GET") {
    curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
  } else {
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, request.body.data());
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  }
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(absl::ToInt64Milliseconds(request.timeout)));
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &AppendBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &response.body);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &ReadHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &response.retry_after);
  if (!request.egress.direct()) {
    // Credentials in the URL are libcurl's to send (Basic to an HTTP proxy, RFC 1929 to SOCKS5).
    // Always a tunnel: the proxy sees the upstream's host, never a request, header or token.
    curl_easy_setopt(c, CURLOPT_PROXY, request.egress.proxy_url.c_str());
    curl_easy_setopt(c, CURLOPT_HTTPPROXYTUNNEL, 1L);
  }
  CURLcode rc = curl_easy_perform(c);
  if (rc != CURLE_OK && !request.egress.direct() && FailedAtProxy(c, rc)) {
    std::string reason = absl::StrCat("egress ", request.egress.id, " unreachable: ", EgressProblem(c, rc, request));
    absl::Status s = absl::UnavailableError(reason);
    s.SetPayload(kEgressFailurePayload, absl::Cord(reason));
    return s;
  }
  if (rc == CURLE_OPERATION_TIMEDOUT) {
    return absl::DeadlineExceededError(absl::StrCat(verb, " ", request.url, " timed out after ",
                                                    absl::FormatDuration(request.timeout)));
  }
  if (rc != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat(verb, " ", request.url, " failed: ", curl_easy_strerror(rc)));
  }
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &response.status);
  return response;
}

bool IsEgressFailure(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kEgressFailurePayload).has_value();
}

std::string EgressFailureReason(const absl::Status& status) {
  if (status.ok()) return "";
  auto reason = status.GetPayload(kEgressFailurePayload);
  return reason ? std::string(*reason) : "";
}

std::string FormEncode(absl::string_view value) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(value.size());
  for (unsigned char ch : value) {
    if (absl::ascii_isalnum(ch) || ch == '-' || ch == '_' || ch == '.' || ch == '~') {
      out.push_back(static_cast<char>(ch));
    } else {
      out.push_back('%');
      out.push_back(kHex[ch >> 4]);
      out.push_back(kHex[ch & 15]);
    }
  }
  return out;
}

}  // namespace tokenbroker
