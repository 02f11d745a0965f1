#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/quota/quota.h"
#include "lib/selection/policy.h"

namespace tokenbroker {

// Why an account would or would not be chosen.
enum class Verdict {
  kChosen,
  kRankedLower,
  kDisabled,
  kProxyDisabled,
  kProtected,
  kCooldown,
  kExhausted,
  kLeaseCap,
  kRotatedAway,
};

struct SelectRequest {
  std::string model;       // validated by the caller
  std::string session_id;  // empty: no session
  bool force_rotate = false;
  // Accounts to leave out of this one selection (e.g. whose token refresh just failed).
  absl::flat_hash_set<std::string> exclude;
  // Who asks (recorded with the lease: only this caller may report it). "-" when callers are not
  // identified.
  std::string caller = "-";
};

struct Selection {
  std::string account_id;
  std::string email;
  Tier tier = Tier::kUnknown;
  std::string project_id;
  std::string egress_id;      // the account's egress (empty: direct); never its URL
  bool from_session = false;  // the session's existing binding was kept
  QuotaDecision quota_decision = QuotaDecision::kUnknown;
  std::optional<double> remaining_fraction;
  std::string lease_id;  // ends at ReportOutcome, ReleaseLease or the lease timeout
};

struct AccountVerdict {
  std::string account_id;
  std::string email;
  Tier tier = Tier::kUnknown;
  Verdict verdict = Verdict::kRankedLower;
  std::string detail;
  int rank = 0;  // 1-based among eligible accounts, 0 when not eligible
  // For a cooling or lease-capped account: when it may become eligible again.
  std::optional<absl::Time> available_at;
  // With quota validation on and fresh data for the model: the last observed fraction and the
  // estimate after the leases issued since (predictive admission).
  std::optional<double> observed_fraction;
  std::optional<double> estimated_fraction;
};

struct Explanation {
  std::string chosen_account_id;  // empty when nothing is eligible
  bool from_session = false;
  Policy policy = Policy::kBalance;
  std::vector<AccountVerdict> accounts;  // chosen, then eligible by rank, then skipped by id
};

// An account as operators may see it: no secrets.
}  // namespace tokenbroker
