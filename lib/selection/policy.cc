#include "lib/selection/policy.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tokenbroker {

absl::StatusOr<Policy> ParsePolicy(absl::string_view name) {
  if (name == "balance") return Policy::kBalance;
  if (name == "fill_first") return Policy::kFillFirst;
  if (name == "reset_soonest") return Policy::kResetSoonest;
  if (name == "round_robin") return Policy::kRoundRobin;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy '", name, "'; use one of balance, fill_first, reset_soonest, round_robin"));
}

absl::string_view PolicyName(Policy policy) {
  switch (policy) {
    case Policy::kBalance: return "balance";
    case Policy::kFillFirst: return "fill_first";
    case Policy::kResetSoonest: return "reset_soonest";
    case Policy::kRoundRobin: return "round_robin";
  }
  return "balance";
}

}  // namespace tokenbroker
