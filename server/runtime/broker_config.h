#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/selection/account_pool.h"
#include "lib/broker/token_issuer.h"
#include "lib/upstream/oauth_client.h"
#include "lib/monitor/quota_poller.h"
#include "lib/state/redis_state.h"
#include "lib/tokens/token_manager.h"
#include "server/runtime/servers.h"

namespace tokenbroker {

// Everything the broker binary is configured with, checked: built from its flags (and the
// environment: the OAuth client, the Redis password), then handed to BrokerApp.
struct BrokerConfig {
  ServerAddresses addresses;               // --listen, --health_listen
  std::string accounts_dir;                // --accounts_dir
  std::string egress_file;                 // --egress_file; empty: none
  PoolOptions pool;                        // --policy, --session_ttl, --max_sessions, leases, cooldowns
  QuotaSettings quota;                     // --quota_*; enabled with a monitor or the embedded poller
  std::shared_ptr<const FamilyMap> families;  // --model_families_file over the built-in rules
  std::string quota_monitor;               // --quota_monitor; empty: none at start
  bool embedded_monitor = false;           // --embedded_monitor
  QuotaPollerOptions poller;               // --poll_interval, --poll_concurrency (embedded monitor)
  std::optional<RedisStateOptions> redis;  // --state_backend=redis://...; none: memory
  OAuthOptions oauth;                      // --oauth_*, $TOKENBROKER_OAUTH_CLIENT_*
  TokenManagerOptions tokens;              // --min_token_ttl, --refresh_*
  std::vector<std::string> cloudcode_base_urls;
  TokenIssuerOptions issuer;
  std::string metrics_listen;              // empty: no /metrics
  std::string metrics_port_file;
  bool status_show_emails = false;         // --status_show_emails
  std::string caller_tokens_file;
  std::string admin_token_file;
  std::string caller_policy_file;          // empty: no caller policies
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  std::string audit_log;                   // empty: no audit log
  absl::Duration reload_interval = absl::Seconds(5);
  absl::Duration drain_timeout = absl::Seconds(10);
};

// Checks the broker's flags and the shared ones (setting up logging) in a fixed order; the first
// fault is INVALID_ARGUMENT with one line naming the flag ("--max_sessions must be at least 1").
// Reads no file: AccountStore, tokens files, TLS and the audit log are opened by BrokerApp::Open.
absl::StatusOr<BrokerConfig> BrokerConfigFromFlags();

}  // namespace tokenbroker
