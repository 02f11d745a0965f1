#pragma once

// The state replicas share (docs/ARCHITECTURE.md §7): what one broker replica tells the others, and asks of
// them, so that a cooldown seen by one is honoured by all, a session sticks to one account
// whichever replica serves it, and a token is refreshed once across the fleet. The memory backend
// is "no SharedState at all"; RedisState is the implementation over Redis.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/selection/cooldowns.h"

namespace tokenbroker {

// An outcome a replica applied, for the others to apply too (they parse it the same way).
struct SharedOutcome {
  std::string account;
  std::string model;
  int http_status = 0;
  std::string retry_after;
  std::string error_body;
  absl::Time at;
};

// An access token some replica obtained. Holds secrets.
struct SharedToken {
  std::string access_token;
  absl::Time expiry;
  std::optional<std::string> refresh_token;  // set when the token endpoint rotated it
};

// A lease issued by some replica.
struct SharedLease {
  std::string id;
  std::string account;
  std::string model;
};

// Fleet-wide admission (issue 16, docs/ARCHITECTURE.md §7): a lease reserved against an account's
// fleet-wide in-flight cap, and the half-open probes it is to be, in one atomic step.
struct AdmissionRequest {
  std::string account;
  std::string model;
  std::string lease_id;  // the reservation's name: the lease it becomes
  int cap = 0;           // leases in flight per account across the fleet; 0: no cap (probes only)
  // Half-open probes the lease is to be: "" for the whole account, else the model. Only the replica
  // holding a probe token sends it.
  std::vector<std::string> probe_scopes;
  absl::Time now;
  absl::Time expires;  // the lease timeout: a reservation nobody releases frees itself then
  absl::Duration probe_ttl;
};

enum class AdmissionVerdict {
  kAdmitted,        // reserved (and every probe token taken)
  kAtCap,           // the account holds `cap` live reservations fleet-wide
  kProbeElsewhere,  // another replica holds a probe token: its probe is in flight
};

struct AdmissionResult {
  AdmissionVerdict verdict = AdmissionVerdict::kAdmitted;
  int in_flight = 0;                // fleet-wide reservations of the account (with this one when admitted)
  std::optional<absl::Time> frees;  // kAtCap: the earliest reservation's expiry; kProbeElsewhere: the probe's
};

// Fleet-wide caller budgets (issue 16.2, docs/ARCHITECTURE.md §7): the leases and reservations of
// one caller policy entry across the fleet, each with an expiry.
struct CallerLeaseRecord {
  std::string lease_id;
  std::string account;
  Tier tier = Tier::kUnknown;
};

// One more reservation for `entry`, made only while it holds fewer than `max_inflight` live leases
// and reservations (0: no limit).
struct CallerReserveRequest {
  std::string entry;
  std::string reservation;  // the reservation's name (unique)
  int max_inflight = 0;
  bool with_accounts = false;  // list the accounts held (costs O(accounts held)); else only count
  absl::Time now;
  absl::Time expires;  // a reservation nobody commits or cancels frees itself then
};

struct CallerReserveResult {
  bool admitted = false;
  int in_flight = 0;  // live leases and reservations fleet-wide, before this one
  std::map<std::string, Tier> accounts;  // with_accounts: the accounts its live leases are on
};

// The reservation becomes `lease` unless its account is not held by the entry yet and holding it
// would take the entry past `max_accounts` distinct accounts, or past `max_tier_accounts` of the
// lease's tier (0: no limit).
struct CallerCommitRequest {
  std::string entry;
  std::string reservation;
  CallerLeaseRecord lease;
  int max_accounts = 0;
  int max_tier_accounts = 0;
  absl::Time now;
  absl::Time expires;
};

struct CallerCommitResult {
  bool committed = false;
  int in_flight = 0;                      // committed: live leases and reservations, with this one
  std::string refused_limit;              // not committed: "max_accounts" or "max_tier_accounts"
  std::map<std::string, Tier> accounts;   // not committed: the accounts held
};

// Runtime state one replica holds, uploaded when it (re)connects.
struct LocalState {
  std::vector<std::pair<std::string, std::string>> sessions;  // session id, account id
  std::vector<std::pair<std::string, CooldownState>> cooldowns;
  std::vector<std::pair<std::string, std::string>> disabled;  // account id, reason (runtime disables)
};

// What the replica applies when another one changed something (called on the backend's thread).
class SharedStateListener {
 public:
  virtual ~SharedStateListener() = default;
  // `session` is bound to `account` (another replica bound or moved it).
  virtual void OnRemoteSession(const std::string& session, const std::string& account) = 0;
  virtual void OnRemoteOutcome(const SharedOutcome& outcome) = 0;
  virtual void OnRemoteCooldowns(const std::string& account, const CooldownState& state) = 0;
  virtual void OnRemoteDisable(const std::string& account, const std::string& reason) = 0;
  virtual void OnRemoteToken(const std::string& account, const SharedToken& token) = 0;
  // A lease this replica issued was reported to another one.
  virtual void OnRemoteLeaseEnd(const std::string& lease_id) = 0;
  // Another replica issued `count` leases on (account, model) at about `at`: they spend the
  // account's quota (fleet-wide predictive admission).
  virtual void OnRemoteLeasesIssued(const std::string& account, const std::string& model, int count,
                                    absl::Time at) = 0;
  // An operator lifted the account's cooldown on `model` (every cooldown and its streak when
  // `model` is empty) and, with `enabled`, its runtime disable.
  virtual void OnRemoteReset(const std::string& account, const std::string& model, bool enabled) = 0;
  // Called before uploading on (re)connect.
  virtual LocalState SnapshotForResync() = 0;
  // Account ids this replica holds (tokens to fetch on (re)connect).
  virtual std::vector<std::string> AccountIds() = 0;
};

// The fleet-wide state. Calls marked "async" only queue a write and never wait on the network;
// the others make one round trip, bounded by a short timeout, and fail fast (UNAVAILABLE or
// unset) while the backend is down, so a replica then carries on with its local view.
class SharedState {
 public:
  virtual ~SharedState() = default;

  virtual bool Up() const = 0;

  // Binds `session` to `want` if it is bound to `expected` ("" for unbound) or not at all;
  // returns the account it is bound to afterwards (`want`, or another replica's choice). Unset
  // when the backend is down.
  virtual std::optional<std::string> ClaimSession(const std::string& session, const std::string& expected,
                                                  const std::string& want) = 0;
  // async: the session was used (its idle TTL starts again).
  virtual void TouchSession(const std::string& session) = 0;

  // async: a lease was issued / ended (reported, released or timed out) here.
  virtual void LeaseIssued(const std::string& lease_id, const std::string& account, const std::string& model) = 0;
  virtual void LeaseEnded(const std::string& lease_id) = 0;
  // A lease issued by another replica, taken (ended) so this one can apply its outcome; unset if
  // no replica knows it.
  virtual std::optional<SharedLease> TakeLease(const std::string& lease_id) = 0;

  // async: this replica applied an outcome; `cooldowns` is the account's state after it.
  virtual void OutcomeApplied(const SharedOutcome& outcome, const std::optional<CooldownState>& cooldowns) = 0;
  // async: an account was disabled at run time (invalid_grant).
  virtual void AccountDisabled(const std::string& account, const std::string& reason) = 0;
  // async: an operator lifted cooldowns (on `model`, or all with it empty) and, with `enabled`,
  // a runtime disable of the account; `cooldowns` is its state after that. Unlike outcomes
  // (merged, never shortened), this replaces the stored state, and every replica lifts the same.
  virtual void AccountReset(const std::string& account, const std::string& model, bool enabled,
                            const std::optional<CooldownState>& cooldowns) = 0;
  // async: the account's token is bad (a 401): the stored copy is deleted (the other replicas
  // drop theirs when they apply the outcome).
  virtual void TokenDropped(const std::string& account) = 0;

  // Reserves `request.lease_id` against the account's fleet-wide cap and takes its probe tokens,
  // atomically (one round trip). Unset when the backend is down or did not answer: the caller
  // falls back to its local count.
  virtual std::optional<AdmissionResult> Admit(const AdmissionRequest& request) = 0;
  // async: the lease ended (reported, released, timed out, or taken by another replica): its
  // reservation and any probe token it holds on (account, model) or the whole account go.
  // `family_scopes`: the probe scopes of the lease's family and quota group ("@<name>"), if any.
  virtual void ReleaseAdmission(const std::string& account, const std::string& model, const std::string& lease_id,
                                const std::vector<std::string>& family_scopes = {}) = 0;

  // Caller budgets (issue 16.2): one atomic round trip each for Reserve and Commit; unset when the
  // backend is down or did not answer (the caller falls back to its local count). A refused
  // commit keeps its reservation.
  virtual std::optional<CallerReserveResult> ReserveCaller(const CallerReserveRequest& request) = 0;
  virtual std::optional<CallerCommitResult> CommitCaller(const CallerCommitRequest& request) = 0;
  // async: the reservation ended without a lease.
  virtual void CancelCaller(const std::string& entry, const std::string& reservation) = 0;
  // async: the lease ended (reported to this replica, whichever issued it); unknown ids are ignored.
  virtual void ReleaseCaller(const std::string& lease_id) = 0;

  // The freshest token any replica stored for the account, if it is valid past `min_expiry`.
  virtual std::optional<SharedToken> FetchToken(const std::string& account, absl::Time min_expiry) = 0;
  // The right to refresh `account` for everybody. A fencing number (> 0) when this replica got
  // it; 0 when another replica holds it; -1 when a token valid past `min_expiry` is already stored
  // (fetch it). UNAVAILABLE when the backend is down.
  virtual absl::StatusOr<int64_t> LockRefresh(const std::string& account, absl::Time min_expiry) = 0;
  // Stores the token obtained under `fence` and tells the other replicas; false when a newer
  // fence already stored one (this writer was too late). Releases the refresh lock.
  virtual bool StoreToken(const std::string& account, const SharedToken& token, int64_t fence) = 0;
  // Releases the refresh lock without storing (the refresh failed).
  virtual void UnlockRefresh(const std::string& account, int64_t fence) = 0;
  // Waits until another replica stores a token for `account`, or disables it, or `deadline`;
  // true when something arrived (look at the pool).
  virtual bool WaitForToken(const std::string& account, absl::Time deadline) = 0;
};

}  // namespace tokenbroker
