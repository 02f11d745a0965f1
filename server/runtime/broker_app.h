#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"
#include "lib/upstream/cloud_code_client.h"
#include "lib/upstream/egress.h"
#include "lib/upstream/http_client.h"
#include "lib/upstream/oauth_client.h"
#include "lib/monitor/quota_poller.h"
#include "lib/state/redis_state.h"
#include "lib/tokens/token_manager.h"
#include "server/api/broker_service.h"
#include "server/api/quota_subscriber.h"
#include "server/runtime/account_loader.h"
#include "server/runtime/broker_config.h"
#include "server/runtime/metrics.h"
#include "server/status/status_page.h"
#include "server/runtime/servers.h"
#include "server/security/audit_log.h"
#include "server/security/auth.h"
#include "server/security/caller_policy_file.h"

namespace tokenbroker {

// The broker binary's parts, owned in one place: the account store and loader, the pool, the token
// manager, the Redis state backend, the quota poller or subscriber, the gRPC service, metrics and
// servers. Stop() (and the destructor) takes them down in order: drain the servers (waiting calls
// answered), the quota stream, the poller, the refresher, then Redis. Not thread-safe: the main
// thread's.
class BrokerApp {
 public:
  // Opens what the configuration names — caller and admin tokens, TLS files, the audit log, the
  // account folder — and checks every listen address is free; starts nothing. The error is one
  // line naming the flag.
  static absl::StatusOr<std::unique_ptr<BrokerApp>> Open(BrokerConfig config);
  ~BrokerApp();  // Stop()s

  // Loads the accounts, starts every part and the servers, logs what is served and writes
  // --port_file. Call once, after BlockStopSignals. On error whatever started is stopped.
  absl::Status Start();
  // How often the main loop should call Tick().
  absl::Duration tick_interval() const;
  // Reloads the account folder and the tokens files every --reload_interval; follows health
  // (token refreshes, usable accounts, Redis) and logs its changes.
  void Tick();
  // Drains for up to --drain_timeout, then stops every part. Idempotent.
  void Stop();

  int port() const { return servers_ ? servers_->port() : 0; }

 private:
  class RefreshHealth;
  explicit BrokerApp(BrokerConfig config);
  // Updates the health services; returns whether the broker is SERVING.
  bool UpdateHealth();
  std::string NotServingReason() const;

  const BrokerConfig config_;
  // Opened by Open.
  std::unique_ptr<Authenticator> auth_;
  std::shared_ptr<grpc::ServerCredentials> credentials_;
  std::unique_ptr<AuditLog> audit_;
  std::unique_ptr<CallerAdmission> caller_admission_;  // with --caller_policy_file
  std::unique_ptr<CallerPolicyFile> caller_policies_;
  std::unique_ptr<AccountStore> store_;
  std::unique_ptr<EgressBook> egresses_;
  // Made by Start, in this order (and stopped in the reverse).
  std::unique_ptr<AccountPool> pool_;
  std::unique_ptr<AccountLoader> loader_;
  std::unique_ptr<HttpClient> http_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<TokenManager> tokens_;
  std::unique_ptr<RedisState> redis_;
  std::unique_ptr<CloudCodeClient> cloud_code_;
  std::unique_ptr<QuotaPoller> poller_;
  std::unique_ptr<QuotaSubscriber> subscriber_;
  std::unique_ptr<BrokerService> service_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<StatusPage> status_page_;  // after metrics_: its route goes first
  std::unique_ptr<Servers> servers_;
  std::unique_ptr<RefreshHealth> refresh_health_;
  bool serving_ = false;
  absl::Time next_reload_ = absl::InfinitePast();
  bool stopped_ = false;
};

}  // namespace tokenbroker
