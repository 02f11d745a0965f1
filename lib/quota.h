#pragma once

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/account.h"

namespace tokenbroker {

// What the quota cache says about one (account, model) (DESIGN §6).
enum class QuotaDecision { kUnknown, kProceed, kLow, kExhausted };

absl::string_view QuotaDecisionName(QuotaDecision decision);

// Proactive quota validation settings, changeable at run time (SetQuotaManager).
struct QuotaSettings {
  bool enabled = false;
  absl::Duration cache_ttl = absl::Seconds(300);  // older data reads as unknown
  double low_threshold = 0.10;                    // below: LOW
  double exhausted_threshold = 0.05;              // below: EXHAUSTED, skipped
};

// INVALID_ARGUMENT naming the field unless 0 <= exhausted_threshold <= low_threshold <= 1 and
// cache_ttl > 0.
absl::Status ValidateQuotaSettings(const QuotaSettings& settings);

// One observation of one (account, model), as the monitor streams it.
struct QuotaObservation {
  std::string account_id;
  std::string model;
  double remaining_fraction = 0;
  std::optional<absl::Time> reset_time;
  absl::Time observed = absl::InfinitePast();
  Tier tier = Tier::kUnknown;
  std::string project_id;
  bool forbidden = false;  // the quota API answered 403 for the account
};

// The decision for data observed at `observed`. Unknown when validation is off, when the data is
// older than cache_ttl, or when an exhausted quota's reset time has passed (it is back).
QuotaDecision DecideQuota(const QuotaSettings& settings, double fraction, absl::Time observed,
                          std::optional<absl::Time> reset_time, absl::Time now);

}  // namespace tokenbroker
