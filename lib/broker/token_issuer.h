#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/selection/account_pool.h"
#include "lib/broker/caller_admission.h"
#include "lib/broker/wait_queue.h"
#include "lib/common/clock.h"
#include "lib/tokens/token_manager.h"

namespace tokenbroker {

struct TokenIssuerOptions {
  // Attempts at a token (each on another account) before the call fails with the last error.
  int max_attempts = 3;
  // With a shared state backend attached to the pool, selection (which may wait on a Redis round
  // trip: a session claim, a lease takeover) runs on this many threads of the issuer's own, never
  // on the caller's thread.
  int selection_workers = 4;
  // Most calls queued for those threads; beyond it a call fails at once with UNAVAILABLE.
  size_t max_queued = 10'000;
};

// One GetToken, as the use case sees it (no gRPC). The fields are validated by the caller.
struct IssueRequest {
  SelectRequest select;
  // How long the call may wait for an account to free when none is eligible; zero: not at all.
  absl::Duration max_wait = absl::ZeroDuration();
  // The caller's own deadline (the refresh give-up is budgeted from it); infinite: none.
  absl::Time call_deadline = absl::InfiniteFuture();
  // Identifies the call for Cancel() and Forget() (e.g. its reactor's address); never dereferenced.
  // Null: the issuer picks one, and the call cannot be Cancel()ed (it still sees `cancelled`).
  WaitQueue::Key key = nullptr;
  // Whether the caller went away; may be called from any thread. Null: never.
  absl::AnyInvocable<bool() const> cancelled;
  // Among calls waiting for an account, higher priorities are served first (then the oldest).
  // With caller policies, the caller's policy sets it.
  int priority = 0;
};

// What an issued token comes with: the selection (its lease is the caller's to report) and the token.
struct Issued {
  Selection selection;
  AccessToken token;  // secret
  // Under a caller policy: its entry, and with max_inflight the leases the caller may still take.
  std::string caller_policy;
  std::optional<int> caller_leases_left;
};

// The GetToken use case: select an account (AccountPool::Select), acquire its token
// (TokenManager::Acquire); when the token cannot be had, leave the account out and try again
// (accounts whose tokens are in trouble come last, short-lived tokens only when nothing else is
// eligible); when no account is eligible and the caller gave max_wait, park the call in the wait
// queue until an account frees, a Notify() or the end of max_wait; and say why in the error (a
// token failure behind RESOURCE_EXHAUSTED becomes its cause).
//
// Issue() never blocks the caller's thread on I/O: without a shared state backend the selection
// runs inline (in-memory) and a token refresh is waited for on the token manager's threads; with
// one (pool.shared_state() != nullptr) the selection runs on the issuer's own bounded threads.
//
// Thread-safe. `pool`, `tokens` and `clock` must outlive the issuer.
class TokenIssuer {
 public:
  // `done` gets the token, or the error: CANCELLED when the caller went away (its lease, if any,
  // is given back), RESOURCE_EXHAUSTED (with RetryDelay) when no account is eligible,
  // UNAVAILABLE when no token could be had or the issuer is overloaded or shut down.
  using Done = absl::AnyInvocable<void(absl::StatusOr<Issued>) &&>;

  TokenIssuer(TokenIssuerOptions options, AccountPool& pool, TokenManager& tokens, const Clock& clock);
  ~TokenIssuer();  // Shutdown()s

  TokenIssuer(const TokenIssuer&) = delete;
  TokenIssuer& operator=(const TokenIssuer&) = delete;

  // Applies caller policies (issue 16.1) from now on: each call is admitted by `admission` (its
  // caller's entry and model; a lease within its limits, or RESOURCE_EXHAUSTED naming the limit;
  // while it waits, at most max_waiting calls of a caller), and waits by its caller's priority.
  // Null (the default): no policy. Call before the first Issue; `admission` must outlive the issuer.
  void SetCallerAdmission(CallerAdmission* admission) { admission_ = admission; }

  // Calls `done` exactly once, on this thread or another (never under a lock of the issuer).
  void Issue(IssueRequest request, Done done) ABSL_LOCKS_EXCLUDED(mu_);

  // The call `key` was abandoned: when it waits, it leaves the queue and its `done` gets CANCELLED
  // now, on this thread (true); a call not waiting sees `cancelled` at its next step (false).
  bool Cancel(WaitQueue::Key key) { return waits_.Cancel(key); }
  // The call `key` is done: forget it. Call once per key given to Issue().
  void Forget(WaitQueue::Key key) { waits_.Forget(key); }
  // Eligibility may have changed (a report, an operator's reset): waiting calls try again now.
  void Notify() { waits_.Notify(); }
  // Answers every waiting call (one last try each, then the error) and stops the selection
  // threads (queued calls get UNAVAILABLE). Idempotent.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  // Calls parked until an account frees.
  size_t waiting() const { return waits_.size(); }

 private:
  struct Pending;
  // One attempt: inline, or on a selection thread when the pool has a shared state backend.
  void Dispatch(std::unique_ptr<Pending> p, bool may_wait) ABSL_LOCKS_EXCLUDED(mu_);
  // Hands the call to the selection threads (a selection that needs a Redis round trip).
  void HandOver(std::unique_ptr<Pending> p, bool may_wait) ABSL_LOCKS_EXCLUDED(mu_);
  // `on_worker`: on a selection thread, where Select may wait on the shared state.
  void Attempt(std::unique_ptr<Pending> p, bool may_wait, bool on_worker = false);
  // No account was selected: park the call, or answer it with the (rewritten) cause.
  void NoSelection(std::unique_ptr<Pending> p, bool may_wait, absl::Status status, absl::Time now);
  // Parks the call until `next` or a Notify(). Under a caller policy its reservation is given back
  // first and the wait counts against the caller's max_waiting: when that is full, the refusal is
  // returned and `p` stays with the caller.
  absl::Status Park(std::unique_ptr<Pending>& p, absl::Time next);
  // `p->chosen` holds the selection whose account's token `token` is.
  void OnToken(std::unique_ptr<Pending> p, absl::StatusOr<AccessToken> token);
  void WorkerLoop() ABSL_LOCKS_EXCLUDED(mu_);

  const TokenIssuerOptions options_;
  AccountPool& pool_;
  TokenManager& tokens_;
  const Clock& clock_;
  WaitQueue waits_;
  CallerAdmission* admission_ = nullptr;

  absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(mu_);  // started on first use
};

}  // namespace tokenbroker
