#include "server/runtime/flags.h"

#include <cstdlib>
#include <iostream>

#include <algorithm>

#include "absl/flags/flag.h"
#include "absl/strings/str_split.h"
#include "server/runtime/logging.h"
#include "server/runtime/servers.h"
#include "spdlog/spdlog.h"

// The flags both binaries take. (The broker's own are in broker_config.cc, the monitor's in
// monitor_main.cc.)
ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Where to serve gRPC: host:port (port 0 picks a free one) or unix:/path/to.sock.");
ABSL_FLAG(std::string, health_listen, "",
          "Also serve only grpc.health.v1 on this plaintext host:port, for kubelet gRPC probes (empty: off).");
ABSL_FLAG(std::string, port_file, "", "If set, the bound TCP port is written to this file once serving.");
ABSL_FLAG(std::string, accounts_dir, "",
          "Folder of account files <id>.json in Antigravity-Manager's format, e.g. "
          "~/.antigravity_tools/accounts. Required.");
ABSL_FLAG(std::string, oauth_token_url, "https://oauth2.googleapis.com/token", "Google's OAuth token endpoint.");
ABSL_FLAG(std::string, oauth_client_id, "",
          "OAuth client id used to refresh tokens; default: $TOKENBROKER_OAUTH_CLIENT_ID.");
ABSL_FLAG(std::string, oauth_client_secret, "",
          "OAuth client secret; default: $TOKENBROKER_OAUTH_CLIENT_SECRET (prefer the environment: "
          "flags show in the process list).");
ABSL_FLAG(std::string, cloudcode_base_url, "https://cloudcode-pa.googleapis.com",
          "Base URL(s) of the Cloud Code API, comma-separated, tried in order (quota polling).");
ABSL_FLAG(std::string, egress_file, "",
          "File of egresses, one a line: '<egress id> <proxy url>' (http, https, socks5 or socks5h; credentials "
          "may be in the URL, which is never logged). An account file's \"egress\": \"<id>\" sends that "
          "account's OAuth refresh and quota calls through it; re-read when it changes. Empty: none.");
ABSL_FLAG(absl::Duration, min_token_ttl, absl::Minutes(5), "A token handed out stays valid at least this long.");
ABSL_FLAG(absl::Duration, refresh_ahead, absl::Minutes(15),
          "Tokens expiring within this window are renewed in the background.");
ABSL_FLAG(absl::Duration, refresh_scan_interval, absl::Seconds(15),
          "How often the background refresher looks for expiring tokens.");
ABSL_FLAG(int, refresh_workers, 4, "Token refreshes running at once.");
ABSL_FLAG(absl::Duration, reload_interval, absl::Seconds(5),
          "How often the accounts folder is checked for added, removed or changed files.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(10),
          "On SIGTERM, how long in-flight RPCs may take before they are cancelled.");
ABSL_FLAG(absl::Duration, onboard_timeout, absl::Minutes(2),
          "Quota polling: how long onboarding an account without a Cloud Code project (onboardUser and "
          "polls of its operation) may take before it counts as failed.");
ABSL_FLAG(absl::Duration, onboard_retry, absl::Minutes(10),
          "Quota polling: after a failed onboarding, the account's next attempt waits this long, doubling "
          "per failure in a row up to 6h.");
ABSL_FLAG(std::string, log_format, "text", "Log format: text or json (one object per line).");
ABSL_FLAG(std::string, log_level, "info", "Log level: trace, debug, info, warn, error, off.");

namespace tokenbroker {
namespace {

std::string FlagOrEnv(const std::string& flag_value, const char* env) {
  if (!flag_value.empty()) return flag_value;
  const char* v = std::getenv(env);
  return v == nullptr ? "" : v;
}

}  // namespace

absl::StatusOr<OnboardingOptions> OnboardingOptionsFromFlags() {
  OnboardingOptions o;
  o.timeout = absl::GetFlag(FLAGS_onboard_timeout);
  o.retry = absl::GetFlag(FLAGS_onboard_retry);
  o.max_check = std::min(o.max_check, o.timeout);
  o.first_check = std::min(o.first_check, o.max_check);
  if (absl::Status s = ValidateOnboardingOptions(o); !s.ok()) return s;
  return o;
}

void PersistOnboardedProjects(const AccountStore& store, QuotaPollerOptions& poller) {
  poller.on_onboarded = [&store](const std::string& account_id, const std::string& project_id) {
    AccountUpdate update;
    update.project_id = project_id;
    if (absl::Status s = store.Update(account_id, update); !s.ok()) {
      // A read-only folder (a mounted Secret): the project lives in memory (and in the stream).
      spdlog::warn("account {}: its new project could not be written to its file: {}", account_id,
                   std::string(s.message()));
    }
  };
}

int FailStartup(const std::string& program, const std::string& message) {
  std::cerr << program << ": " << message << "\n";
  return 2;
}

absl::Status CheckCommonFlags() {
  if (absl::Status s = SetUpLogging(absl::GetFlag(FLAGS_log_format), absl::GetFlag(FLAGS_log_level)); !s.ok()) {
    return s;
  }
  if (absl::GetFlag(FLAGS_accounts_dir).empty()) {
    return absl::InvalidArgumentError("--accounts_dir is required (a folder of <id>.json account files)");
  }
  if (absl::GetFlag(FLAGS_refresh_workers) < 1) return absl::InvalidArgumentError("--refresh_workers must be at least 1");
  if (absl::GetFlag(FLAGS_reload_interval) <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--reload_interval must be positive");
  }
  if (absl::GetFlag(FLAGS_refresh_scan_interval) <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--refresh_scan_interval must be positive");
  }
  return absl::OkStatus();
}

absl::Status CheckListenFlags(const std::string& metrics_listen) {
  for (const auto& [flag, listen] : {std::pair{"--listen", absl::GetFlag(FLAGS_listen)},
                                     std::pair{"--health_listen", absl::GetFlag(FLAGS_health_listen)},
                                     std::pair{"--metrics_listen", metrics_listen}}) {
    if (listen.empty()) continue;
    if (absl::Status s = CheckListenAddress(flag, listen); !s.ok()) return s;
  }
  return absl::OkStatus();
}

OAuthOptions OAuthOptionsFromFlags() {
  OAuthOptions o;
  o.token_url = absl::GetFlag(FLAGS_oauth_token_url);
  o.client_id = FlagOrEnv(absl::GetFlag(FLAGS_oauth_client_id), "TOKENBROKER_OAUTH_CLIENT_ID");
  o.client_secret = FlagOrEnv(absl::GetFlag(FLAGS_oauth_client_secret), "TOKENBROKER_OAUTH_CLIENT_SECRET");
  return o;
}

void WarnIfNoOAuthClient(const OAuthOptions& options) {
  if (options.client_id.empty()) {
    spdlog::warn("no OAuth client id (--oauth_client_id or $TOKENBROKER_OAUTH_CLIENT_ID): Google will reject "
                 "token refreshes");
  }
}

TokenManagerOptions TokenManagerOptionsFromFlags() {
  TokenManagerOptions o;
  o.min_token_ttl = absl::GetFlag(FLAGS_min_token_ttl);
  o.refresh_ahead = absl::GetFlag(FLAGS_refresh_ahead);
  o.scan_interval = absl::GetFlag(FLAGS_refresh_scan_interval);
  o.workers = absl::GetFlag(FLAGS_refresh_workers);
  return o;
}

std::vector<std::string> CloudCodeBaseUrls() {
  std::vector<std::string> out;
  for (absl::string_view url : absl::StrSplit(absl::GetFlag(FLAGS_cloudcode_base_url), ',', absl::SkipEmpty())) {
    std::string u(url);
    while (!u.empty() && u.back() == '/') u.pop_back();
    out.push_back(u);
  }
  return out;
}

ServerAddresses ServerAddressesFromFlags() {
  return ServerAddresses{absl::GetFlag(FLAGS_listen), absl::GetFlag(FLAGS_health_listen)};
}

void WritePortFile(int port) {
  if (std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) WritePort(pf, port);
}

}  // namespace tokenbroker
