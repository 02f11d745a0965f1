#pragma once

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tokenbroker {

// The source of "now" for every decision (cooldowns, token expiry, session idle TTL, waiting
// calls), so that decisions are tested on a fake clock without sleeping. Implementations are
// thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;

  // Waits until `condition` holds or this clock reaches `deadline` (InfiniteFuture: no deadline),
  // releasing `mu` while it waits, like absl::Mutex::AwaitWithDeadline; returns whether
  // `condition` holds. `condition` is evaluated with `mu` held, and re-evaluated whenever `mu` is
  // released by another thread. `mu` must outlive the wait.
  virtual bool AwaitUntil(absl::Mutex& mu, const absl::Condition& condition, absl::Time deadline) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) = 0;

  // The process-wide real clock. Never destroyed.
  static Clock& Real();
};

// A clock that moves only when told to; Advance and Set wake the AwaitUntil waiters whose
// deadline they reach. Thread-safe.
class FakeClock : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'800'000'000)) : now_(start) {}
  absl::Time Now() const override ABSL_LOCKS_EXCLUDED(mu_);
  bool AwaitUntil(absl::Mutex& mu, const absl::Condition& condition, absl::Time deadline) const override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu);
  void Advance(absl::Duration d) ABSL_LOCKS_EXCLUDED(mu_, waiters_mu_);
  void Set(absl::Time t) ABSL_LOCKS_EXCLUDED(mu_, waiters_mu_);
  // AwaitUntil calls waiting now (for tests that must know a thread is parked on the clock).
  int waiters() const ABSL_LOCKS_EXCLUDED(waiters_mu_);

 private:
  // Locks and unlocks every waiter's mutex, so that absl re-evaluates their conditions (which
  // read Now()).
  void WakeWaiters() ABSL_LOCKS_EXCLUDED(waiters_mu_);

  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
  // Lock order: waiters_mu_, then a waiter's mutex, then mu_ (a condition reads Now()). A waiter
  // registers and unregisters without holding its own mutex.
  mutable absl::Mutex waiters_mu_;
  mutable std::vector<absl::Mutex*> waiters_ ABSL_GUARDED_BY(waiters_mu_);
};

}  // namespace tokenbroker
