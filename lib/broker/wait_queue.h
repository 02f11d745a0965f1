#pragma once

#include <atomic>
#include <map>
#include <optional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"

namespace tokenbroker {

// Holds retries of GetToken calls that wait (max_wait) for an account to free, without holding a
// gRPC thread: each retry runs on the queue's own thread when `clock` reaches its time, or at once
// when Notify() says that eligibility may have changed (a report, a released lease). A call its
// client abandons (cancelled, or past its deadline) is Cancel()ed: it leaves the queue at once and
// its retry runs then with Wake::kCancelled (to answer the call), so it never takes a lease. Every
// parked retry runs exactly once. Thread-safe. `clock` must outlive the queue.
class WaitQueue {
 public:
  // Why a retry runs.
  enum class Wake {
    kDue,        // its time came, or Notify()
    kFinal,      // the queue is shutting down: one last try, and the retry must not park again
    kCancelled,  // the call was abandoned: answer it, take nothing
  };
  using Retry = absl::AnyInvocable<void(Wake why) &&>;
  // Identifies one call across its parks (e.g. its reactor's address); the queue never
  // dereferences it.
  using Key = const void*;

  enum class ParkResult {
    kParked,     // the retry runs later
    kCancelled,  // the call was cancelled already: the retry ran at once with kCancelled
    kRanNow,     // the queue is shut down: the retry ran at once with kFinal
  };

  explicit WaitQueue(const Clock& clock);
  ~WaitQueue();  // Shutdown()s

  // Runs `retry` (kDue) at `when` (on the clock) or at the next Notify(), whichever comes first,
  // unless `key` is cancelled first (kCancelled, at the Cancel). After Shutdown() it runs at once
  // with kFinal. It never runs under the queue's lock nor, but for kCancelled and kFinal, on the
  // calling thread. Retries that run together (a Notify, or due at once) run in order of
  // `priority` (higher first), then of the call's age (the time its key was first parked).
  ParkResult Park(Key key, absl::Time when, Retry retry, int priority = 0) ABSL_LOCKS_EXCLUDED(mu_);
  // The call `key` was abandoned: its parked retry (if any) runs now, on this thread, with
  // kCancelled, and a later Park of it does the same. True when a parked retry ran.
  bool Cancel(Key key) ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets `key` (its call is done). Call once per key that was Park()ed or Cancel()ed.
  void Forget(Key key) ABSL_LOCKS_EXCLUDED(mu_);
  void Notify() ABSL_LOCKS_EXCLUDED(mu_);
  // Runs every parked retry now with kFinal, and stops the thread. Idempotent.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);
  // Retries parked now.
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Waiter {
    Key key;
    Retry retry;
    int priority = 0;
    absl::Time since;  // the call's first park
  };
  using Parked = std::multimap<absl::Time, Waiter>;
  struct Call {
    bool cancelled = false;
    absl::Time since = absl::InfiniteFuture();  // first parked
    std::optional<Parked::iterator> parked;
  };

  void Loop() ABSL_LOCKS_EXCLUDED(mu_);

  const Clock& clock_;

  mutable absl::Mutex mu_;
  Parked parked_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Key, Call> calls_ ABSL_GUARDED_BY(mu_);
  // calls_.size(), written under mu_: Forget of a call never parked nor cancelled (nearly every
  // GetToken) returns without the lock when nothing is known. A call's Cancel and Forget come
  // from its own reactor, one after the other, so the unlocked read cannot miss its own entry.
  std::atomic<size_t> known_{0};
  bool notified_ ABSL_GUARDED_BY(mu_) = false;  // run everything now
  bool changed_ ABSL_GUARDED_BY(mu_) = false;   // a retry was parked: recompute the next wake-up
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tokenbroker
