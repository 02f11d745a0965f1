// tokenbroker-monitor: polls every account's quota from Cloud Code and streams it to any number of
// brokers (WatchQuota). Reads the same account folder as the brokers and refreshes its own tokens.
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "server/runtime/command_line.h"
#include "server/runtime/flags.h"
#include "server/runtime/monitor_app.h"
#include "server/runtime/signals.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(absl::Duration, poll_interval, absl::Minutes(5),
          "Each account's quota is read this often (±10 % jitter). Keep it well below the brokers' "
          "--quota_cache_ttl (default 15m), or their data lapses to unknown before each poll.");
ABSL_FLAG(int, poll_concurrency, 4, "Quota requests in flight at most.");
ABSL_FLAG(std::string, metrics_listen, "",
          "Serve Prometheus /metrics on this host:port (port 0: any free one); empty: no metrics.");
ABSL_FLAG(std::string, metrics_port_file, "", "If set, the bound /metrics port is written to this file.");

namespace tokenbroker {
namespace {

constexpr char kProgram[] = "tokenbroker-monitor";

int Run() {
  if (absl::Status s = CheckCommonFlags(); !s.ok()) return FailStartup(kProgram, std::string(s.message()));
  if (absl::GetFlag(FLAGS_poll_interval) <= absl::ZeroDuration()) return FailStartup(kProgram, "--poll_interval must be positive");
  if (absl::GetFlag(FLAGS_poll_concurrency) < 1) return FailStartup(kProgram, "--poll_concurrency must be at least 1");
  MonitorConfig config;
  config.addresses = ServerAddressesFromFlags();
  config.accounts_dir = absl::GetFlag(FLAGS_accounts_dir);
  config.egress_file = absl::GetFlag(FLAGS_egress_file);
  config.oauth = OAuthOptionsFromFlags();
  config.tokens = TokenManagerOptionsFromFlags();
  config.cloudcode_base_urls = CloudCodeBaseUrls();
  config.poller.interval = absl::GetFlag(FLAGS_poll_interval);
  config.poller.max_in_flight = absl::GetFlag(FLAGS_poll_concurrency);
  absl::StatusOr<OnboardingOptions> onboarding = OnboardingOptionsFromFlags();
  if (!onboarding.ok()) return FailStartup(kProgram, std::string(onboarding.status().message()));
  config.poller.onboarding = *onboarding;
  config.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  config.metrics_port_file = absl::GetFlag(FLAGS_metrics_port_file);
  config.reload_interval = absl::GetFlag(FLAGS_reload_interval);
  config.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  absl::StatusOr<std::unique_ptr<MonitorApp>> app = MonitorApp::Open(std::move(config));
  if (!app.ok()) return FailStartup(kProgram, std::string(app.status().message()));

  PrepareDaemonProcess();  // before any thread starts

  if (absl::Status started = (*app)->Start(); !started.ok()) {
    (*app)->Stop();
    return FailStartup(kProgram, std::string(started.message()));
  }
  std::string signal;
  while ((signal = WaitForStopSignal((*app)->tick_interval())).empty()) (*app)->Tick();
  spdlog::info("received {}; stopping", signal);
  (*app)->Stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace tokenbroker

int main(int argc, char** argv) {
  tokenbroker::ParseFlagsOrExit(
      argc, argv,
      {.program = "tokenbroker-monitor",
       .usage = "tokenbroker-monitor: polls every account's quota and streams it to brokers (WatchQuota).\n"
                "\n"
                "Usage: tokenbroker-monitor --accounts_dir=DIR --listen=127.0.0.1:50052 [flags]\n"
                "\n"
                "Environment: TOKENBROKER_OAUTH_CLIENT_ID and TOKENBROKER_OAUTH_CLIENT_SECRET (the OAuth client the\n"
                "accounts were authorised with).\n"
                "Exit status: 0 after SIGTERM/SIGINT and a drain; 2 for a bad flag or configuration (one line on\n"
                "stderr names it)."});
  return tokenbroker::Run();
}
