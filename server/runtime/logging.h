#pragma once

#include <string>

#include "absl/status/status.h"

namespace tokenbroker {

// Configures spdlog's default logger to write to stderr. `format` is "text" or "json" (one JSON
// object per line: time, level, msg); `level` is trace, debug, info, warn, error or off.
// INVALID_ARGUMENT naming the flag for anything else.
absl::Status SetUpLogging(const std::string& format, const std::string& level);

}  // namespace tokenbroker
