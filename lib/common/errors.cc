#include "lib/common/errors.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"

namespace tokenbroker {
namespace {

constexpr char kFieldPayload[] = "type.tokenbroker.dev/field";
constexpr char kRetryPayload[] = "type.tokenbroker.dev/retry_delay_nanos";
constexpr char kModelPayload[] = "type.tokenbroker.dev/exhausted_model";
constexpr char kCallerPayload[] = "type.tokenbroker.dev/caller_limit";

bool IsModelChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == ':' || c == '/' || c == '-';
}

}  // namespace

absl::Status InvalidFieldError(absl::string_view field, absl::string_view description) {
  absl::Status status = absl::InvalidArgumentError(absl::StrCat(field, ": ", description));
  status.SetPayload(kFieldPayload, absl::Cord(field));
  return status;
}

std::optional<std::string> InvalidField(const absl::Status& status) {
  auto payload = status.GetPayload(kFieldPayload);
  if (!payload) return std::nullopt;
  return std::string(*payload);
}

absl::Status NoAccountAvailableError(absl::string_view message, absl::string_view model,
                                     std::optional<absl::Duration> retry_delay) {
  absl::Status status = absl::ResourceExhaustedError(message);
  status.SetPayload(kModelPayload, absl::Cord(model));
  if (retry_delay) {
    status.SetPayload(kRetryPayload, absl::Cord(absl::StrCat(absl::ToInt64Nanoseconds(*retry_delay))));
  }
  return status;
}

std::optional<absl::Duration> RetryDelay(const absl::Status& status) {
  auto payload = status.GetPayload(kRetryPayload);
  int64_t nanos = 0;
  if (!payload || !absl::SimpleAtoi(std::string(*payload), &nanos)) return std::nullopt;
  return absl::Nanoseconds(nanos);
}

std::optional<std::string> ExhaustedModel(const absl::Status& status) {
  auto payload = status.GetPayload(kModelPayload);
  if (!payload) return std::nullopt;
  return std::string(*payload);
}

absl::Status CallerLimitError(absl::string_view message, absl::string_view caller, absl::string_view limit,
                              absl::Duration retry_delay) {
  absl::Status status = absl::ResourceExhaustedError(message);
  // "<limit>\n<caller>": a caller name holds no newline (caller policies and tokens files split on space).
  status.SetPayload(kCallerPayload, absl::Cord(absl::StrCat(limit, "\n", caller)));
  status.SetPayload(kRetryPayload, absl::Cord(absl::StrCat(absl::ToInt64Nanoseconds(retry_delay))));
  return status;
}

std::optional<CallerLimit> ExhaustedCaller(const absl::Status& status) {
  auto payload = status.GetPayload(kCallerPayload);
  if (!payload) return std::nullopt;
  const std::string text(*payload);
  const size_t nl = text.find('\n');
  if (nl == std::string::npos) return std::nullopt;
  return CallerLimit{text.substr(nl + 1), text.substr(0, nl)};
}

absl::Status ValidateModel(absl::string_view field, absl::string_view model, bool required) {
  if (model.empty()) {
    if (!required) return absl::OkStatus();
    return InvalidFieldError(field, "is required; give the upstream model name, e.g. \"gemini-3-pro-high\"");
  }
  if (model.size() > kMaxModelLength) {
    return InvalidFieldError(field, absl::StrCat("is ", model.size(), " characters long; at most ",
                                                 kMaxModelLength, " are allowed"));
  }
  for (size_t i = 0; i < model.size(); ++i) {
    if (!IsModelChar(model[i])) {
      return InvalidFieldError(
          field, absl::StrCat("has a character not allowed at position ", i,
                              "; only letters, digits and . _ : / - are allowed"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSessionId(absl::string_view field, absl::string_view session_id) {
  if (session_id.size() > kMaxSessionIdLength) {
    return InvalidFieldError(field, absl::StrCat("is ", session_id.size(), " bytes long; at most ",
                                                 kMaxSessionIdLength, " are allowed"));
  }
  for (size_t i = 0; i < session_id.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(session_id[i]);
    if (c < 0x20 || c > 0x7e) {
      return InvalidFieldError(field, absl::StrCat("has a non-printable byte at position ", i,
                                                   "; only printable ASCII is allowed"));
    }
  }
  return absl::OkStatus();
}

std::string FormatTimestamp(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone()); }

}  // namespace tokenbroker
