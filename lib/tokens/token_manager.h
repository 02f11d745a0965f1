#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"
#include "lib/common/clock.h"
#include "lib/upstream/egress.h"
#include "lib/upstream/oauth_client.h"
#include "lib/selection/shared_state.h"

namespace tokenbroker {

struct AccessToken {
  std::string token;  // secret
  absl::Time expiry;
  // Valid for less than min_token_ttl: refreshing gave no longer-lived token (TokenTrouble::kShortLived).
  bool below_min_ttl = false;
};

struct TokenManagerOptions {
  // A token handed out stays valid at least this long.
  absl::Duration min_token_ttl = absl::Minutes(5);
  // The background refresher renews tokens expiring within this window.
  absl::Duration refresh_ahead = absl::Minutes(15);
  // How often the background refresher looks for expiring tokens.
  absl::Duration scan_interval = absl::Seconds(15);
  // Refreshes running at once.
  int workers = 4;
  // Run the background refresher (a first pass at Start, then every scan_interval). Off: tokens
  // are refreshed only on demand by Acquire.
  bool background_refresh = true;
  // After a refresh fails (other than invalid_grant), the account is not refreshed again — and
  // Acquire fails at once — for this long, doubling with each failure in a row up to
  // max_failure_backoff. A success ends it.
  absl::Duration failure_backoff = absl::Seconds(5);
  absl::Duration max_failure_backoff = absl::Minutes(5);
  // After a refresh gave a token shorter-lived than min_token_ttl, Acquire hands out that token
  // (it says when it expires) instead of refreshing again, for this long.
  absl::Duration short_token_retry = absl::Seconds(30);
};

// Why callers should try other accounts before this one (TokenManager::Troubled).
enum class TokenTrouble {
  kFailing,     // its last refresh failed and its back-off has not ended; it has no usable token
  kSlow,        // a refresh has run longer than a caller could wait; it has no usable token
  kShortLived,  // its token is valid for less than min_token_ttl, and refreshing gave no better
};

struct TokenTroubleInfo {
  TokenTrouble trouble = TokenTrouble::kFailing;
  // When it may be usable again (the back-off's end, the short token's next refresh); infinite
  // future when unknown (a slow refresh still running).
  absl::Time until = absl::InfiniteFuture();
  std::string reason;  // safe to log and to return
};

// Keeps the pool's access tokens fresh: a background loop renews tokens well before expiry, and
// Acquire refreshes on demand when a token is too old. At most one refresh per account runs at a
// time (single-flight); concurrent Acquires for it wait for the same result. `invalid_grant`
// disables the account in the pool and, persistently, in its file.
// Thread-safe. `pool`, `oauth` and `clock` must outlive it; `store` may be null (no write-back).
class TokenManager {
 public:
  using Callback = absl::AnyInvocable<void(absl::StatusOr<AccessToken>) &&>;

  TokenManager(TokenManagerOptions options, AccountPool& pool, const OAuthClient& oauth,
               const AccountStore* store, const Clock& clock);
  ~TokenManager();  // Stop()s

  // Refreshes once per account across replicas through `shared` (must outlive the manager): the
  // replica holding the account's refresh lock refreshes and stores the token; the others wait
  // for it. Call before Start; null (the default) refreshes locally.
  void AttachSharedState(SharedState* shared) { shared_ = shared; }
  // Each account's own calls leave through the egress its record names, looked up in `egresses`
  // (must outlive the manager). Call before Start; null (the default): every call goes direct and
  // an account naming an egress is not refreshed.
  void AttachEgresses(const EgressBook* egresses) { egresses_ = egresses; }
  // How the account's calls leave (direct without an egress). NOT_FOUND for an unknown account;
  // FAILED_PRECONDITION when its egress is not defined. The route holds the proxy URL: a secret.
  absl::StatusOr<EgressRoute> EgressFor(const std::string& account_id) const;
  // An egress failure (IsEgressFailure) on one of the account's calls: the account is cooled
  // (AccountPool::HoldAccount) with the reason until `until`.
  void OnEgressFailure(const std::string& account_id, const absl::Status& failure, absl::Time until);
  // Calls (refreshes, quota polls) that failed at the account's egress so far.
  int64_t EgressFailures() const;

  // Starts the workers and the background refresher. Call once.
  void Start();
  // Stops accepting work; pending callbacks get UNAVAILABLE; joins the threads. Idempotent.
  void Stop();

  // Calls `done` exactly once with a token valid for min_token_ttl (or, when refreshing gives no
  // longer-lived one, the freshest the token endpoint gave; look at its expiry): inline when the
  // pool holds one, else on a worker thread after a refresh. When the refresh has not finished
  // by `give_up` (real time), `done` gets DEADLINE_EXCEEDED then (the refresh goes on in the
  // background, and Troubled() reports the account as slow until it ends).
  // Errors: FAILED_PRECONDITION when the account is disabled (also after invalid_grant),
  // UNAVAILABLE when the refresh failed, the account's refresh is backing off after a failure
  // (at once, without calling the token endpoint) or the manager is stopped, NOT_FOUND for an
  // unknown id.
  void Acquire(const std::string& account_id, absl::Time give_up, Callback done);
  void Acquire(const std::string& account_id, Callback done) {
    Acquire(account_id, absl::InfiniteFuture(), std::move(done));
  }

  // Accounts without a usable token whose refresh is failing or slow, and accounts whose token is
  // shorter-lived than min_token_ttl: callers try the others first.
  absl::flat_hash_map<std::string, TokenTroubleInfo> Troubled() const;
  absl::Duration min_token_ttl() const { return options_.min_token_ttl; }

  // Disables the account in the pool and, persistently, in its file (e.g. a proxy reported
  // invalid_grant). A file that cannot be written is logged once; the pool keeps the state.
  void Disable(const std::string& account_id, const std::string& reason);

  // Applies what the quota poll saw of accounts' standing (monitor or embedded poller): an account
  // Google suspended (Terms of Service) is suspended in the pool, in the shared state and,
  // persistently, in its file — logged once; an account already suspended changes nothing.
  void ApplyObservations(const std::vector<QuotaObservation>& observations);
  // Accounts suspended by this process so far.
  int64_t suspensions() const ABSL_LOCKS_EXCLUDED(mu_);

  // Enables an account an operator re-enabled (after AccountPool::Reset): its file's disable is
  // cleared and its refresh back-off forgotten. A file that cannot be written is logged once.
  void Enable(const std::string& account_id);

  // Refresh attempts so far by result: "ok", "invalid_grant", "error" (a transport failure, an
  // error answer, or a 200 the broker cannot use: garbage, no access_token, an absurd expires_in).
  std::map<std::string, int64_t> RefreshCounts() const;
  // Completed passes of the background refresher over the pool.
  int64_t ScanCount() const;

 private:
  // Schedules a refresh of `account_id` unless one is in flight; adds `done` (when set) to its
  // waiters, to be answered by `give_up` at the latest.
  void ScheduleLocked(const std::string& account_id, Callback* done, absl::Time give_up)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WorkerLoop();
  void BackgroundLoop();
  // Answers the waiters whose give_up time has passed (DEADLINE_EXCEEDED).
  void GiveUpLoop();
  // The refresh back-off of an account at `now`, when one is running.
  std::optional<absl::Time> BackoffUntilLocked(const std::string& account_id, absl::Time now) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void RecordOutcomeLocked(const std::string& account_id, const absl::StatusOr<AccessToken>& result, absl::Time now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunRefresh(const std::string& account_id);
  absl::StatusOr<AccessToken> DoRefresh(const std::string& account_id);
  // Refreshes for the fleet: the token another replica stored or is getting, or a refresh under
  // the shared lock. Unset when this replica should refresh on its own (the backend is down).
  std::optional<absl::StatusOr<AccessToken>> RefreshShared(const std::string& account_id, const Credentials& creds,
                                                           absl::Time start);
  absl::StatusOr<AccessToken> RefreshWithOAuth(const std::string& account_id, const Credentials& creds,
                                               absl::Time start, int64_t fence);
  void WriteBack(const std::string& account_id, const AccountUpdate& update);

  const TokenManagerOptions options_;
  AccountPool& pool_;
  const OAuthClient& oauth_;
  const AccountStore* store_;
  const Clock& clock_;
  SharedState* shared_ = nullptr;
  const EgressBook* egresses_ = nullptr;

  mutable absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  struct Waiter {
    uint64_t id = 0;
    Callback done;
  };
  struct Failures {
    int in_a_row = 0;
    absl::Time until;  // no refresh (and Acquire fails at once) before this
    std::string last_error;
  };
  absl::flat_hash_map<std::string, std::vector<Waiter>> inflight_ ABSL_GUARDED_BY(mu_);
  // When each waiter gives up: (time, (account, waiter id)).
  std::multimap<absl::Time, std::pair<std::string, uint64_t>> give_ups_ ABSL_GUARDED_BY(mu_);
  uint64_t next_waiter_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, Failures> failures_ ABSL_GUARDED_BY(mu_);
  // Accounts whose running refresh outlasted a waiter (until it ends).
  absl::flat_hash_set<std::string> slow_ ABSL_GUARDED_BY(mu_);
  // Accounts whose last refresh gave a token shorter-lived than min_token_ttl, and when.
  absl::flat_hash_map<std::string, absl::Time> short_ ABSL_GUARDED_BY(mu_);
  // Whether any of failures_, slow_, short_ holds something (written under mu_ whenever they
  // change): Troubled(), asked on every GetToken, answers without the lock while none does.
  std::atomic<bool> any_trouble_{false};
  void NoteTroubleLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    any_trouble_.store(!failures_.empty() || !slow_.empty() || !short_.empty(), std::memory_order_release);
  }
  bool give_ups_changed_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> counts_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> write_failed_ ABSL_GUARDED_BY(mu_);
  bool read_only_reported_ ABSL_GUARDED_BY(mu_) = false;
  int64_t scans_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t egress_failures_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;
};

}  // namespace tokenbroker
