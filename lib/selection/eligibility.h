#pragma once

#include <optional>
#include <string>

#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/quota/quota_book.h"
#include "lib/selection/cooldowns.h"
#include "lib/selection/lease_table.h"
#include "lib/selection/request.h"

namespace tokenbroker {

// One account as eligibility sees it (const: checking changes nothing).
struct AccountSnapshot {
  const AccountRecord& record;
  const AccountQuota& quota;
  int in_flight = 0;
};

// What eligibility reads besides the account: the pool's rules and state, and the request.
struct EligibilityContext {
  const SelectRequest& request;
  // The account the request would move away from with force_rotate (the session's binding, or
  // without a session the account last chosen for the model).
  const std::optional<std::string>& previous;
  const Cooldowns& cooldowns;
  const QuotaBook& quota;
  const LeaseTable& leases;
  int max_inflight_per_account = 0;  // 0: no cap
  absl::Time now;
  absl::string_view family;  // the request's model's family (the pool's FamilyMap)
};

struct Eligibility {
  // kRankedLower when eligible; otherwise why not (the first rule that excludes it).
  Verdict verdict = Verdict::kRankedLower;
  // With `explain`: why, for operators and error messages; and for an account that frees by
  // itself (cooldown, lease cap, quota reset), when.
  std::string detail;
  std::optional<absl::Time> available_at;
  // Excluded only as the account force_rotate moves away from (the fallback when none is left).
  bool rotated_from = false;
  bool eligible() const { return verdict == Verdict::kRankedLower; }
};

// The one eligibility rule (docs/ARCHITECTURE.md §4), in order: suspended, disabled, proxy-disabled,
// without a Cloud Code project while the monitor onboards it (as cooling down), protected for the
// model, cooling down (the account, the model, its family or quota group), at its lease cap, out of quota, excluded for this
// request, or the account force_rotate moves away from. Selection calls it without `explain`
// (no strings built); Explain and the no-account error with it.
Eligibility CheckEligibility(const AccountSnapshot& account, const EligibilityContext& ctx, bool explain);

}  // namespace tokenbroker
