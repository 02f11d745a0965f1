#pragma once

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/common/account.h"

namespace tokenbroker {

// What the quota cache says about one (account, model) (docs/ARCHITECTURE.md §6).
enum class QuotaDecision { kUnknown, kProceed, kLow, kExhausted };

absl::string_view QuotaDecisionName(QuotaDecision decision);

// Proactive quota validation settings, changeable at run time (SetQuotaManager).
struct QuotaSettings {
  bool enabled = false;
  absl::Duration cache_ttl = absl::Minutes(15);   // older data reads as unknown
  double low_threshold = 0.10;                    // below: LOW
  double exhausted_threshold = 0.05;              // below: EXHAUSTED, skipped
  // Predictive admission: the fraction of a bucket one call is taken to cost until an account
  // (or another of its family and tier) has learned its own. Cautious: high rather than low.
  double call_cost_prior = 0.05;
  // The longest the quota API is believed to lag behind (the learned lag never exceeds it, nor
  // half of cache_ttl).
  absl::Duration max_lag = absl::Seconds(60);
};

// INVALID_ARGUMENT naming the field unless 0 <= exhausted_threshold <= low_threshold <= 1,
// cache_ttl > 0, 0 < call_cost_prior <= 1 and max_lag >= 0.
absl::Status ValidateQuotaSettings(const QuotaSettings& settings);

// Where an observation comes from. fetchAvailableModels is known to lie about third-party
// (Claude/GPT) models: it reports ≈ 1.0 whatever is left.
// retrieveUserQuota (kUserQuota) is per model, read when retrieveUserQuotaSummary is not offered.
enum class QuotaSource { kUnspecified, kAvailableModels, kQuotaSummary, kUserQuota };

// Whether `source` is known to overstate what is left of `model`: such an observation never ends
// an exhaustion.
bool SourceLiesAbout(QuotaSource source, absl::string_view model);

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
  QuotaSource source = QuotaSource::kUnspecified;
  // Set for a bucket of retrieveUserQuotaSummary (e.g. "gemini-weekly"): `model` is then empty and
  // `family` is the bucket's group ("gemini", "3p"), whose every model the bucket limits.
  std::string bucket;
  std::string family;
  // An account-level observation: the Cloud Code API answered that Google suspended the account
  // (Terms of Service), with its message (SafeText).
  bool suspended = false;
  std::string suspension_message;
  // loadCodeAssist named no project: why the account has none yet (onboarding in progress, or how
  // it failed). Brokers do not hand the account out while an observation says so.
  std::string no_project_reason;
};

// The decision for data observed at `observed`. Unknown when validation is off, when the data is
// older than cache_ttl, or when an exhausted quota's reset time has passed (it is back).
QuotaDecision DecideQuota(const QuotaSettings& settings, double fraction, absl::Time observed,
                          std::optional<absl::Time> reset_time, absl::Time now);

}  // namespace tokenbroker
