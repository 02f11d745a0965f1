#include "server/wait_queue.h"

#include <vector>

#include "absl/time/clock.h"

namespace tokenbroker {

WaitQueue::WaitQueue() : thread_([this] { Loop(); }) {}

WaitQueue::~WaitQueue() { Shutdown(); }

void WaitQueue::Park(absl::Time when, Retry retry) {
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      parked_.emplace(when, std::move(retry));
      changed_ = true;
      return;
    }
  }
  std::move(retry)(/*final_attempt=*/true);
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
  std::multimap<absl::Time, Retry> left;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  thread_.join();
  {
    absl::MutexLock lock(&mu_);
    left.swap(parked_);
  }
  for (auto& [when, retry] : left) std::move(retry)(/*final_attempt=*/true);
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
        due.push_back(std::move(it->second));
        it = parked_.erase(it);
      }
      notified_ = false;
    }
    for (Retry& retry : due) std::move(retry)(/*final_attempt=*/false);
  }
}

}  // namespace tokenbroker
