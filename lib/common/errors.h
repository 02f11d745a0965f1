#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"
#include "absl/time/time.h"

namespace tokenbroker {

// INVALID_ARGUMENT naming the offending request field; the message is "<field>: <description>".
// The field name travels in a status payload so the gRPC edge can attach a google.rpc.BadRequest
// field violation.
absl::Status InvalidFieldError(absl::string_view field, absl::string_view description);

// The field named by InvalidFieldError, if the status carries one.
std::optional<std::string> InvalidField(const absl::Status& status);

// RESOURCE_EXHAUSTED for "no account can serve `model` now". `retry_delay`, when set, is the
// exact time until the earliest account becomes eligible; both travel in payloads so the gRPC edge
// can attach google.rpc.RetryInfo and google.rpc.QuotaFailure.
absl::Status NoAccountAvailableError(absl::string_view message, absl::string_view model,
                                     std::optional<absl::Duration> retry_delay);
std::optional<absl::Duration> RetryDelay(const absl::Status& status);
std::optional<std::string> ExhaustedModel(const absl::Status& status);

// RESOURCE_EXHAUSTED for "this caller is over a limit of its caller policy" (issue 16.1): the
// caller's name and the limit ("max_inflight", ...) and the retry delay travel in payloads, so the
// gRPC edge can attach google.rpc.QuotaFailure (subject "caller:<name>") and RetryInfo.
absl::Status CallerLimitError(absl::string_view message, absl::string_view caller, absl::string_view limit,
                              absl::Duration retry_delay);
struct CallerLimit {
  std::string caller;
  std::string limit;
};
std::optional<CallerLimit> ExhaustedCaller(const absl::Status& status);

// Validates GetToken/ExplainSelection inputs against the limits of docs/ARCHITECTURE.md §3. Each returns
// InvalidFieldError naming `field` on violation; nothing is ever truncated.
absl::Status ValidateModel(absl::string_view field, absl::string_view model, bool required);
absl::Status ValidateSessionId(absl::string_view field, absl::string_view session_id);

inline constexpr size_t kMaxModelLength = 128;
inline constexpr size_t kMaxSessionIdLength = 256;

// A time as messages show it: RFC 3339, UTC, to the second ("2026-12-01T23:40:27Z").
std::string FormatTimestamp(absl::Time t);

}  // namespace tokenbroker
