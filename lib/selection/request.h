#pragma once

#include <memory>
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
  kSuspended,  // Google suspended the account (Terms of Service): never handed out again
  // Not among the accounts the caller may still use: it is at its caller policy's max_accounts
  // (issue 16.1) and the account is not one it holds leases on already.
  kCallerShare,
};

// Which accounts may serve a caller at its share of the pool (lib/broker/caller_policy.h builds it).
class AccountFilter {
 public:
  virtual ~AccountFilter() = default;
  // Whether the account may not serve the request.
  virtual bool Blocks(const std::string& account_id, Tier tier) const = 0;
};

struct SelectRequest {
  std::string model;       // validated by the caller
  std::string session_id;  // empty: no session
  bool force_rotate = false;
  // The quota group the caller says the model belongs to (validated; empty: none): family
  // cooldowns of the group block the request too, and a quota 429 on its lease cools the group.
  std::string quota_group;
  // Accounts to leave out of this one selection (e.g. whose token refresh just failed).
  absl::flat_hash_set<std::string> exclude;
  // Who asks (recorded with the lease: only this caller may report it). "-" when callers are not
  // identified.
  std::string caller = "-";
  // Set by a caller policy when the caller is at its share of the pool: the accounts it blocks are
  // ineligible (kCallerShare). Null: any account.
  std::shared_ptr<const AccountFilter> caller_share;
};

struct Selection {
  std::string account_id;
  std::string email;
  Tier tier = Tier::kUnknown;
  std::string project_id;
  std::string model_family;  // the family the pool's map gives the model
  std::string egress_id;      // the account's egress (empty: direct); never its URL
  bool from_session = false;  // the session's existing binding was kept
  QuotaDecision quota_decision = QuotaDecision::kUnknown;
  std::optional<double> remaining_fraction;
  std::string lease_id;  // ends at ReportOutcome, ReleaseLease or the lease timeout
  // Set while the account's AI credits are known to be exhausted: until when.
  std::optional<absl::Time> credits_exhausted_until;
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
  std::string binding_quota;  // the bucket id or family whose estimate binds (with fresh data)
};

struct Explanation {
  std::string chosen_account_id;  // empty when nothing is eligible
  bool from_session = false;
  Policy policy = Policy::kBalance;
  std::vector<AccountVerdict> accounts;  // chosen, then eligible by rank, then skipped by id
};

// An account as operators may see it: no secrets.
}  // namespace tokenbroker
