#include "server/wait_queue.h"

#include <vector>

#include "absl/time/clock.h"

namespace tokenbroker {

WaitQueue::WaitQueue() : thread_([this] { Loop(); }) {}

WaitQueue::~WaitQueue() { Shutdown(); }

WaitQueue::ParkResult WaitQueue::Park(Key key, absl::Time when, Retry retry) {
  {
    absl::MutexLock lock(&mu_);
    Call& call = calls_[key];
    if (call.cancelled) return ParkResult::kCancelled;  // `retry` is dropped on return, unlocked
    if (!stopping_) {
      call.parked = parked_.emplace(when, std::make_pair(key, std::move(retry)));
      changed_ = true;
      return ParkResult::kParked;
    }
  }
  std::move(retry)(/*final_attempt=*/true);
  return ParkResult::kRanNow;
}

bool WaitQueue::Cancel(Key key) {
  Retry dropped;  // destroyed after the lock is released
  {
    absl::MutexLock lock(&mu_);
    Call& call = calls_[key];
    call.cancelled = true;
    if (!call.parked) return false;
    dropped = std::move((*call.parked)->second.second);
    parked_.erase(*call.parked);
    call.parked.reset();
  }
  return true;
}

void WaitQueue::Forget(Key key) {
  Retry dropped;
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(key);
  if (it == calls_.end()) return;
  if (it->second.parked) {  // not expected (a parked call is not done), but never leave a dangling entry
    dropped = std::move((*it->second.parked)->second.second);
    parked_.erase(*it->second.parked);
  }
  calls_.erase(it);
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
  for (auto& [when, entry] : left) std::move(entry.second)(/*final_attempt=*/true);
}

void WaitQueue::Loop() {
  while (true) {
    std::vector<Retry> due;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || notified_ || (!parked_.empty() && parked_.begin()->first <= absl::Now());
      };
      while (!ready()) {
        changed_ = false;
        absl::Duration wait = parked_.empty() ? absl::Seconds(1) : parked_.begin()->first - absl::Now();
        mu_.AwaitWithTimeout(absl::Condition(
                                 +[](WaitQueue* q) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                   return q->stopping_ || q->notified_ || q->changed_;
                                 },
                                 this),
                             std::max(wait, absl::Milliseconds(1)));
      }
      if (stopping_) return;
      const absl::Time now = absl::Now();
      auto end = notified_ ? parked_.end() : parked_.upper_bound(now);
      for (auto it = parked_.begin(); it != end;) {
        if (auto call = calls_.find(it->second.first); call != calls_.end()) call->second.parked.reset();
        due.push_back(std::move(it->second.second));
        it = parked_.erase(it);
      }
      notified_ = false;
    }
    for (Retry& retry : due) std::move(retry)(/*final_attempt=*/false);
  }
}

}  // namespace tokenbroker
