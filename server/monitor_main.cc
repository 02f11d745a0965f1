// tokenbroker-monitor: polls every account's quota from Cloud Code and streams it to any number of
// brokers (WatchQuota). Reads the same account folder as the brokers and refreshes its own tokens.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "lib/account_pool.h"
#include "lib/account_store.h"
#include "lib/cloud_code_client.h"
#include "lib/http_client.h"
#include "lib/oauth_client.h"
#include "lib/quota_hub.h"
#include "lib/quota_poller.h"
#include "lib/token_manager.h"
#include "server/command_line.h"
#include "server/daemon.h"
#include "server/metrics.h"
#include "server/monitor_service.h"
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
constexpr char kServiceName[] = "tokenbroker.v1.QuotaMonitorService";

int Run() {
  if (absl::Status s = CheckCommonFlags(); !s.ok()) return FailStartup(kProgram, std::string(s.message()));
  if (absl::GetFlag(FLAGS_poll_interval) <= absl::ZeroDuration()) return FailStartup(kProgram, "--poll_interval must be positive");
  if (absl::GetFlag(FLAGS_poll_concurrency) < 1) return FailStartup(kProgram, "--poll_concurrency must be at least 1");
  absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(absl::GetFlag(FLAGS_accounts_dir));
  if (!store.ok()) return FailStartup(kProgram, absl::StrCat("--accounts_dir: ", store.status().message()));
  // Before anything starts or logs: a taken port is one line.
  if (absl::Status s = CheckListenFlags(absl::GetFlag(FLAGS_metrics_listen)); !s.ok()) {
    return FailStartup(kProgram, std::string(s.message()));
  }

  BlockStopSignals();  // before any thread starts
  // Abseil's lock-order cycle detection (a graph lookup per lock): on in debug builds (the
  // ASan + UBSan tree the end-to-end tests run in `make test`), where a cycle aborts; off in release.
#ifdef NDEBUG
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#else
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kAbort);
#endif

  AccountPool pool(PoolOptions(), Clock::Real());
  AccountLoader loader(**store, pool);
  loader.Load();
  HttpClient http;
  OAuthClient oauth(OAuthOptionsFromFlags(), http);
  TokenManager tokens(TokenManagerOptionsFromFlags(), pool, oauth, store->get(), Clock::Real());
  tokens.Start();
  CloudCodeClient cloud_code(CloudCodeBaseUrls(), http);
  QuotaHub hub;
  QuotaPollerOptions po;
  po.interval = absl::GetFlag(FLAGS_poll_interval);
  po.max_in_flight = absl::GetFlag(FLAGS_poll_concurrency);
  QuotaPoller poller(po, pool, tokens, cloud_code, [&hub](const std::vector<QuotaObservation>& o) { hub.Publish(o); },
                     Clock::Real());
  poller.Start();

  MonitorService service(hub);
  std::unique_ptr<Metrics> metrics;
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  if (std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen); !metrics_listen.empty()) {
    const absl::Status free = CheckListenAddress("--metrics_listen", metrics_listen);
    absl::StatusOr<std::unique_ptr<Metrics>> started =
        free.ok() ? Metrics::StartForMonitor(metrics_listen, pool, tokens, hub, poller) : absl::StatusOr<std::unique_ptr<Metrics>>(free);
    if (!started.ok()) {
      poller.Stop();
      tokens.Stop();
      return FailStartup(kProgram, std::string(started.status().message()));
    }
    metrics = *std::move(started);
    interceptors = metrics->Interceptors();
    metrics->Announce(metrics_listen, absl::GetFlag(FLAGS_metrics_port_file));
  }
  absl::StatusOr<Servers> servers = Servers::Start({&service}, std::move(interceptors));
  if (!servers.ok()) {
    poller.Stop();
    tokens.Stop();
    return FailStartup(kProgram, std::string(servers.status().message()));
  }
  const int port = servers->port();
  auto update_health = [&] { servers->SetServing(kServiceName, pool.UsableCount() > 0); };
  update_health();
  const std::string listen = absl::GetFlag(FLAGS_listen);
  spdlog::info("monitor serving on {}; polling {} accounts every {} with at most {} requests in flight",
               BoundAddress(listen, port), pool.size(),
               absl::FormatDuration(po.interval), po.max_in_flight);
  if (const std::string health_listen = absl::GetFlag(FLAGS_health_listen); !health_listen.empty()) {
    spdlog::info("health (grpc.health.v1 only, plaintext) on {}", BoundAddress(health_listen, servers->health_port()));
  }
  WritePortFile(port);

  std::string signal;
  while ((signal = WaitForStopSignal(absl::GetFlag(FLAGS_reload_interval))).empty()) {
    loader.ReloadIfChanged();
    update_health();
  }
  spdlog::info("received {}; stopping", signal);
  // Streams never end by themselves: they are ended (brokers reconnect and keep their cache) so
  // the drain does not wait its whole timeout on them.
  servers->Drain(absl::GetFlag(FLAGS_drain_timeout), [&service] { service.CloseStreams(); });
  poller.Stop();
  tokens.Stop();
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
