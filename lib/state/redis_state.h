#pragma once

#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "lib/common/clock.h"
#include "lib/state/redis_connection.h"
#include "lib/selection/shared_state.h"

namespace tokenbroker {

struct RedisStateOptions {
  RedisAddress address;
  // Every key and the event channel start with this.
  std::string prefix = "tokenbroker:";
  // Bound on one round trip on the request path; past it the backend counts as down.
  absl::Duration command_timeout = absl::Milliseconds(50);
  // Connecting (in the background) and resync round trips.
  absl::Duration connect_timeout = absl::Seconds(1);
  // How long a session binding lives in Redis without use (the pool's idle TTL).
  absl::Duration session_ttl = absl::Hours(1);
  // How long a lease lives in Redis unreported (the pool's lease timeout).
  absl::Duration lease_ttl = absl::Minutes(10);
  // How long one replica may hold an account's refresh lock.
  absl::Duration refresh_lock_ttl = absl::Seconds(20);
  // The background writer collects lease and session-TTL writes this long before sending them as
  // one batch (other writes go at once).
  absl::Duration write_linger = absl::Milliseconds(10);
  // How long a runtime disable is remembered in Redis.
  absl::Duration disable_ttl = absl::Hours(24 * 30);
  // The time source (null: the real clock); must outlive the state.
  const Clock* clock = nullptr;
};

// Counters for metrics and health.
struct SharedStateStats {
  bool up = false;
  int64_t errors = 0;          // failed round trips and lost connections
  int64_t resyncs = 0;         // completed (re)connections with a full resync
  int64_t events_received = 0; // changes applied from other replicas
  int64_t writes = 0;          // commands written through
  int64_t writes_dropped = 0;  // not written because Redis was down (resync makes up for them)
  // Fleet-wide admission round trips (issue 16), by answer; `unanswered` fell back to the local count.
  int64_t admissions = 0;
  int64_t admissions_at_cap = 0;
  int64_t admissions_probe_elsewhere = 0;
  int64_t admissions_unanswered = 0;
  // Caller budget round trips (issue 16.2) Redis answered; those unanswered fell back to the local count.
  int64_t caller_round_trips = 0;
  int64_t caller_unanswered = 0;
};

// SharedState over one Redis server (docs/ARCHITECTURE.md §7). Writes go through a background writer that
// pipelines them; changes of other replicas arrive on a pub/sub channel and are applied to the
// listener (the local view); round trips on the request path are few (new or moved sessions,
// foreign leases, token refresh) and bounded by command_timeout. While Redis is unreachable it
// answers at once as down, drops writes, and reconnects in the background; on (re)connect it
// resyncs: the other replicas' cooldowns and disables are merged in (the later cooldown end
// wins), this replica's sessions are claimed where Redis has none (a binding already in Redis
// wins), and the stored tokens are fetched.
class RedisState : public SharedState {
 public:
  explicit RedisState(RedisStateOptions options);
  ~RedisState() override;  // Stop()s

  // Starts the background threads; `listener` must outlive Stop().
  void Start(SharedStateListener* listener);
  void Stop();
  // Waits up to `timeout` for the first successful resync; whether it happened.
  bool WaitUntilUp(absl::Duration timeout);
  SharedStateStats stats() const;
  const std::string& replica_id() const { return replica_; }

  bool Up() const override { return up_.load(std::memory_order_acquire); }
  std::optional<std::string> ClaimSession(const std::string& session, const std::string& expected,
                                          const std::string& want) override;
  void TouchSession(const std::string& session) override;
  void LeaseIssued(const std::string& lease_id, const std::string& account, const std::string& model) override;
  void LeaseEnded(const std::string& lease_id) override;
  std::optional<SharedLease> TakeLease(const std::string& lease_id) override;
  void OutcomeApplied(const SharedOutcome& outcome, const std::optional<CooldownState>& cooldowns) override;
  void AccountDisabled(const std::string& account, const std::string& reason) override;
  void TokenDropped(const std::string& account) override;
  void AccountReset(const std::string& account, const std::string& model, bool enabled,
                    const std::optional<CooldownState>& cooldowns) override;
  std::optional<SharedToken> FetchToken(const std::string& account, absl::Time min_expiry) override;
  absl::StatusOr<int64_t> LockRefresh(const std::string& account, absl::Time min_expiry) override;
  bool StoreToken(const std::string& account, const SharedToken& token, int64_t fence) override;
  void UnlockRefresh(const std::string& account, int64_t fence) override;
  bool WaitForToken(const std::string& account, absl::Time deadline) override;
  std::optional<AdmissionResult> Admit(const AdmissionRequest& request) override;
  void ReleaseAdmission(const std::string& account, const std::string& model, const std::string& lease_id,
                        const std::vector<std::string>& family_scopes = {}) override;
  std::optional<CallerReserveResult> ReserveCaller(const CallerReserveRequest& request) override;
  std::optional<CallerCommitResult> CommitCaller(const CallerCommitRequest& request) override;
  void CancelCaller(const std::string& entry, const std::string& reservation) override;
  void ReleaseCaller(const std::string& lease_id) override;

 private:
  using Argv = std::vector<std::string>;

  std::string Key(absl::string_view kind, absl::string_view id) const;
  // The hash holding a lease: one per issuing table, named by the id's random prefix.
  std::string LeaseKey(const std::string& lease_id) const;
  // Fleet-wide admission: the account's set of reserved leases, and a probe token on (account,
  // scope) with scope "" for the whole account.
  std::string AdmissionKey(const std::string& account) const { return Key("a", account); }
  std::string ProbeKey(const std::string& account, const std::string& scope) const;
  // Caller budgets: the entry's sorted set of leases and reservations (scored by expiry), the
  // accounts its leases are on, and a lease's pointer to both (so any replica can release it by id).
  std::string CallerKey(const std::string& entry) const { return Key("a:caller", entry); }
  std::string CallerAccountsKey(const std::string& entry) const { return Key("a:caller-accounts", entry); }
  std::string CallerLeaseKey(const std::string& lease_id) const { return Key("a:caller-lease", lease_id); }
  // One round trip on a pooled connection; UNAVAILABLE at once while down.
  absl::StatusOr<RedisReply> RoundTrip(const Argv& argv);
  void Enqueue(Argv argv);
  void MarkDown(const absl::Status& why);
  void SubscriberLoop();
  void WriterLoop();
  absl::Status Resync(RedisConnection& conn);
  void Dispatch(const std::string& message);
  void BumpTokenEvent(const std::string& account);

  const RedisStateOptions options_;
  const Clock& clock_;
  const std::string replica_;
  const std::string channel_;
  SharedStateListener* listener_ = nullptr;

  std::atomic<bool> up_{false};
  std::atomic<bool> reconnect_{false};  // a writer or a round trip saw the server go away
  std::atomic<int64_t> errors_{0}, resyncs_{0}, events_received_{0}, writes_{0}, writes_dropped_{0};
  std::atomic<int64_t> admissions_{0}, admissions_at_cap_{0}, admissions_probe_elsewhere_{0},
      admissions_unanswered_{0}, caller_round_trips_{0}, caller_unanswered_{0};

  absl::Mutex pool_mu_;
  std::vector<std::unique_ptr<RedisConnection>> idle_ ABSL_GUARDED_BY(pool_mu_);

  mutable absl::Mutex queue_mu_;
  bool stopping_ ABSL_GUARDED_BY(queue_mu_) = false;
  std::deque<Argv> queue_ ABSL_GUARDED_BY(queue_mu_);
  absl::flat_hash_set<std::string> touches_ ABSL_GUARDED_BY(queue_mu_);
  // Leases live in one hash per issuing table (the id's prefix names it): a whole batch of
  // issues or ends is one HSET or HDEL, not a command per lease.
  std::vector<std::pair<std::string, std::string>> lease_adds_ ABSL_GUARDED_BY(queue_mu_);  // id, value
  std::vector<std::string> lease_dels_ ABSL_GUARDED_BY(queue_mu_);

  absl::Mutex wait_mu_;
  absl::flat_hash_map<std::string, uint64_t> token_events_ ABSL_GUARDED_BY(wait_mu_);

  std::thread subscriber_;
  std::thread writer_;
};

}  // namespace tokenbroker
