#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"
#include "lib/upstream/cloud_code_client.h"
#include "lib/upstream/egress.h"
#include "lib/upstream/http_client.h"
#include "lib/upstream/oauth_client.h"
#include "lib/monitor/quota_hub.h"
#include "lib/monitor/quota_poller.h"
#include "lib/tokens/token_manager.h"
#include "server/api/monitor_service.h"
#include "server/runtime/account_loader.h"
#include "server/runtime/metrics.h"
#include "server/runtime/servers.h"

namespace tokenbroker {

// What the monitor binary is configured with (monitor_main.cc builds it from its flags).
struct MonitorConfig {
  ServerAddresses addresses;
  std::string accounts_dir;
  std::string egress_file;  // empty: none
  OAuthOptions oauth;
  TokenManagerOptions tokens;
  std::vector<std::string> cloudcode_base_urls;
  QuotaPollerOptions poller;
  std::string metrics_listen;  // empty: no /metrics
  std::string metrics_port_file;
  absl::Duration reload_interval = absl::Seconds(5);
  absl::Duration drain_timeout = absl::Seconds(10);
};

// The monitor's parts, owned in one place: the account folder and pool, the token manager, the
// poller feeding the QuotaHub, the WatchQuota service, metrics and servers. Stop() (and the
// destructor) ends the streams, drains, then stops the poller and the refresher. Not
// thread-safe: the main thread's.
class MonitorApp {
 public:
  // Opens the account folder and checks every listen address is free; starts nothing.
  static absl::StatusOr<std::unique_ptr<MonitorApp>> Open(MonitorConfig config);
  ~MonitorApp();  // Stop()s

  // Loads the accounts, starts the parts and the servers, logs what is served and writes
  // --port_file. Call once, after BlockStopSignals.
  absl::Status Start();
  absl::Duration tick_interval() const { return config_.reload_interval; }
  // Reloads the account folder when it changed; follows health.
  void Tick();
  // Ends the quota streams (brokers keep their cache and reconnect), drains, stops. Idempotent.
  void Stop();

 private:
  explicit MonitorApp(MonitorConfig config) : config_(std::move(config)) {}
  void UpdateHealth();

  const MonitorConfig config_;
  std::unique_ptr<AccountStore> store_;
  std::unique_ptr<EgressBook> egresses_;
  std::unique_ptr<AccountPool> pool_;
  std::unique_ptr<AccountLoader> loader_;
  std::unique_ptr<HttpClient> http_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<TokenManager> tokens_;
  std::unique_ptr<CloudCodeClient> cloud_code_;
  std::unique_ptr<QuotaHub> hub_;
  std::unique_ptr<QuotaPoller> poller_;
  std::unique_ptr<MonitorService> service_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Servers> servers_;
  bool stopped_ = false;
};

}  // namespace tokenbroker
