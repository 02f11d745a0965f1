#pragma once

#include <map>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Holds retries of GetToken calls that wait (max_wait) for an account to free, without holding a
// gRPC thread: each retry runs on the queue's own thread at its time, or at once when Notify()
// says that eligibility may have changed (a report, a released lease). Thread-safe.
class WaitQueue {
 public:
  // `final_attempt` is true when the queue is shutting down: the retry must not park again.
  using Retry = absl::AnyInvocable<void(bool final_attempt) &&>;

  WaitQueue();
  ~WaitQueue();  // Shutdown()s

  // Runs `retry` at `when` (real time) or at the next Notify(), whichever comes first. After
  // Shutdown() it runs at once with final_attempt = true.
  void Park(absl::Time when, Retry retry);
  void Notify();
  // Runs every parked retry now with final_attempt = true, and stops the thread. Idempotent.
  void Shutdown();
  size_t size() const;

 private:
  void Loop();

  mutable absl::Mutex mu_;
  std::multimap<absl::Time, Retry> parked_ ABSL_GUARDED_BY(mu_);
  bool notified_ ABSL_GUARDED_BY(mu_) = false;  // run everything now
  bool changed_ ABSL_GUARDED_BY(mu_) = false;   // a retry was parked: recompute the next wake-up
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tokenbroker
