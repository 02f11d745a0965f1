#pragma once

// Caller policies (issue 16.1): what one caller of GetToken may hold of the pool at once, which
// models it may ask for, and how it ranks against other callers while calls wait. The file format
// is README "Caller policies"; this header is its parser and the pure admission rule. No I/O, no
// state: CallerAdmission (caller_admission.h) keeps the counts.

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/selection/request.h"

namespace tokenbroker {

// A number of accounts, given as a count ("3") or as a share of the accounts loaded ("25%").
struct ShareLimit {
  int count = 0;        // > 0 for a count
  double percent = 0;   // (0, 100] for a share
  bool set() const { return count > 0 || percent > 0; }
  // The limit against `total` accounts: the count, or the share rounded down but at least 1.
  int Resolve(size_t total) const;
  std::string ToString() const;
};

// Priority classes: under contention, waiting calls of a higher class are served first.
enum class CallerPriority { kLow = 0, kNormal = 1, kHigh = 2 };
absl::string_view CallerPriorityName(CallerPriority p);

struct CallerPolicy {
  std::string name;  // the caller's name, or "default"
  // Leases in flight (issued, not yet reported or timed out) at once; 0: no limit.
  int max_inflight = 0;
  // Distinct accounts the caller holds leases on at once; unset: no limit.
  ShareLimit max_accounts;
  // The same, counting only accounts of one tier (of that tier's accounts for a share).
  std::map<Tier, ShareLimit> max_tier_accounts;
  // Models the caller may ask for: exact names, and families (ModelFamily). Both empty: any.
  std::vector<std::string> models;
  std::vector<std::string> families;
  CallerPriority priority = CallerPriority::kNormal;
  // Calls of this caller waiting (max_wait) at once; beyond it a call is refused at once.
  int max_waiting = 16;
  // The RetryInfo of a refusal for this caller's own limits.
  absl::Duration retry_after = absl::Seconds(1);
};

// The parsed file: one policy per caller name, and the optional `default` entry for every caller
// without its own (those callers count together against it). Immutable once parsed.
class CallerPolicies {
 public:
  static constexpr absl::string_view kDefaultName = "default";
  static constexpr size_t kMaxEntries = 1000;
  static constexpr size_t kMaxFileBytes = 1 << 20;

  // The policy that applies to `caller`: its own entry, else `default`, else null (refused).
  const CallerPolicy* Find(absl::string_view caller) const;
  const std::map<std::string, CallerPolicy>& entries() const { return entries_; }

 private:
  friend absl::StatusOr<CallerPolicies> ParseCallerPolicies(absl::string_view text, absl::string_view source);
  std::map<std::string, CallerPolicy> entries_;
};

// Parses a policy file: one caller a line, "<name> key=value ...", blank lines and # comments
// skipped. INVALID_ARGUMENT naming `source`, the line and the field at fault, and what is allowed
// (never echoing more than a short, sanitised piece of the line).
absl::StatusOr<CallerPolicies> ParseCallerPolicies(absl::string_view text, absl::string_view source);

// Whether `policy` lets its caller ask for `model` (whose family is `family`). PERMISSION_DENIED
// naming the caller and what it may use, otherwise.
absl::Status CheckCallerModel(const CallerPolicy& policy, absl::string_view model, absl::string_view family);

// What one caller (one policy entry) holds now.
struct CallerUsage {
  int in_flight = 0;  // leases, and reservations of calls being served
  int pending = 0;    // of those, reservations whose account is not chosen yet
  // Distinct accounts held, in all and by tier; each pending reservation may add one more.
  int accounts = 0;
  std::map<Tier, int> tier_accounts;
  absl::flat_hash_set<std::string> held;  // the accounts held
  int waiting = 0;
};

// The accounts loaded, in all and by tier (what shares resolve against).
struct PoolShape {
  size_t accounts = 0;
  std::map<Tier, size_t> by_tier;
};

// Which accounts a call may be served by when its caller is at a share limit: only those it holds
// already (`all`), or, for the tiers in `tiers`, only that tier's accounts it holds.
struct CallerShare final : AccountFilter {
  std::string caller;
  bool all = false;
  std::vector<Tier> tiers;
  absl::flat_hash_set<std::string> held;
  // Whether the account may not serve the call.
  bool Blocks(const std::string& account_id, Tier tier) const override;
};

// The admission rule for one more lease. A refusal names the limit ("max_inflight").
struct AdmissionDecision {
  std::optional<std::string> refused_limit;
  std::string detail;                    // why, for the error message
  std::shared_ptr<const CallerShare> share;  // null: any account
};
AdmissionDecision DecideAdmission(const CallerPolicy& policy, const CallerUsage& usage, const PoolShape& shape);

}  // namespace tokenbroker
