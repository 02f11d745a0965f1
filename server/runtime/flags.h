#pragma once

// The flags both binaries take (--listen, --accounts_dir, OAuth, token refresh, logging, drain)
// and what is built from them. Flag names appear in every error, so an operator knows which to fix.

#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "lib/monitor/quota_poller.h"
#include "lib/tokens/account_store.h"
#include "lib/upstream/oauth_client.h"
#include "lib/tokens/token_manager.h"
#include "server/runtime/servers.h"

ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, health_listen);
ABSL_DECLARE_FLAG(std::string, port_file);
ABSL_DECLARE_FLAG(std::string, accounts_dir);
ABSL_DECLARE_FLAG(std::string, oauth_token_url);
ABSL_DECLARE_FLAG(std::string, oauth_client_id);
ABSL_DECLARE_FLAG(std::string, oauth_client_secret);
ABSL_DECLARE_FLAG(std::string, cloudcode_base_url);
ABSL_DECLARE_FLAG(std::string, egress_file);
ABSL_DECLARE_FLAG(absl::Duration, min_token_ttl);
ABSL_DECLARE_FLAG(absl::Duration, refresh_ahead);
ABSL_DECLARE_FLAG(absl::Duration, refresh_scan_interval);
ABSL_DECLARE_FLAG(int, refresh_workers);
ABSL_DECLARE_FLAG(absl::Duration, reload_interval);
ABSL_DECLARE_FLAG(absl::Duration, drain_timeout);
ABSL_DECLARE_FLAG(std::string, log_format);
ABSL_DECLARE_FLAG(std::string, log_level);

namespace tokenbroker {

// Prints "<program>: <message>" to stderr and returns exit status 2 (bad configuration).
int FailStartup(const std::string& program, const std::string& message);

// Checks the shared flags and sets up logging. The message names the flag.
absl::Status CheckCommonFlags();

// Checks that the addresses of --listen, --health_listen and `metrics_listen` (each may be empty:
// off) can be served on (CheckListenAddress), so that a taken port is one line before anything
// starts or logs. Servers::Start checks again (the port may be taken meanwhile).
absl::Status CheckListenFlags(const std::string& metrics_listen);

// OAuth and token-manager options from the shared flags (client id/secret fall back to
// $TOKENBROKER_OAUTH_CLIENT_ID / $TOKENBROKER_OAUTH_CLIENT_SECRET).
OAuthOptions OAuthOptionsFromFlags();
// Logs a warning when `options` has no client id (Google will reject every refresh).
void WarnIfNoOAuthClient(const OAuthOptions& options);
TokenManagerOptions TokenManagerOptionsFromFlags();
// --cloudcode_base_url, comma-separated, tried in order.
std::vector<std::string> CloudCodeBaseUrls();

// --onboard_timeout and --onboard_retry (quota polling); INVALID_ARGUMENT naming the flag.
absl::StatusOr<OnboardingOptions> OnboardingOptionsFromFlags();
// Makes `poller` write each account it onboards into its file in `store` (must outlive the
// poller); a file that cannot be written is logged, the project kept in memory.
void PersistOnboardedProjects(const AccountStore& store, QuotaPollerOptions& poller);

// --listen and --health_listen.
ServerAddresses ServerAddressesFromFlags();

// Writes --port_file (atomically), if set. Call once health says what it should.
void WritePortFile(int port);

}  // namespace tokenbroker
