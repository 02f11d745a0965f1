#pragma once

#include <cstdint>
#include <deque>
#include <map>
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
#include "lib/account_pool.h"
#include "lib/account_store.h"
#include "lib/clock.h"
#include "lib/oauth_client.h"
#include "lib/shared_state.h"

namespace tokenbroker {

struct AccessToken {
  std::string token;  // secret
  absl::Time expiry;
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

  // Starts the workers and the background refresher. Call once.
  void Start();
  // Stops accepting work; pending callbacks get UNAVAILABLE; joins the threads. Idempotent.
  void Stop();

  // Calls `done` exactly once with a token valid for min_token_ttl (or the freshest the token
  // endpoint gives): inline when the pool holds one, else on a worker thread after a refresh.
  // Errors: FAILED_PRECONDITION when the account is disabled (also after invalid_grant),
  // UNAVAILABLE when the refresh failed or the manager is stopped, NOT_FOUND for an unknown id.
  void Acquire(const std::string& account_id, Callback done);

  // Disables the account in the pool and, persistently, in its file (e.g. a proxy reported
  // invalid_grant). A file that cannot be written is logged once; the pool keeps the state.
  void Disable(const std::string& account_id, const std::string& reason);

  // Refresh attempts so far by result: "ok", "invalid_grant", "error".
  std::map<std::string, int64_t> RefreshCounts() const;
  // Completed passes of the background refresher over the pool.
  int64_t ScanCount() const;

 private:
  // Schedules a refresh of `account_id` unless one is in flight; adds `done` to its waiters.
  void ScheduleLocked(const std::string& account_id, Callback* done) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WorkerLoop();
  void BackgroundLoop();
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

  mutable absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_map<std::string, std::vector<Callback>> inflight_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> counts_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> write_failed_ ABSL_GUARDED_BY(mu_);
  bool read_only_reported_ ABSL_GUARDED_BY(mu_) = false;
  int64_t scans_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;
};

}  // namespace tokenbroker
