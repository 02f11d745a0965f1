#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"

namespace tokenbroker {

// INVALID_ARGUMENT naming the offending request field; the message is "<field>: <description>".
// The field name travels in a status payload so the gRPC edge can attach a google.rpc.BadRequest
// field violation.
absl::Status InvalidFieldError(absl::string_view field, absl::string_view description);

// The field named by InvalidFieldError, if the status carries one.
std::optional<std::string> InvalidField(const absl::Status& status);

// Validates GetToken/ExplainSelection inputs against the limits of DESIGN §3. Each returns
// InvalidFieldError naming `field` on violation; nothing is ever truncated.
absl::Status ValidateModel(absl::string_view field, absl::string_view model, bool required);
absl::Status ValidateSessionId(absl::string_view field, absl::string_view session_id);

inline constexpr size_t kMaxModelLength = 128;
inline constexpr size_t kMaxSessionIdLength = 256;

}  // namespace tokenbroker
