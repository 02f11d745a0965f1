#pragma once

// Caller budgets counted across the fleet (issue 16.2, README "Caller policies"): a CallerLedger
// over the shared state (Redis), falling back to this replica's own counts while it is down.

#include <atomic>
#include <deque>
#include <map>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "lib/broker/caller_admission.h"
#include "lib/selection/shared_state.h"

namespace tokenbroker {

// Reserve and Commit are one atomic round trip each to the shared state: Reserve counts the
// entry's live leases and reservations of every replica and adds one only below max_inflight;
// Commit turns it into the lease unless the account is new to the entry and would take it past
// max_accounts (or a tier's share) fleet-wide. Each lease and reservation expires at the lease
// timeout, so a replica that dies frees its share by then. Release by lease id works whichever
// replica issued the lease. Shares are computed from the accounts held fleet-wide (pending
// reservations of other replicas are not counted as accounts: Commit is the atomic check).
//
// When the shared state is down or does not answer in its timeout, Reserve and Commit use this
// replica's own counts (LocalCallerLedger, which always mirrors this replica's leases): each such
// decision is counted by the state backend (SharedStateStats::caller_unanswered) and the change
// is logged once per transition. Waiting counts are this replica's. Thread-safe; `state` must
// outlive the ledger.
class FleetCallerLedger final : public CallerLedger {
 public:
  FleetCallerLedger(SharedState& state, absl::Duration lease_timeout);

  AdmissionDecision Reserve(const std::string& entry, int max_inflight, absl::Time now, bool with_accounts,
                            const std::function<AdmissionDecision(const CallerUsage&)>& decide) override
      ABSL_LOCKS_EXCLUDED(mu_);
  LedgerCommit Commit(const std::string& entry, const std::string& lease_id, const std::string& account, Tier tier,
                      absl::Time now, absl::Time expires, const CommitLimits& limits) override ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(const std::string& entry) override ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<std::string> Release(const std::string& lease_id) override;
  bool StartWaiting(const std::string& entry, int max) override { return local_.StartWaiting(entry, max); }
  void StopWaiting(const std::string& entry) override { local_.StopWaiting(entry); }
  int Waiting(const std::string& entry) override { return local_.Waiting(entry); }
  // This replica's leases (the metrics of one replica).
  std::map<std::string, CallerUsage> Usage(absl::Time now) override { return local_.Usage(now); }
  bool remote() const override { return true; }

 private:
  // Reservations are fungible within an entry: Commit and Cancel take any of the entry's.
  void PushReservation(const std::string& entry, std::string id) ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<std::string> PopReservation(const std::string& entry) ABSL_LOCKS_EXCLUDED(mu_);
  // Logs when the ledger starts or stops deciding fleet-wide.
  void Answered(bool fleet);

  SharedState& state_;
  const absl::Duration lease_timeout_;
  LocalCallerLedger local_;
  const std::string prefix_;  // of this ledger's reservation ids
  std::atomic<uint64_t> next_id_{0};
  std::atomic<bool> fleet_{true};
  absl::Mutex mu_;
  // The reservations held in the shared state, by entry (entries come from the operator's file;
  // ids are bounded by the calls being served).
  std::map<std::string, std::deque<std::string>> reserved_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenbroker
