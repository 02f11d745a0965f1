#pragma once

// Caller policies at run time (issue 16.1): which policy applies to a call, the counts of what each
// caller holds, the admission of one more lease, and per-caller statistics for /metrics.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/broker/caller_policy.h"
#include "lib/common/clock.h"
#include "lib/quota/family_map.h"

namespace tokenbroker {

// What a ledger's Commit checks atomically with recording the lease (0: no limit): the distinct
// accounts the entry may hold, in all and of the lease's tier.
struct CommitLimits {
  int max_accounts = 0;
  int max_tier_accounts = 0;
};

struct LedgerCommit {
  bool committed = true;
  int in_flight = 0;          // committed: the entry's leases and reservations in flight now
  std::string refused_limit;  // not committed: "max_accounts" or "max_tier_accounts"
  absl::flat_hash_set<std::string> held;  // not committed: the accounts the entry holds
};

// The counts of the leases callers hold, by policy entry (a caller's own entry, or `default` for
// every caller without one). LocalCallerLedger counts this replica's leases; FleetCallerLedger
// (fleet_caller_ledger.h) the whole fleet's, over the shared state. Implementations are thread-safe.
class CallerLedger {
 public:
  virtual ~CallerLedger() = default;
  // Atomically: the entry's usage at `now` (leases past their expiry no longer count), `decide`'s
  // verdict on it, and, when admitted, one pending reservation. Returns the decision. The usage
  // lists the accounts held (`accounts`, `tier_accounts`, `held`) only `with_accounts`.
  // `max_inflight` (0: none) is the limit `decide` applies, for a ledger that must apply it itself.
  virtual AdmissionDecision Reserve(const std::string& entry, int max_inflight, absl::Time now, bool with_accounts,
                                    const std::function<AdmissionDecision(const CallerUsage&)>& decide) = 0;
  // A pending reservation becomes lease `lease_id` on `account`, counted until Release or
  // `expires`, unless `limits` refuse the account (then the reservation stays pending: Commit
  // another account or Cancel). A ledger may rely on Reserve's shares instead and never refuse.
  virtual LedgerCommit Commit(const std::string& entry, const std::string& lease_id, const std::string& account,
                              Tier tier, absl::Time now, absl::Time expires, const CommitLimits& limits) = 0;
  // The pending reservation ended without a lease.
  virtual void Cancel(const std::string& entry) = 0;
  // The lease was reported; unknown ids are ignored. Returns the entry it counted against here.
  virtual std::optional<std::string> Release(const std::string& lease_id) = 0;
  // One more call of `entry` waits, unless `max` wait already (false).
  virtual bool StartWaiting(const std::string& entry, int max) = 0;
  virtual void StopWaiting(const std::string& entry) = 0;
  virtual int Waiting(const std::string& entry) = 0;
  // Every entry's usage at `now`.
  virtual std::map<std::string, CallerUsage> Usage(absl::Time now) = 0;
  // Whether Reserve and Commit make a round trip (a caller's thread must not make it).
  virtual bool remote() const { return false; }
};

// This replica's counts. Memory: one record per policy entry with something held or waiting (entry
// names come from the operator's file) and one per lease in flight (bounded by the callers' limits,
// and every lease ends by its expiry).
class LocalCallerLedger final : public CallerLedger {
 public:
  AdmissionDecision Reserve(const std::string& entry, int max_inflight, absl::Time now, bool with_accounts,
                            const std::function<AdmissionDecision(const CallerUsage&)>& decide) override
      ABSL_LOCKS_EXCLUDED(mu_);
  // Never refuses: Reserve's shares count pending reservations as accounts.
  LedgerCommit Commit(const std::string& entry, const std::string& lease_id, const std::string& account, Tier tier,
                      absl::Time now, absl::Time expires, const CommitLimits& limits) override ABSL_LOCKS_EXCLUDED(mu_);
  // Counts a lease without a pending reservation here (one reserved in the fleet's ledger).
  void RecordLease(const std::string& entry, const std::string& lease_id, const std::string& account, Tier tier,
              absl::Time expires) ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(const std::string& entry) override ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<std::string> Release(const std::string& lease_id) override ABSL_LOCKS_EXCLUDED(mu_);
  bool StartWaiting(const std::string& entry, int max) override ABSL_LOCKS_EXCLUDED(mu_);
  void StopWaiting(const std::string& entry) override ABSL_LOCKS_EXCLUDED(mu_);
  int Waiting(const std::string& entry) override ABSL_LOCKS_EXCLUDED(mu_);
  std::map<std::string, CallerUsage> Usage(absl::Time now) override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Held {
    std::string entry;
    std::string account;
    Tier tier;
    absl::Time expires;
  };
  struct Record {
    int leases = 0;
    int pending = 0;
    int waiting = 0;
    std::map<std::string, std::pair<Tier, int>> accounts;  // account -> (tier, leases on it)
  };
  void ExpireLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecordLocked(Record& r, const std::string& entry, const std::string& lease_id, const std::string& account,
                    Tier tier, absl::Time expires) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndLocked(const Held& held) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropIfIdleLocked(const std::string& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static CallerUsage UsageOf(const Record& r, bool with_accounts = true);

  absl::Mutex mu_;
  std::map<std::string, Record> records_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, Held> leases_ ABSL_GUARDED_BY(mu_);
  absl::btree_set<std::pair<absl::Time, std::string>> by_expiry_ ABSL_GUARDED_BY(mu_);
};

// Per-entry statistics for /metrics (label values are entry names from the operator's file, and
// "unlisted" for refused callers without an entry).
struct CallerStats {
  CallerUsage usage;
  int64_t issued = 0;
  std::map<std::string, int64_t> refused;  // by limit: max_inflight, max_waiting, model, no_policy
};

// One call's policy, as Admit finds it: the file it came from is kept alive with it.
struct CallerGrant {
  std::shared_ptr<const CallerPolicies> policies;
  const CallerPolicy* policy = nullptr;  // points into *policies
};

// The caller policies in force and the admission of GetToken calls under them. Without policies
// (the default) every call is admitted as before. Thread-safe. `clock` must outlive it.
class CallerAdmission {
 public:
  // `lease_timeout`: the pool's; a lease the ledger is not told the end of stops counting then.
  CallerAdmission(const Clock& clock, absl::Duration lease_timeout,
                  std::unique_ptr<CallerLedger> ledger = std::make_unique<LocalCallerLedger>());
  // Counts in `ledger` from now on (the fleet's, once the shared state is up). Call before the
  // first Reserve: what the old ledger counted is forgotten.
  void SetLedger(std::unique_ptr<CallerLedger> ledger) { ledger_ = std::move(ledger); }
  // Whether Reserve and Commit make a round trip to the shared state.
  bool remote() const { return ledger_->remote(); }

  // Replaces the policies (null: off). Calls admitted before keep the policy they were admitted on.
  void SetPolicies(std::shared_ptr<const CallerPolicies> policies) ABSL_LOCKS_EXCLUDED(mu_);
  bool enabled() const ABSL_LOCKS_EXCLUDED(mu_);
  // The accounts shares resolve against (the loaded accounts, by tier).
  void SetPoolShape(PoolShape shape) ABSL_LOCKS_EXCLUDED(mu_);

  // The policy of a new call: unset when no policies are in force; PERMISSION_DENIED when the
  // caller has no entry (and the file no `default`) or may not ask for `model`.
  // The model → family map `family:` entries are checked against (the pool's; the built-in rules
  // until set).
  void SetFamilies(std::shared_ptr<const FamilyMap> families) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    families_ = std::move(families);
  }
  absl::StatusOr<std::optional<CallerGrant>> Admit(const std::string& caller, const std::string& model)
      ABSL_LOCKS_EXCLUDED(mu_);
  // One more lease for the call: the accounts it may be served by (null: any), or
  // RESOURCE_EXHAUSTED (CallerLimitError: caller, limit, the policy's retry_after) when the caller
  // is at its max_inflight. On success a reservation is held: Commit or Cancel it.
  absl::StatusOr<std::shared_ptr<const CallerShare>> Reserve(const CallerPolicy& policy) ABSL_LOCKS_EXCLUDED(mu_);
  // The reservation became `lease_id` on `account` (counted until Released or the lease timeout):
  // how many more leases the caller may hold (with a max_inflight). Or, when the fleet's ledger
  // finds that the account would take the caller past max_accounts or a tier's share (another
  // replica's lease took the last one), `refused_limit` (for LimitError, should the call give up)
  // and the share of the accounts it holds to try instead; the reservation stays.
  struct Committed {
    std::optional<int> leases_left;
    std::string refused_limit;  // empty: committed
    std::string detail;
    std::shared_ptr<const CallerShare> retry_share;
  };
  Committed Commit(const CallerPolicy& policy, const std::string& lease_id, const std::string& account, Tier tier)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The reservation ended without a lease.
  void Cancel(const CallerPolicy& policy) { ledger_->Cancel(policy.name); }
  // The lease was reported: its caller's count drops. Unknown ids are ignored.
  void Released(const std::string& lease_id) { ledger_->Release(lease_id); }
  // A call of the policy's caller starts waiting (max_wait): false when max_waiting already do.
  bool StartWaiting(const CallerPolicy& policy) ABSL_LOCKS_EXCLUDED(mu_);
  void StopWaiting(const CallerPolicy& policy) { ledger_->StopWaiting(policy.name); }
  // The RESOURCE_EXHAUSTED of a refusal for `limit` (also counted).
  absl::Status LimitError(const CallerPolicy& policy, absl::string_view limit, absl::string_view detail)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Statistics of the configured entries (and of refusals of callers without one).
  std::map<std::string, CallerStats> Stats() ABSL_LOCKS_EXCLUDED(mu_);

  static constexpr absl::string_view kUnlisted = "unlisted";

 private:
  void CountRefusal(const std::string& entry, absl::string_view limit) ABSL_LOCKS_EXCLUDED(mu_);

  const Clock& clock_;
  const absl::Duration lease_timeout_;
  std::unique_ptr<CallerLedger> ledger_;  // replaced only before the first call
  mutable absl::Mutex mu_;
  std::shared_ptr<const CallerPolicies> policies_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const FamilyMap> families_ ABSL_GUARDED_BY(mu_) = FamilyMap::Default();
  PoolShape shape_ ABSL_GUARDED_BY(mu_);
  // Counters by entry: only entries of the policies in force (and kUnlisted) are kept.
  std::map<std::string, int64_t> issued_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, std::string>, int64_t> refused_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenbroker
