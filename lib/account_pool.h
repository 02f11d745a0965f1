#pragma once

#include <cstdint>
#include <map>
#include <atomic>
#include <memory>
#include <set>
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
#include "lib/account.h"
#include "lib/clock.h"
#include "lib/cooldowns.h"
#include "lib/lease_table.h"
#include "lib/quota.h"
#include "lib/quota_estimate.h"
#include "lib/session_binder.h"
#include "lib/shared_state.h"

namespace tokenbroker {

// (Internal to AccountPool.) What ranks an eligible account for one request: computed once per account, compared many times.
struct RankKey {
  int tier = 0;
  int decision = 0;
  double fraction = -1;  // -1: unknown
  int in_flight = 0;
  absl::Time last_used;
  absl::Time reset = absl::InfiniteFuture();
  size_t rotation = 0;  // round robin: distance after the account last chosen for the model
  bool sticky = false;  // fill_first: the account last chosen for the model
  size_t index = 0;
};

// How eligible accounts of the same tier are ranked (docs/ARCHITECTURE.md §4).
enum class Policy { kBalance, kFillFirst, kResetSoonest, kRoundRobin };

// Accepts "balance", "fill_first", "reset_soonest", "round_robin".
absl::StatusOr<Policy> ParsePolicy(absl::string_view name);
absl::string_view PolicyName(Policy policy);

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
struct AccountView {
  std::string account_id;
  std::string email;
  Tier tier = Tier::kUnknown;
  std::string project_id;
  bool disabled = false;
  std::string disabled_reason;
  bool proxy_disabled = false;
  std::vector<std::string> protected_models;
  std::optional<absl::Time> token_expiry;
  std::optional<absl::Time> last_used;
  std::vector<ModelQuota> quotas;
  bool quota_forbidden = false;
  int bound_sessions = 0;
  std::vector<CooldownView> cooldowns;
  std::string validation_url;  // set after a 403 VALIDATION_REQUIRED
  int in_flight = 0;           // leases not yet reported
  int failure_streak = 0;
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
  CooldownScope scope = CooldownScope::kNone;
  absl::Time until = absl::InfinitePast();
  std::string reason;
};

// What the token refresher needs of an account. Holds secrets.
struct Credentials {
  std::string refresh_token;
  std::string access_token;
  absl::Time access_expiry = absl::InfinitePast();
  bool disabled = false;
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
  // Leases in flight per account beyond which it is skipped; 0 means no cap.
  int max_inflight_per_account = 0;
  // A lease not reported within this long ends by itself.
  absl::Duration lease_timeout = absl::Minutes(10);
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
  void Load(std::vector<AccountRecord> records);

  size_t size() const;
  // Accounts that are neither disabled nor proxy-disabled.
  size_t UsableCount() const;
  Policy policy() const { return options_.policy; }

  // Chooses an account and records the choice (session binding, last use, a lease). UNAVAILABLE
  // when no account is loaded; RESOURCE_EXHAUSTED (made by NoAccountAvailableError: a message
  // counting the reasons, the model, and the exact delay until the earliest account can be used
  // again when one will) when none is eligible for the model.
  absl::StatusOr<Selection> Select(const SelectRequest& request);

  // What Select would do now, for every account; changes no selection state.
  Explanation Explain(const SelectRequest& request);

  // Applies what the upstream answered: ends the lease, parses the answer, cools down the account
  // or model, resets the streak on success (never ending a live cooldown), drops the token on 401
  // or a reported invalid_grant. A report never disables an account: it is a caller's word, and
  // only the broker's own token refresh (TokenManager) may disable.
  // NOT_FOUND for an unknown lease (without account_id) or account; INVALID_ARGUMENT when the model
  // is missing; PERMISSION_DENIED, changing nothing, for a lease issued to another caller (unless
  // may_report_any_lease) or a report naming an account without a lease of it (unless
  // may_name_account).
  absl::StatusOr<OutcomeResult> ReportOutcome(const Outcome& outcome);

  // Ends a lease without an outcome (e.g. its token could not be had): it spent no quota, so it no
  // longer counts against the account's estimate. Unknown ids are ignored.
  void ReleaseLease(const std::string& lease_id);

  std::vector<AccountView> List() const;

  // NOT_FOUND for an unknown id.
  absl::StatusOr<Credentials> GetCredentials(const std::string& account_id) const;
  // Stores a refreshed token; `refresh_token`, when set, replaces the stored one.
  void SetToken(const std::string& account_id, const std::string& access_token, absl::Time expiry,
                const std::optional<std::string>& refresh_token);
  // Disables the account with `reason` (for example after invalid_grant).
  void Disable(const std::string& account_id, const std::string& reason);
  // Undoes what reports or a refresh's invalid_grant did (an operator's call), here and, through
  // the shared state, on every replica. NOT_FOUND for an unknown account. Persisting an enable in
  // the account's file is the caller's (TokenManager::Enable).
  absl::StatusOr<ResetResult> Reset(const ResetRequest& request);
  // Ids of usable accounts whose access token expires before `deadline`.
  std::vector<std::string> ExpiringBefore(absl::Time deadline) const;

  // Proactive quota validation settings (validated by the caller with ValidateQuotaSettings).
  void SetQuotaSettings(const QuotaSettings& settings);
  QuotaSettings quota_settings() const;
  // Feeds quota observations (from the monitor). Unknown accounts and observations older than the
  // one held are ignored. Each observation teaches the cost of one call (QuotaUsage::Learn) and,
  // when its reset time lies before the time it was taken, how far the quota API lags. A quota
  // cooldown on (account, model) ends early only as ObservationEndsExhaustion allows, and never
  // on a source known to lie about the model (fetchAvailableModels for 3p models). Non-empty tier
  // and project id update the account's.
  void UpdateQuota(const std::vector<QuotaObservation>& observations);
  // How far behind the quota API's answers are taken to be (learned; at most max_lag).
  absl::Duration quota_lag() const;
  // Models whose last chosen account is remembered (bounded: caller input).
  size_t TrackedModels() const;

  // Session rebinds since start, by reason ("new", "force_rotate", "ineligible", "expired").
  std::map<std::string, int64_t> RebindCounts() const;

  // SharedStateListener: what other replicas changed.
  void OnRemoteSession(const std::string& session, const std::string& account) override;
  void OnRemoteOutcome(const SharedOutcome& outcome) override;
  void OnRemoteCooldowns(const std::string& account, const CooldownState& state) override;
  void OnRemoteDisable(const std::string& account, const std::string& reason) override;
  void OnRemoteToken(const std::string& account, const SharedToken& token) override;
  void OnRemoteLeaseEnd(const std::string& lease_id) override;
  void OnRemoteReset(const std::string& account, const std::string& model, bool enabled) override;
  void OnRemoteLeasesIssued(const std::string& account, const std::string& model, int count, absl::Time at) override;
  LocalState SnapshotForResync() override;
  std::vector<std::string> AccountIds() override;

 private:
  struct Entry {
    AccountRecord record;
    absl::Time last_used = absl::InfinitePast();
    int in_flight = 0;
    QuotaUsage usage;                // leases per model family, learned call cost
    std::vector<QuotaMark> marks;    // quota cooldowns' yardsticks, one per model, at most kMaxMarks
  };
  static constexpr size_t kMaxMarks = 16;
  // What quota validation says about one (account, model) now.
  // The model's own observation and every bucket of its family are estimated; the lowest estimate
  // is the one that binds.
  struct QuotaView {
    bool fresh = false;                 // validation on and some observation within cache_ttl
    QuotaEstimate estimate;             // of the binding quota, when fresh
    QuotaReading reading;               // its last observation
    absl::string_view cost_key;         // its cost key (the family, or a bucket id); valid under mu_
    QuotaDecision decision = QuotaDecision::kUnknown;
    std::optional<double> fraction;     // to rank by: the estimate, or (validation off) the hint
    std::optional<absl::Time> reset_time;  // of the binding quota, while it lies ahead
  };
  QuotaView QuotaViewLocked(size_t i, const std::string& model, absl::Time now) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool ExhaustedLocked(size_t i, const std::string& model, absl::Time now) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The cost of one call taken for an account that has not learned its own yet.
  double CostPriorLocked(absl::string_view cost_key, Tier tier) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Counts leases against entry i's quota estimate (validation on only).
  void RecordUsageLocked(size_t i, const std::string& model, absl::Time at, int count)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What a failed call teaches the estimate: it spent nothing (its lease, issued at `issued_at`
  // here, is un-counted), and a quota 429 prices the calls since the last observation.
  // A quota 429 is also a reading: the binding quota, and every model of the family, spent at
  // `now` until `now + delay` (or their known reset).
  void LearnFromOutcomeLocked(size_t i, const std::string& model, const UpstreamError& parsed,
                              std::optional<absl::Time> issued_at, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes entry i's learned cost of `cost_key` the prior of accounts that have not learned theirs.
  void ShareLearnedCostLocked(size_t i, absl::string_view cost_key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The quota API's answers are at least `at_least` old: raises the learned lag (with a margin).
  void LearnLagLocked(absl::Duration at_least) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `o` reads a quota that a 429 showed spent (`spent`): if it still shows quota left in the same
  // window, it is older than the 429, and the lag at least that long.
  void LearnLagFromSpentLocked(const QuotaReading& spent, const QuotaObservation& o) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Applies one bucket observation (retrieveUserQuotaSummary) to entry i.
  void UpdateBucketLocked(size_t i, const QuotaObservation& o) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Remembers the quota a quota cooldown on (entry i, model) began against.
  void MarkExhaustionLocked(size_t i, const std::string& model, absl::Time at) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct Evaluation;
  // A choice that moves or creates a session binding, to be claimed fleet-wide before it is used.
  struct Claim {
    bool needed = false;
    std::string expected;   // the binding it replaces ("" for none)
    std::string candidate;  // the account chosen here
    std::string reason;     // "new", "force_rotate" or "ineligible"
  };
  // One selection under the lock. With `claim` set, a choice that would bind the session anew is
  // not committed: it is described in *claim and an empty Selection is returned.
  absl::StatusOr<Selection> SelectOnce(const SelectRequest& request, Claim* claim);
  absl::StatusOr<OutcomeResult> ReportOutcomeHere(const Outcome& outcome, SharedState* shared);
  ResetResult ResetLocked(size_t i, const std::string& model, bool enable) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void ExpireLeasesLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndLeaseLocked(const Lease& lease) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Evaluation Evaluate(const SelectRequest& request, absl::Time now,
                      const std::optional<std::string>& bound) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // What ranking needs once per request rather than once per account.
  struct RankContext {
    const std::string* sticky = nullptr;  // account last chosen for the model (fill_first)
    size_t cursor = 0;                    // its position (round_robin); entries_.size() if none
  };
  RankContext RankContextFor(const SelectRequest& request) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The rank of account `i` for the request (compared by Better in the .cc).
  RankKey KeyFor(size_t i, const std::string& model, absl::Time now, const RankContext& ctx) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool EligibleLocked(size_t i, const SelectRequest& request, absl::Time now,
                      const std::optional<std::string>& previous) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The best eligible account without building verdicts: the bound one when it is eligible (one
  // check), else the first eligible one in the model's index (a pass over the pool past
  // kMaxIndexedModels models). Unset when none is eligible.
  std::optional<size_t> ChooseFastLocked(const SelectRequest& request, absl::Time now,
                                         const std::optional<std::string>& bound, bool* from_session)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status NoAccountError(const Evaluation& ev, const SelectRequest& request, absl::Time now) const;

  // Per-model ranking index: every account ordered by its rank for the model, so a selection
  // walks from the best and stops at the first eligible account instead of scanning the pool.
  // Eligibility (cooldowns, protection, lease caps, ...) is checked on the walk; what changes the
  // rank (use, leases, quota, and quota data aging) updates the index.
  struct KeyLess {
    Policy policy;
    bool operator()(const RankKey& a, const RankKey& b) const;
  };
  struct ModelIndex {
    explicit ModelIndex(Policy policy) : order(KeyLess{policy}) {}
    std::set<RankKey, KeyLess> order;
    std::vector<RankKey> key_of;                  // by entry position
    std::multimap<absl::Time, size_t> changes;    // when an account's rank changes by itself
    std::vector<absl::Time> scheduled;            // by entry position: its latest entry in `changes`
  };
  static constexpr size_t kMaxIndexedModels = 64;
  // The index for the model, built on first use and brought up to `now`; null when not indexed.
  ModelIndex* IndexFor(const std::string& model, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Re-ranks entry `i` in every index (its use, leases or quota changed).
  void ReindexLocked(size_t i, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReindexOne(ModelIndex& index, const std::string& model, size_t i, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<std::string> PreviousFor(const SelectRequest& request,
                                         const std::optional<std::string>& bound) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

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
  QuotaSettings quota_ ABSL_GUARDED_BY(mu_);
  absl::Duration quota_lag_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  // The cost of one call last learned by any account, by "cost key/tier" and by cost key: the prior
  // of accounts that have not learned theirs (bounded: families are a fixed set, buckets at most
  // kMaxBuckets per account and named alike across accounts).
  absl::flat_hash_map<std::string, double> learned_cost_ ABSL_GUARDED_BY(mu_);
  LeaseTable leases_ ABSL_GUARDED_BY(mu_);
  // Accounts disabled while running (not by their file): shared with other replicas.
  absl::flat_hash_map<std::string, std::string> runtime_disabled_ ABSL_GUARDED_BY(mu_);
  std::atomic<SharedState*> shared_{nullptr};
};

}  // namespace tokenbroker
