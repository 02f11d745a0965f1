#include "lib/broker/wait_queue.h"

#include <algorithm>
#include <vector>


namespace tokenbroker {

WaitQueue::WaitQueue(const Clock& clock) : clock_(clock), thread_([this] { Loop(); }) {}

WaitQueue::~WaitQueue() { Shutdown(); }

WaitQueue::ParkResult WaitQueue::Park(Key key, absl::Time when, Retry retry, int priority) {
  bool cancelled = false;
  {
    absl::MutexLock lock(&mu_);
    Call& call = calls_[key];
    known_.store(calls_.size(), std::memory_order_release);
    cancelled = call.cancelled;
    if (!cancelled && !stopping_) {
      if (call.since == absl::InfiniteFuture()) call.since = clock_.Now();
      call.parked = parked_.emplace(when, Waiter{key, std::move(retry), priority, call.since});
      changed_ = true;
      return ParkResult::kParked;
    }
  }
  // Not parked: it runs now, unlocked.
  std::move(retry)(cancelled ? Wake::kCancelled : Wake::kFinal);
  return cancelled ? ParkResult::kCancelled : ParkResult::kRanNow;
}

bool WaitQueue::Cancel(Key key) {
  Retry cancelled;  // runs after the lock is released
  {
    absl::MutexLock lock(&mu_);
    Call& call = calls_[key];
    known_.store(calls_.size(), std::memory_order_release);
    call.cancelled = true;
    if (!call.parked) return false;
    cancelled = std::move((*call.parked)->second.retry);
    parked_.erase(*call.parked);
    call.parked.reset();
  }
  std::move(cancelled)(Wake::kCancelled);
  return true;
}

void WaitQueue::Forget(Key key) {
  if (known_.load(std::memory_order_acquire) == 0) return;
  Retry dropped;
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(key);
  if (it == calls_.end()) return;
  if (it->second.parked) {  // not expected (a parked call is not done), but never leave a dangling entry
    dropped = std::move((*it->second.parked)->second.retry);
    parked_.erase(*it->second.parked);
  }
  calls_.erase(it);
  known_.store(calls_.size(), std::memory_order_release);
}

void WaitQueue::Notify() {
  absl::MutexLock lock(&mu_);
  if (!parked_.empty()) notified_ = true;
}

size_t WaitQueue::size() const {
  absl::MutexLock lock(&mu_);
  return parked_.size();
}

void WaitQueue::Shutdown() {
  Parked left;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  thread_.join();
  {
    absl::MutexLock lock(&mu_);
    left.swap(parked_);
    for (auto& [key, call] : calls_) call.parked.reset();
  }
  for (auto& [when, entry] : left) std::move(entry.retry)(Wake::kFinal);
}

void WaitQueue::Loop() {
  while (true) {
    std::vector<Waiter> due;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || notified_ || (!parked_.empty() && parked_.begin()->first <= clock_.Now());
      };
      while (!ready()) {
        changed_ = false;
        // Until the earliest retry is due (on the clock), or a Park, Notify or Shutdown.
        const absl::Time wake = parked_.empty() ? absl::InfiniteFuture() : parked_.begin()->first;
        clock_.AwaitUntil(mu_,
                          absl::Condition(
                              +[](WaitQueue* q) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                return q->stopping_ || q->notified_ || q->changed_;
                              },
                              this),
                          wake);
      }
      if (stopping_) return;
      const absl::Time now = clock_.Now();
      auto end = notified_ ? parked_.end() : parked_.upper_bound(now);
      for (auto it = parked_.begin(); it != end;) {
        if (auto call = calls_.find(it->second.key); call != calls_.end()) call->second.parked.reset();
        due.push_back(std::move(it->second));
        it = parked_.erase(it);
      }
      notified_ = false;
    }
    // Higher priority first, then the longest waiting: the first to run takes what freed.
    std::stable_sort(due.begin(), due.end(), [](const Waiter& a, const Waiter& b) {
      return a.priority != b.priority ? a.priority > b.priority : a.since < b.since;
    });
    for (Waiter& w : due) std::move(w.retry)(Wake::kDue);
  }
}

}  // namespace tokenbroker
