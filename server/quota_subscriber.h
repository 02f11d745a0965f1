#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "lib/selection/account_pool.h"

namespace tokenbroker {

// The broker's end of WatchQuota: keeps one stream open to the monitor and feeds every
// observation into the pool's quota cache. A lost stream keeps the cache and reconnects by itself
// with jittered exponential backoff (100 ms up to 5 s). Thread-safe. `pool` must outlive it.
class QuotaSubscriber {
 public:
  explicit QuotaSubscriber(AccountPool& pool) : pool_(pool) {}
  ~QuotaSubscriber();  // Disconnect()s

  // Streams from `target` ("host:port" or "unix:path"), replacing any current stream.
  void Connect(const std::string& target);
  // Closes the stream and stops reconnecting. Idempotent.
  void Disconnect();

  std::string target() const;
  // A stream is open and its snapshot has arrived.
  bool connected() const;
  // Streams opened since start (first connection and every reconnection).
  int64_t connections() const;

 private:
  void Loop(std::string target);
  void DisconnectLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(control_mu_);

  AccountPool& pool_;
  absl::Mutex control_mu_;  // serialises Connect and Disconnect (and owns thread_)
  mutable absl::Mutex mu_;
  std::string target_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  int64_t connections_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;  // of the open stream, to cancel it
  std::thread thread_ ABSL_GUARDED_BY(control_mu_);
};

}  // namespace tokenbroker
