#pragma once

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "lib/monitor/quota_hub.h"
#include "tokenbroker/v1/monitor.grpc.pb.h"

namespace tokenbroker {

// QuotaMonitorService over a QuotaHub: each WatchQuota stream gets the full snapshot, then every
// change, one message in flight at a time; what changes while a message is in flight is coalesced
// in the hub (latest state per key), so a stalled reader never grows memory beyond one entry per
// (account, model). Thread-safe. `hub` must outlive the service and every stream.
class MonitorService final : public v1::QuotaMonitorService::CallbackService {
 public:
  explicit MonitorService(QuotaHub& hub) : hub_(hub) {}

  grpc::ServerWriteReactor<v1::WatchQuotaResponse>* WatchQuota(grpc::CallbackServerContext* context,
                                                               const v1::WatchQuotaRequest* request) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Ends every open stream with UNAVAILABLE, and any new one at once, so a draining monitor is
  // not held up by streams that never end by themselves (brokers reconnect and keep their cache).
  void CloseStreams() ABSL_LOCKS_EXCLUDED(mu_);

  // (Internal.) How the hub and CloseStreams reach a stream that may already be gone.
  struct Link {
    absl::Mutex mu;
    grpc::ServerWriteReactor<v1::WatchQuotaResponse>* reactor ABSL_GUARDED_BY(mu) = nullptr;
  };

 private:
  QuotaHub& hub_;
  absl::Mutex mu_;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<std::shared_ptr<Link>> links_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenbroker
