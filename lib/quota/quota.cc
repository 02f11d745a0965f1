#include "lib/quota/quota.h"

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/quota/quota_estimate.h"

namespace tokenbroker {

absl::string_view QuotaDecisionName(QuotaDecision decision) {
  switch (decision) {
    case QuotaDecision::kProceed: return "PROCEED";
    case QuotaDecision::kLow: return "LOW";
    case QuotaDecision::kExhausted: return "EXHAUSTED";
    case QuotaDecision::kUnknown: break;
  }
  return "UNKNOWN";
}

absl::Status ValidateQuotaSettings(const QuotaSettings& s) {
  if (s.cache_ttl <= absl::ZeroDuration()) return InvalidFieldError("cache_ttl", "must be positive");
  if (!(s.exhausted_threshold >= 0 && s.exhausted_threshold <= 1)) {
    return InvalidFieldError("exhausted_threshold", "must be between 0 and 1");
  }
  if (!(s.low_threshold >= 0 && s.low_threshold <= 1)) {
    return InvalidFieldError("low_threshold", "must be between 0 and 1");
  }
  if (!(s.call_cost_prior > 0 && s.call_cost_prior <= 1)) {
    return InvalidFieldError("call_cost_prior", "must be above 0 and at most 1");
  }
  if (s.max_lag < absl::ZeroDuration()) return InvalidFieldError("max_lag", "must not be negative");
  if (s.exhausted_threshold > s.low_threshold) {
    return InvalidFieldError("exhausted_threshold",
                             absl::StrCat("(", s.exhausted_threshold, ") must not exceed low_threshold (",
                                          s.low_threshold, ")"));
  }
  return absl::OkStatus();
}

bool SourceLiesAbout(QuotaSource source, absl::string_view model) {
  return source == QuotaSource::kAvailableModels && IsThirdPartyModel(model);
}

QuotaDecision DecideQuota(const QuotaSettings& settings, double fraction, absl::Time observed,
                          std::optional<absl::Time> reset_time, absl::Time now) {
  if (!settings.enabled || now - observed > settings.cache_ttl) return QuotaDecision::kUnknown;
  if (fraction < settings.exhausted_threshold) {
    if (reset_time && *reset_time <= now) return QuotaDecision::kUnknown;
    return QuotaDecision::kExhausted;
  }
  if (fraction < settings.low_threshold) return QuotaDecision::kLow;
  return QuotaDecision::kProceed;
}

}  // namespace tokenbroker
