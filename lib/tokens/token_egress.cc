// TokenManager: the egress each account's own calls leave through (README "Egress").
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/tokens/token_manager.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {

absl::StatusOr<EgressRoute> TokenManager::EgressFor(const std::string& account_id) const {
  absl::StatusOr<Credentials> creds = pool_.GetCredentials(account_id);
  if (!creds.ok()) return creds.status();
  if (creds->egress_id.empty()) return EgressRoute{};
  absl::StatusOr<EgressRoute> route =
      egresses_ != nullptr ? egresses_->Route(creds->egress_id)
                           : absl::NotFoundError(absl::StrCat("egress ", creds->egress_id,
                                                              " is not defined in an --egress_file (none is given)"));
  // Never direct instead: the account's calls leave through its egress or not at all.
  if (!route.ok()) return absl::FailedPreconditionError(absl::StrCat("account ", account_id, ": ", route.status().message()));
  return route;
}

void TokenManager::OnEgressFailure(const std::string& account_id, const absl::Status& failure, absl::Time until) {
  const std::string reason = EgressFailureReason(failure);
  if (reason.empty()) return;
  until = std::max(until, clock_.Now() + options_.failure_backoff);
  pool_.HoldAccount(account_id, until, reason);
  {
    absl::MutexLock lock(&mu_);
    ++egress_failures_;
  }
  spdlog::warn("account {} cooled until {}: {}", account_id, FormatTimestamp(until), reason);
}

int64_t TokenManager::EgressFailures() const {
  absl::MutexLock lock(&mu_);
  return egress_failures_;
}

}  // namespace tokenbroker
