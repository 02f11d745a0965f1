#pragma once

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tokenbroker {

// How eligible accounts of the same tier are ranked (docs/ARCHITECTURE.md §4).
enum class Policy { kBalance, kFillFirst, kResetSoonest, kRoundRobin };

// Accepts "balance", "fill_first", "reset_soonest", "round_robin".
absl::StatusOr<Policy> ParsePolicy(absl::string_view name);
absl::string_view PolicyName(Policy policy);

}  // namespace tokenbroker
