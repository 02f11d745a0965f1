#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/token_manager.h"
#include "server/api/broker_service.h"
#include "server/api/quota_subscriber.h"

namespace prometheus {
class Collectable;
class Exposer;
class Registry;
}  // namespace prometheus

namespace tokenbroker {

class RpcMetrics;
class RedisState;

// The `method` label of an RPC: the method's path when these binaries serve it, "unknown" for any
// other path (paths come from the wire: a label per path would grow /metrics without bound).
std::string RpcMethodLabel(const char* method);
class QuotaHub;
class QuotaPoller;

// Prometheus /metrics for the broker on its own address: per-RPC counts by method and code and
// latency histograms by method (from a gRPC interceptor), and, read at scrape time, accounts by
// state, live cooldowns, quota fraction per account and model, token refreshes by result, session
// rebinds by reason, GetToken calls waiting, whether the quota stream is connected, and with a
// Redis state backend its health, errors, resyncs, events and writes.
// No label carries a session id, an email or a token. Thread-safe. Everything passed to Start
// must outlive the returned object.
class Metrics {
 public:
  static absl::StatusOr<std::unique_ptr<Metrics>> Start(const std::string& listen, AccountPool& pool,
                                                        TokenManager& tokens, QuotaSubscriber& subscriber,
                                                        BrokerService& service,
                                                        const RedisState* redis = nullptr);
  // The monitor's /metrics: RPC metrics, accounts by state, token refreshes, quota polls, quota
  // stream subscribers and the slowest one's backlog.
  static absl::StatusOr<std::unique_ptr<Metrics>> StartForMonitor(const std::string& listen, AccountPool& pool,
                                                                  TokenManager& tokens, const QuotaHub& hub,
                                                                  const QuotaPoller& poller);
  ~Metrics();

  // The port /metrics is served on.
  int port() const { return port_; }
  // Logs where /metrics is served and writes the port to `port_file` (when set).
  void Announce(const std::string& listen, const std::string& port_file) const;
  // Interceptor factories to pass to the gRPC server (they feed the RPC metrics).
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> Interceptors();

 private:
  Metrics() = default;
  static absl::StatusOr<std::unique_ptr<Metrics>> Serve(const std::string& listen,
                                                        std::unique_ptr<Metrics> m);
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<RpcMetrics> rpc_;
  std::shared_ptr<prometheus::Collectable> state_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace tokenbroker
