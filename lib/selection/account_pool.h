#pragma once

#include <cstdint>
#include <map>
#include <atomic>
#include <memory>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/common/clock.h"
#include "lib/quota/quota.h"
#include "lib/quota/quota_book.h"
#include "lib/selection/cooldowns.h"
#include "lib/selection/eligibility.h"
#include "lib/selection/lease_table.h"
#include "lib/selection/model_index.h"
#include "lib/selection/ranking.h"
#include "lib/selection/request.h"
#include "lib/selection/session_binder.h"
#include "lib/selection/shared_state.h"

namespace tokenbroker {

struct AccountView {
  std::string account_id;
  std::string email;
  Tier tier = Tier::kUnknown;
  std::string project_id;
  bool disabled = false;
  std::string disabled_reason;
  bool suspended = false;           // Google suspended it (Terms of Service); also disabled
  std::string suspension_message;
  bool proxy_disabled = false;
  std::vector<std::string> protected_models;
  std::string egress_id;  // empty: direct
  std::optional<absl::Time> token_expiry;
  std::optional<absl::Time> last_used;
  std::vector<ModelQuota> quotas;
  std::vector<BucketQuota> buckets;  // per family and window, from the monitor
  bool quota_forbidden = false;
  int bound_sessions = 0;
  std::vector<CooldownView> cooldowns;
  std::string validation_url;  // set after a 403 VALIDATION_REQUIRED
  int in_flight = 0;           // leases not yet reported
  int failure_streak = 0;
  // Until when its AI credits are taken to be exhausted; unset when they are not (or no longer).
  std::optional<absl::Time> credits_exhausted_until;
  // Why it has no Cloud Code project (the monitor's onboarding); empty when it has one or nothing
  // is known.
  std::string no_project_reason;
};

// What a proxy reports after using a token. Name the account by lease_id, or by account_id+model.
// Reports are untrusted input (docs/ARCHITECTURE.md §5): the server fills in who reports and what it may do.
// The defaults trust the reporter (in-process use and tests).
struct Outcome {
  std::string lease_id;
  std::string account_id;
  std::string model;
  int http_status = 0;
  std::string retry_after;
  std::string error_body;
  std::string caller = "-";  // who reports
  // May report a lease issued to another caller (an operator).
  bool may_report_any_lease = true;
  // May name an account without a lease of it (an operator): also needed when the lease is
  // unknown and the report falls back to account_id and model.
  bool may_name_account = true;
};

struct OutcomeResult {
  std::string account_id;
  std::string model;
  std::string family;  // the model's family (what a kFamily scope cools)
  CooldownScope scope = CooldownScope::kNone;
  absl::Time until = absl::InfinitePast();
  std::string reason;
  // Set when the answer said the account's AI credits are exhausted: until when (no cooldown).
  std::optional<absl::Time> credits_exhausted_until;
};

// What the token refresher needs of an account. Holds secrets.
struct Credentials {
  std::string refresh_token;
  std::string access_token;
  absl::Time access_expiry = absl::InfinitePast();
  bool disabled = false;
  std::string egress_id;  // empty: direct
};

// An operator's undo (ResetAccount): what reports (or a refresh's invalid_grant) did to an account.
struct ResetRequest {
  std::string account_id;
  // The cooldown on this model (and what its reported 429s made the quota estimate of its family
  // believe); empty: every cooldown, the failure streak and every such belief.
  std::string model;
  bool enable = false;  // also lift a disable
};

struct ResetResult {
  bool cooldown_lifted = false;  // a cooldown, streak or validation block was lifted
  bool enabled = false;          // the account was disabled and is enabled now
};

struct PoolOptions {
  Policy policy = Policy::kBalance;
  absl::Duration session_idle_ttl = absl::Hours(1);
  size_t max_sessions = 100'000;
  // Leases in flight per account beyond which it is skipped; 0 means no cap. With a shared state
  // that is up, the cap counts every replica's leases (an atomic reservation per lease, issue 16);
  // while it is down, this replica's own.
  int max_inflight_per_account = 0;
  // A lease not reported within this long ends by itself.
  absl::Duration lease_timeout = absl::Minutes(10);
  // Leases in flight at most (callers need not report): a lease issued to a full table first ends
  // the oldest lease of the caller holding the most (LeaseTable::MakeRoom).
  size_t max_leases = LeaseTable::kDefaultMaxLeases;
  // How long an INSUFFICIENT_G1_CREDITS_BALANCE answer that names no reset marks the account's
  // AI credits exhausted.
  absl::Duration credits_exhausted_ttl = absl::Hours(5);
  CooldownPolicy cooldowns;
};

// The loaded accounts, their runtime state, session bindings and the selection rules of
// docs/ARCHITECTURE.md §4. Thread-safe. `clock` must outlive the pool.
//
// With a SharedState attached (several replicas), it is also the replica's local view of the
// fleet's state: a new or moved session binding is claimed fleet-wide before it is used (the
// binding another replica made first wins), outcomes, leases and runtime disables are written
// through, and what other replicas change arrives through the SharedStateListener methods.
class AccountPool : public SharedStateListener {
 public:
  AccountPool(PoolOptions options, const Clock& clock);

  // Shares state with other replicas through `shared` (must outlive the pool). Call before
  // serving; null detaches.
  void AttachSharedState(SharedState* shared) { shared_.store(shared, std::memory_order_release); }
  SharedState* shared_state() const { return shared_.load(std::memory_order_acquire); }

  // Replaces the set of accounts. Runtime state (last use, bindings) of ids that stay is kept.
  void Load(std::vector<AccountRecord> records) ABSL_LOCKS_EXCLUDED(mu_);

  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);
  // Accounts that are neither disabled nor proxy-disabled.
  size_t UsableCount() const ABSL_LOCKS_EXCLUDED(mu_);
  Policy policy() const { return options_.policy; }

  // Chooses an account and records the choice (session binding, last use, a lease). UNAVAILABLE
  // when no account is loaded; RESOURCE_EXHAUSTED (made by NoAccountAvailableError: a message
  // counting the reasons, the model, and the exact delay until the earliest account can be used
  // again when one will) when none is eligible for the model.
  absl::StatusOr<Selection> Select(const SelectRequest& request) ABSL_LOCKS_EXCLUDED(mu_);

  // As Select when that needs no round trip to the shared state; unset, changing nothing, when it
  // does (a session binding to be made or moved is claimed fleet-wide first: call Select, off any
  // thread that must not wait on the network).
  std::optional<absl::StatusOr<Selection>> SelectHere(const SelectRequest& request) ABSL_LOCKS_EXCLUDED(mu_);

  // What Select would do now, for every account; changes no selection state.
  Explanation Explain(const SelectRequest& request) ABSL_LOCKS_EXCLUDED(mu_);

  // Applies what the upstream answered: ends the lease, parses the answer, cools down the account
  // or model, resets the streak on success (never ending a live cooldown), drops the token on 401
  // or a reported invalid_grant. A report never disables an account: it is a caller's word, and
  // only the broker's own token refresh (TokenManager) may disable.
  // NOT_FOUND for an unknown lease (without account_id) or account; INVALID_ARGUMENT when the model
  // is missing; PERMISSION_DENIED, changing nothing, for a lease issued to another caller (unless
  // may_report_any_lease) or a report naming an account without a lease of it (unless
  // may_name_account).
  absl::StatusOr<OutcomeResult> ReportOutcome(const Outcome& outcome) ABSL_LOCKS_EXCLUDED(mu_);

  // Ends a lease without an outcome (e.g. its token could not be had): it spent no quota, so it no
  // longer counts against the account's estimate. Unknown ids are ignored.
  void ReleaseLease(const std::string& lease_id) ABSL_LOCKS_EXCLUDED(mu_);

  std::vector<AccountView> List() const ABSL_LOCKS_EXCLUDED(mu_);

  // NOT_FOUND for an unknown id.
  absl::StatusOr<Credentials> GetCredentials(const std::string& account_id) const ABSL_LOCKS_EXCLUDED(mu_);
  // Stores a refreshed token; `refresh_token`, when set, replaces the stored one.
  void SetToken(const std::string& account_id, const std::string& access_token, absl::Time expiry,
                const std::optional<std::string>& refresh_token) ABSL_LOCKS_EXCLUDED(mu_);
  // Cools the whole account until `until` for a fault that is neither the upstream's nor the
  // account's (its egress is unreachable): the failure streak is untouched, a longer cooldown
  // stays. Here only (other replicas find out through their own calls). Unknown ids are ignored.
  void HoldAccount(const std::string& account_id, absl::Time until, const std::string& reason)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Disables the account with `reason` (for example after invalid_grant).
  void Disable(const std::string& account_id, const std::string& reason) ABSL_LOCKS_EXCLUDED(mu_);
  // Marks the account suspended by Google with the upstream's message (also disabled, with the
  // reason SuspendedReason(message)). Returns false when it already was (or is unknown).
  bool Suspend(const std::string& account_id, const std::string& message) ABSL_LOCKS_EXCLUDED(mu_);
  // The model → family map selection, cooldowns and quota use (FamilyMap::Default until set).
  void SetFamilies(std::shared_ptr<const FamilyMap> families) ABSL_LOCKS_EXCLUDED(mu_);
  std::shared_ptr<const FamilyMap> families() const ABSL_LOCKS_EXCLUDED(mu_);
  // Undoes what reports or a refresh's invalid_grant did (an operator's call), here and, through
  // the shared state, on every replica. NOT_FOUND for an unknown account. Persisting an enable in
  // the account's file is the caller's (TokenManager::Enable).
  absl::StatusOr<ResetResult> Reset(const ResetRequest& request) ABSL_LOCKS_EXCLUDED(mu_);
  // Ids of usable accounts whose access token expires before `deadline`.
  std::vector<std::string> ExpiringBefore(absl::Time deadline) const ABSL_LOCKS_EXCLUDED(mu_);

  // Proactive quota validation settings (validated by the caller with ValidateQuotaSettings).
  void SetQuotaSettings(const QuotaSettings& settings) ABSL_LOCKS_EXCLUDED(mu_);
  QuotaSettings quota_settings() const ABSL_LOCKS_EXCLUDED(mu_);
  // Feeds quota observations (from the monitor). Unknown accounts and observations older than the
  // one held are ignored. Each observation teaches the cost of one call (QuotaUsage::Learn) and,
  // when its reset time lies before the time it was taken, how far the quota API lags. A quota
  // cooldown on (account, model) ends early only as ObservationEndsExhaustion allows, and never
  // on a source known to lie about the model (fetchAvailableModels for 3p models). Non-empty tier
  // and project id update the account's.
  void UpdateQuota(const std::vector<QuotaObservation>& observations) ABSL_LOCKS_EXCLUDED(mu_);
  // How far behind the quota API's answers are taken to be (learned; at most max_lag).
  absl::Duration quota_lag() const ABSL_LOCKS_EXCLUDED(mu_);
  // Models whose last chosen account is remembered (bounded: caller input).
  size_t TrackedModels() const ABSL_LOCKS_EXCLUDED(mu_);

  // Leases issued under a fleet-wide cap without a fleet-wide reservation (the shared state was
  // down or did not answer: the local count decided).
  int64_t AdmissionFallbacks() const { return admission_fallbacks_.load(std::memory_order_relaxed); }
  // Leases ended early because the lease table was full (PoolOptions::max_leases), since start.
  int64_t LeasesEvicted() const { return leases_evicted_.load(std::memory_order_relaxed); }

  // Session rebinds since start, by reason ("new", "force_rotate", "ineligible", "expired").
  std::map<std::string, int64_t> RebindCounts() const ABSL_LOCKS_EXCLUDED(mu_);

  // SharedStateListener: what other replicas changed.
  void OnRemoteSession(const std::string& session, const std::string& account) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteOutcome(const SharedOutcome& outcome) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteCooldowns(const std::string& account, const CooldownState& state) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteDisable(const std::string& account, const std::string& reason) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteToken(const std::string& account, const SharedToken& token) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteLeaseEnd(const std::string& lease_id) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteReset(const std::string& account, const std::string& model, bool enabled) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRemoteLeasesIssued(const std::string& account, const std::string& model, int count, absl::Time at) override ABSL_LOCKS_EXCLUDED(mu_);
  LocalState SnapshotForResync() override ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<std::string> AccountIds() override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    AccountRecord record;
    absl::Time last_used = absl::InfinitePast();
    int in_flight = 0;
    AccountQuota quota;  // leases counted against its quota, learned cost, cooldown yardsticks
    // An INSUFFICIENT_G1_CREDITS_BALANCE answer: its AI credits are spent until then (its normal
    // quota is not). Replicated with the outcome that set it.
    absl::Time credits_until = absl::InfinitePast();
  };
  // Writes to the shared state decided under mu_ and sent after it is released: mu_ is never held
  // across a SharedState call. Collects nothing without a shared state.
  class Outbox {
   public:
    explicit Outbox(SharedState* shared) : shared_(shared) {}
    bool active() const { return shared_ != nullptr; }
    void Add(std::function<void(SharedState&)> op) {
      if (shared_ != nullptr) ops_.push_back(std::move(op));
    }
    void Send() {
      for (auto& op : ops_) op(*shared_);
      ops_.clear();
    }

   private:
    SharedState* shared_;
    std::vector<std::function<void(SharedState&)>> ops_;
  };
  // Every account's verdict, and the eligible ones ranked.
  struct Evaluation {
    std::vector<AccountVerdict> verdicts;  // parallel to entries_
    std::vector<size_t> ranked;            // eligible entries, best first (chosen first)
    std::optional<size_t> chosen;
    bool from_session = false;
  };
  // A choice that moves or creates a session binding, to be claimed fleet-wide before it is used.
  struct Claim {
    bool needed = false;
    std::string expected;   // the binding it replaces ("" for none)
    std::string candidate;  // the account chosen here
    std::string reason;     // "new", "force_rotate" or "ineligible"
    // Fleet-wide admission (pool_admission.cc): the candidate needs a reservation under the fleet's
    // in-flight cap and/or the fleet's half-open probe tokens of these scopes before it is used.
    bool admit = false;
    std::vector<std::string> probe_scopes;
  };
  // A candidate the shared state admitted, to be committed under the reserved lease id.
  struct Admitted {
    std::string account;
    std::string lease_id;
  };
  // Why a selection asked the shared state and was refused (the error when nothing else is left).
  struct Refusals {
    int at_cap = 0;
    std::optional<absl::Time> frees;  // the earliest refused reservation's expiry
  };
  // How many rounds Select makes (session claims and admissions) before it answers.
  static constexpr int kMaxSelectRounds = 6;

  // --- selection (pool_selection.cc) ---
  // One selection under the lock. With `claim` set, a choice that would bind the session anew is
  // not committed: it is described in *claim and an empty Selection is returned.
  // With `admitted`, commits that account under its reserved lease id, or ABORTED (nothing
  // committed) when it is no longer eligible here.
  absl::StatusOr<Selection> SelectOnce(const SelectRequest& request, Claim* claim,
                                       const Admitted* admitted = nullptr) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<Selection> SelectLocked(const SelectRequest& request, Claim* claim, absl::Time now, Outbox& out,
                                         const Admitted* admitted) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Records the choice of entry `chosen`: last use, a lease (under admitted->lease_id when given),
  // the session binding, the probe.
  absl::StatusOr<Selection> CommitLocked(const SelectRequest& request, size_t chosen, bool from_session,
                                         const std::optional<std::string>& bound, absl::Time previous_use,
                                         absl::Time now, Outbox& out, const Admitted* admitted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // --- fleet-wide admission (pool_admission.cc) ---
  // Whether the candidate must be admitted by the shared state before use; fills claim->admit.
  bool NeedsAdmissionLocked(size_t i, const SelectRequest& request, absl::Time now, Claim* claim)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The chosen account when committing an admitted one: its index, or unset when it is no longer
  // eligible here (or the session moved meanwhile).
  std::optional<size_t> AdmittedChoiceLocked(const SelectRequest& request, const Admitted& admitted,
                                             const std::optional<std::string>& bound, absl::Time now,
                                             bool* from_session) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Asks the shared state to admit claim.candidate and commits it. Unset when the backend did not
  // answer (decide locally); otherwise the selection, or ABORTED to go on with the next candidate
  // (`req` then excludes a candidate at the fleet's cap; a probe held elsewhere is marked here).
  std::optional<absl::StatusOr<Selection>> AdmitAndCommit(SharedState& shared, SelectRequest& req, const Claim& claim,
                                                          Refusals& refusals) ABSL_LOCKS_EXCLUDED(mu_);
  // RESOURCE_EXHAUSTED after refusals at the fleet's cap (RetryInfo: at most kFleetRecheck, or
  // `local`'s delay when sooner: what was left here with the refused accounts left out).
  absl::Status FleetCapError(const SelectRequest& request, const Refusals& refusals, const absl::Status& local) const;
  // The account force_rotate moves away from: the session's binding, or the model's last choice.
  std::optional<std::string> PreviousFor(const SelectRequest& request, const std::optional<std::string>& bound) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  EligibilityContext ContextFor(const SelectRequest& request, const std::optional<std::string>& previous,
                                absl::Time now) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  Eligibility CheckLocked(size_t i, const EligibilityContext& ctx, bool explain) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Every account's verdict and the eligible ones ranked (Explain, and the reasons when nothing is
  // eligible).
  Evaluation Evaluate(const SelectRequest& request, absl::Time now, const std::optional<std::string>& bound) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  RankContext RankContextFor(const SelectRequest& request) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  RankKey KeyFor(size_t i, const std::string& model, absl::Time now, const RankContext& ctx) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The best eligible account without building verdicts: the bound one when it is eligible (one
  // check), else the best eligible one in the model's index (a pass over the pool past
  // kMaxIndexedModels models). Unset when none is eligible.
  std::optional<size_t> ChooseFastLocked(const SelectRequest& request, absl::Time now,
                                         const std::optional<std::string>& bound, bool* from_session)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status NoAccountError(const Evaluation& ev, const SelectRequest& request, absl::Time now) const;
  static constexpr size_t kMaxIndexedModels = 64;
  // The index for the model, built on first use and brought up to `now`; null when not indexed.
  ModelIndex* IndexFor(const std::string& model, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Re-ranks entry `i` in every index (its use, leases or quota changed).
  void ReindexLocked(size_t i, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReindexOne(ModelIndex& index, const std::string& model, size_t i, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // --- leases and outcomes (pool_outcomes.cc) ---
  absl::StatusOr<OutcomeResult> ReportOutcomeHere(const Outcome& outcome, Outbox& out) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<OutcomeResult> ReportOutcomeLocked(const Outcome& outcome, absl::Time now, Outbox& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What an upstream answer on (entry i, model) does, reported here or by another replica: the
  // cooldown rules, and what the quota estimate learns. `lease_id` (may be empty) is the reported
  // lease, `issued_at` its issue time when it was issued here.
  // `group` is the quota group the lease's request named.
  CooldownDecision ApplyOutcomeLocked(size_t i, const std::string& model, const UpstreamError& parsed,
                                      const std::string& lease_id, std::optional<absl::Time> issued_at, absl::Time at,
                                      const std::string& group = "") ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  ResetResult ResetLocked(size_t i, const std::string& model, bool enable) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ExpireLeasesLocked(absl::Time now, Outbox& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends a lease's effects here; its fleet-wide reservation and probe token go through `out`.
  void EndLeaseLocked(const Lease& lease, Outbox& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A lease that ends without a report (timed out, pushed out of a full table, given back):
  // EndLeaseLocked, and the shared state forgets it.
  void EndUnreportedLeaseLocked(const Lease& lease, Outbox& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PoolOptions options_;
  const Clock& clock_;

  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);  // sorted by id
  absl::flat_hash_map<std::string, size_t> index_ ABSL_GUARDED_BY(mu_);
  SessionBinder sessions_ ABSL_GUARDED_BY(mu_);
  // Account last chosen per model: fill_first's sticky choice, round_robin's cursor, and what
  // force_rotate moves away from when there is no session.
  absl::flat_hash_map<std::string, std::string> last_for_model_ ABSL_GUARDED_BY(mu_);
  static constexpr size_t kMaxTrackedModels = 4096;
  std::map<std::string, int64_t> rebinds_ ABSL_GUARDED_BY(mu_);
  Cooldowns cooldowns_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::unique_ptr<ModelIndex>> model_index_ ABSL_GUARDED_BY(mu_);
  QuotaBook quota_ ABSL_GUARDED_BY(mu_);
  LeaseTable leases_ ABSL_GUARDED_BY(mu_);
  // Accounts disabled while running (not by their file): shared with other replicas.
  absl::flat_hash_map<std::string, std::string> runtime_disabled_ ABSL_GUARDED_BY(mu_);
  std::atomic<SharedState*> shared_{nullptr};
  std::atomic<int64_t> admission_fallbacks_{0};
  std::atomic<int64_t> leases_evicted_{0};
};

}  // namespace tokenbroker
