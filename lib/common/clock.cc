#include "lib/common/clock.h"

#include <algorithm>

#include "absl/time/clock.h"

namespace tokenbroker {
namespace {

class RealClock : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  bool AwaitUntil(absl::Mutex& mu, const absl::Condition& condition, absl::Time deadline) const override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (deadline == absl::InfiniteFuture()) {
      mu.Await(condition);
      return true;
    }
    return mu.AwaitWithDeadline(condition, deadline);
  }
};

}  // namespace

Clock& Clock::Real() {
  static RealClock* clock = new RealClock();
  return *clock;
}

absl::Time FakeClock::Now() const {
  absl::MutexLock lock(&mu_);
  return now_;
}

bool FakeClock::AwaitUntil(absl::Mutex& mu, const absl::Condition& condition, absl::Time deadline) const
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Registration takes waiters_mu_, which ranks before `mu`: done with `mu` released (a wait
  // releases it anyway; the caller re-checks its state after any wait).
  mu.Unlock();
  {
    absl::MutexLock lock(&waiters_mu_);
    waiters_.push_back(&mu);
  }
  mu.Lock();
  struct Args {
    const absl::Condition* condition;
    const FakeClock* clock;
    absl::Time deadline;
  } args{&condition, this, deadline};
  mu.Await(absl::Condition(
      +[](Args* a) { return a->condition->Eval() || a->clock->Now() >= a->deadline; }, &args));
  mu.Unlock();
  {
    absl::MutexLock lock(&waiters_mu_);
    waiters_.erase(std::find(waiters_.begin(), waiters_.end(), &mu));
  }
  mu.Lock();
  return condition.Eval();
}

void FakeClock::WakeWaiters() {
  absl::MutexLock lock(&waiters_mu_);
  std::vector<absl::Mutex*> seen;
  for (absl::Mutex* waiter : waiters_) {
    if (std::find(seen.begin(), seen.end(), waiter) != seen.end()) continue;
    seen.push_back(waiter);
    waiter->Lock();
    waiter->Unlock();  // absl re-evaluates the conditions of this mutex's waiters
  }
}

void FakeClock::Advance(absl::Duration d) {
  {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }
  WakeWaiters();
}

void FakeClock::Set(absl::Time t) {
  {
    absl::MutexLock lock(&mu_);
    now_ = t;
  }
  WakeWaiters();
}

int FakeClock::waiters() const {
  absl::MutexLock lock(&waiters_mu_);
  return static_cast<int>(waiters_.size());
}

}  // namespace tokenbroker
