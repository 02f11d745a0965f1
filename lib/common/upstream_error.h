#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tokenbroker {

// What an upstream (Cloud Code / Gemini) answer means for the account that got it.
enum class FailureKind {
  kSuccess,             // 2xx
  kQuotaExhausted,      // 429 QUOTA_EXHAUSTED, or a per-day quota violation
  kRateLimited,         // 429 RATE_LIMIT_EXCEEDED, a per-minute quota, or a bare 429
  kCapacityExhausted,   // MODEL_CAPACITY_EXHAUSTED: the model is busy, not the account's fault
  kUnauthorized,        // 401: the access token is no good
  kValidationRequired,  // 403 VALIDATION_REQUIRED: the account must be verified by a person
  kSuspended,           // 403 "disabled in this account for violation of Terms of Service": Google
                        // suspended the account; nothing but a person can bring it back
  kForbidden,           // any other 403
  kInvalidGrant,        // an OAuth-shaped {"error":"invalid_grant"} with status 400/401: the proxy
                        // says the refresh token is revoked (only the broker's own refresh can tell)
  kServerError,         // 5xx other than capacity
  kClientError,         // other 4xx: the request's fault, not the account's
};

absl::string_view FailureKindName(FailureKind kind);

// Everything one upstream answer says, parsed. Pure data.
struct UpstreamError {
  FailureKind kind = FailureKind::kSuccess;
  // The delay the upstream asked for, from whichever form carried it (the longest when several
  // did), clamped to [0, kMaxUpstreamDelay]. Unset when the answer named none.
  std::optional<absl::Duration> delay;
  std::string delay_source;    // "quotaResetDelay", "RetryInfo", "Retry-After", "message", ...
  bool delay_clamped = false;  // the upstream's value was negative or absurd and was clamped
  // The strings below come from the upstream's body: they are kept only as SafeText (control
  // characters escaped, tokens redacted, at most kMaxUpstreamField bytes; twice that for the URL).
  std::string reason;          // ErrorInfo.reason, e.g. "QUOTA_EXHAUSTED"
  std::string quota_id;        // QuotaFailure.violations[].quotaId
  std::string validation_url;  // for kValidationRequired, when the answer carried one
  std::string model;           // ErrorInfo.metadata.model, when present
  // For kSuspended: the upstream's message (what operators are shown), as SafeText.
  std::string message;
  // A quota 429 that names a limit of the model's whole family rather than of the model: "Individual
  // quota reached for claude models", a weekly quota ("...Weekly..." quota id or message).
  bool family_wide = false;
  // The answer says the account's Google One AI credits are spent (reason
  // INSUFFICIENT_G1_CREDITS_BALANCE in a 429 or 403): the request asked for credits (enabledCreditTypes)
  // and there are none, which says nothing of the account's normal quota. Such an answer is a
  // kClientError (it cools nothing); `delay`, when set, is when the credits come back.
  bool credits_exhausted = false;
  // Something operators should know about how the answer was read, e.g. that the Retry-After
  // date was in the past (so it named no delay). Empty usually.
  std::string note;
  // One line for operators: what was understood. Never contains the body itself; safe to log.
  std::string Summary() const;
};

inline constexpr absl::Duration kMaxUpstreamDelay = absl::Hours(24 * 7);
inline constexpr size_t kMaxUpstreamField = 160;

// Parses an upstream answer: HTTP status, the raw Retry-After header value (seconds or an HTTP
// date, relative to `now`; a date that has gone by names no delay) and the raw body (Google's JSON error with google.rpc details, or
// text). Understands RetryInfo.retryDelay, ErrorInfo.reason and metadata.quotaResetDelay,
// QuotaFailure.violations[].quotaId, {seconds, nanos} objects, durations like "1h16m0.667s" and
// "510.79ms", and the text forms "reset after 2h1m1s", "retry after 30 seconds",
// "try again in 1m30s", "Please wait 12s". Total: any input gives an answer, never a crash.
UpstreamError ParseUpstreamError(int http_status, absl::string_view retry_after, absl::string_view body,
                                 absl::Time now);

// Parses a Go/protobuf-style duration: "3.5s", "510.79ms", "1h16m0.667s", "90", "2h1m1s",
// "30 seconds", "1 minute". Unset for anything else (including negative values).
std::optional<absl::Duration> ParseUpstreamDuration(absl::string_view text);

}  // namespace tokenbroker
