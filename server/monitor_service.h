#pragma once

#include "lib/quota_hub.h"
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
                                                               const v1::WatchQuotaRequest* request) override;

 private:
  QuotaHub& hub_;
};

}  // namespace tokenbroker
