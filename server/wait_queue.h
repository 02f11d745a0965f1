#pragma once

#include <map>
#include <optional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Holds retries of GetToken calls that wait (max_wait) for an account to free, without holding a
// gRPC thread: each retry runs on the queue's own thread at its time, or at once when Notify()
// says that eligibility may have changed (a report, a released lease). A call its client abandons
// (cancelled, or past its deadline) is Cancel()ed: it leaves the queue at once and its retry never
// runs, so it never takes a lease. Thread-safe.
class WaitQueue {
 public:
  // `final_attempt` is true when the queue is shutting down: the retry must not park again.
  using Retry = absl::AnyInvocable<void(bool final_attempt) &&>;
  // Identifies one call across its parks (e.g. its reactor's address); the queue never
  // dereferences it.
  using Key = const void*;

  enum class ParkResult {
    kParked,     // the retry runs later (or never, if the call is cancelled first)
    kCancelled,  // the call was cancelled already: the retry was dropped; finish the call now
    kRanNow,     // the queue is shut down: the retry ran at once with final_attempt = true
  };

  WaitQueue();
  ~WaitQueue();  // Shutdown()s

  // Runs `retry` at `when` (real time) or at the next Notify(), whichever comes first, unless
  // `key` is cancelled first. After Shutdown() it runs at once with final_attempt = true.
  ParkResult Park(Key key, absl::Time when, Retry retry);
  // The call `key` was abandoned: its parked retry (if any) is dropped now, and a later Park of it
  // answers kCancelled. True when a parked retry was dropped: the caller then finishes the call.
  bool Cancel(Key key);
  // Forgets `key` (its call is done). Call once per key that was Park()ed or Cancel()ed.
  void Forget(Key key);
  void Notify();
  // Runs every parked retry now with final_attempt = true, and stops the thread. Idempotent.
  void Shutdown();
  // Retries parked now.
  size_t size() const;

 private:
  using Parked = std::multimap<absl::Time, std::pair<Key, Retry>>;
  struct Call {
    bool cancelled = false;
    std::optional<Parked::iterator> parked;
  };

  void Loop();

  mutable absl::Mutex mu_;
  Parked parked_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Key, Call> calls_ ABSL_GUARDED_BY(mu_);
  bool notified_ ABSL_GUARDED_BY(mu_) = false;  // run everything now
  bool changed_ ABSL_GUARDED_BY(mu_) = false;   // a retry was parked: recompute the next wake-up
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tokenbroker
