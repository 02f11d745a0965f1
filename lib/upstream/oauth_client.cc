#include "lib/upstream/oauth_client.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {
namespace {

constexpr char kInvalidGrantPrefix[] = "invalid_grant";
constexpr int64_t kMaxExpiresInSeconds = 24 * 3600;

std::string Shorten(std::string text) {
  constexpr size_t kMax = 200;
  if (text.size() > kMax) text = text.substr(0, kMax) + "...";
  return text;
}

bool Retryable(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
}

}  // namespace

absl::StatusOr<TokenGrant> ParseTokenResponse(long http_status, absl::string_view body) {
  nlohmann::json doc = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  const bool is_object = !doc.is_discarded() && doc.is_object();
  if (http_status == 200) {
    if (!is_object) return absl::InternalError("token endpoint answered 200 with a body that is not JSON");
    auto at = doc.find("access_token");
    auto exp = doc.find("expires_in");
    if (at == doc.end() || !at->is_string() || at->get<std::string>().empty()) {
      return absl::InternalError("token endpoint answered 200 without access_token");
    }
    if (exp == doc.end() || !exp->is_number()) {
      return absl::InternalError("token endpoint answered 200 without a numeric expires_in");
    }
    // Google says 3599. Zero, negative, fractional nonsense, huge or non-finite values are an
    // answer the broker cannot use (and converting 1e300 to an integer is undefined): a failed
    // refresh, not a token.
    const double expires_in = exp->get<double>();
    if (!std::isfinite(expires_in) || expires_in < 1 || expires_in > kMaxExpiresInSeconds) {
      return absl::InternalError(absl::StrCat("token endpoint answered 200 with an unusable expires_in (",
                                              Shorten(exp->dump()), "); want 1 to ", kMaxExpiresInSeconds,
                                              " seconds"));
    }
    TokenGrant grant;
    grant.access_token = at->get<std::string>();
    grant.expires_in = absl::Seconds(static_cast<int64_t>(expires_in));
    if (auto rt = doc.find("refresh_token"); rt != doc.end() && rt->is_string() &&
                                              !rt->get<std::string>().empty()) {
      grant.refresh_token = rt->get<std::string>();
    }
    return grant;
  }
  std::string error;
  std::string description;
  if (is_object) {
    if (auto e = doc.find("error"); e != doc.end() && e->is_string()) error = e->get<std::string>();
    if (auto d = doc.find("error_description"); d != doc.end() && d->is_string()) {
      description = Shorten(d->get<std::string>());
    }
  }
  if (error == kInvalidGrantPrefix) {
    return absl::PermissionDeniedError(absl::StrCat(
        kInvalidGrantPrefix, ": ", description.empty() ? "refresh token rejected" : description));
  }
  if (error == "invalid_client" || error == "unauthorized_client") {
    return absl::UnauthenticatedError(absl::StrCat(
        "token endpoint rejected the OAuth client (", error,
        "): check --oauth_client_id / --oauth_client_secret", description.empty() ? "" : ": ",
        description));
  }
  std::string what = absl::StrCat("token endpoint answered HTTP ", http_status,
                                  error.empty() ? "" : absl::StrCat(" (", error, ")"));
  if (http_status == 429 || http_status >= 500) return absl::UnavailableError(what);
  return absl::InternalError(what);
}

bool IsInvalidGrant(const absl::Status& status) {
  return absl::IsPermissionDenied(status) && absl::StartsWith(status.message(), kInvalidGrantPrefix);
}

OAuthClient::OAuthClient(OAuthOptions options, const HttpClient& http)
    : options_(std::move(options)), http_(http) {}

absl::StatusOr<TokenGrant> OAuthClient::Refresh(const std::string& refresh_token, const EgressRoute& egress) const {
  HttpRequest req;
  req.egress = egress;
  req.url = options_.token_url;
  req.content_type = "application/x-www-form-urlencoded";
  req.timeout = options_.timeout;
  req.body = absl::StrCat("grant_type=refresh_token&client_id=", FormEncode(options_.client_id),
                          "&client_secret=", FormEncode(options_.client_secret),
                          "&refresh_token=", FormEncode(refresh_token));
  absl::BitGen rng;
  absl::Duration backoff = options_.initial_backoff;
  absl::Status last;
  for (int attempt = 1; attempt <= std::max(1, options_.max_attempts); ++attempt) {
    absl::StatusOr<HttpResponse> resp = http_.Post(req);
    if (resp.ok()) {
      absl::StatusOr<TokenGrant> grant = ParseTokenResponse(resp->status, resp->body);
      if (grant.ok() || !Retryable(grant.status())) return grant;
      last = grant.status();
    } else {
      last = resp.status();
    }
    if (attempt < options_.max_attempts) {
      // Full jitter: somewhere between half the backoff and all of it.
      absl::SleepFor(backoff / 2 + absl::Uniform(rng, 0.0, 0.5) * backoff);
      backoff = std::min(backoff * 2, options_.max_backoff);
    }
  }
  absl::Status out(last.code(), absl::StrCat(last.message(), " (after ", options_.max_attempts, " attempts)"));
  last.ForEachPayload([&out](absl::string_view type, const absl::Cord& payload) { out.SetPayload(type, payload); });
  return out;
}

}  // namespace tokenbroker
