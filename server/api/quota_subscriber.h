#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <vector>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "lib/selection/account_pool.h"

namespace tokenbroker {

// The broker's end of WatchQuota: keeps one stream open to the monitor and feeds every
// observation into the pool's quota cache. A lost stream keeps the cache and reconnects by itself
// with jittered exponential backoff (100 ms up to 5 s). One thread of its own, started by the
// first Connect and joined by Stop: Connect and Disconnect only tell it, never wait (they are
// called on gRPC callback threads). Thread-safe. `pool` must outlive it.
class QuotaSubscriber {
 public:
  // `then`, when set, sees every batch after the pool (e.g. to persist suspensions).
  explicit QuotaSubscriber(AccountPool& pool,
                           std::function<void(const std::vector<QuotaObservation>&)> then = nullptr)
      : pool_(pool), then_(std::move(then)) {}
  ~QuotaSubscriber();  // Stop()s

  // Streams from `target` ("host:port" or "unix:path"), replacing any current stream (which is
  // cancelled now and ends on the subscriber's thread). Does not block.
  void Connect(const std::string& target) ABSL_LOCKS_EXCLUDED(mu_);
  // Closes the stream and stops reconnecting. Does not block. Idempotent.
  void Disconnect() ABSL_LOCKS_EXCLUDED(mu_);
  // Disconnects and joins the thread: no observation reaches the pool afterwards. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

  std::string target() const ABSL_LOCKS_EXCLUDED(mu_);
  // A stream is open and its snapshot has arrived.
  bool connected() const ABSL_LOCKS_EXCLUDED(mu_);
  // Streams opened since start (first connection and every reconnection).
  int64_t connections() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);
  // Ends the current stream (if any); the thread then follows target_.
  void ChangedLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  AccountPool& pool_;
  const std::function<void(const std::vector<QuotaObservation>&)> then_;
  mutable absl::Mutex mu_;
  std::string target_ ABSL_GUARDED_BY(mu_);  // empty: disconnected
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // bumped by every Connect and Disconnect
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  int64_t connections_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;  // of the open stream, to cancel it
  std::thread thread_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenbroker
