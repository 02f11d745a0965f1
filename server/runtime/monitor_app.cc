#include "server/runtime/monitor_app.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "lib/common/clock.h"
#include "server/runtime/flags.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr char kServiceName[] = "tokenbroker.v1.QuotaMonitorService";

}  // namespace

MonitorApp::~MonitorApp() { Stop(); }

absl::StatusOr<std::unique_ptr<MonitorApp>> MonitorApp::Open(MonitorConfig config) {
  std::unique_ptr<MonitorApp> app(new MonitorApp(std::move(config)));
  absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(app->config_.accounts_dir);
  if (!store.ok()) return absl::Status(store.status().code(), absl::StrCat("--accounts_dir: ", store.status().message()));
  app->store_ = *std::move(store);
  absl::StatusOr<std::unique_ptr<EgressBook>> egresses = EgressBook::Open(app->config_.egress_file);
  if (!egresses.ok()) return egresses.status();
  app->egresses_ = *std::move(egresses);
  // Before anything starts or logs: a taken port is one line.
  if (absl::Status s = CheckListenFlags(app->config_.metrics_listen); !s.ok()) return s;
  return app;
}

absl::Status MonitorApp::Start() {
  const MonitorConfig& c = config_;
  pool_ = std::make_unique<AccountPool>(PoolOptions(), Clock::Real());
  loader_ = std::make_unique<AccountLoader>(*store_, *pool_, egresses_.get());
  loader_->Load();
  http_ = std::make_unique<HttpClient>();
  WarnIfNoOAuthClient(c.oauth);
  oauth_ = std::make_unique<OAuthClient>(c.oauth, *http_);
  tokens_ = std::make_unique<TokenManager>(c.tokens, *pool_, *oauth_, store_.get(), Clock::Real());
  tokens_->AttachEgresses(egresses_.get());
  LogEgresses(*egresses_);
  tokens_->Start();
  cloud_code_ = std::make_unique<CloudCodeClient>(c.cloudcode_base_urls, *http_);
  hub_ = std::make_unique<QuotaHub>();
  QuotaHub& hub = *hub_;
  QuotaPollerOptions poller_options = c.poller;
  PersistOnboardedProjects(*store_, poller_options);
  poller_ = std::make_unique<QuotaPoller>(
      poller_options, *pool_, *tokens_, *cloud_code_, [&hub](const std::vector<QuotaObservation>& o) { hub.Publish(o); },
      Clock::Real());
  poller_->Start();

  service_ = std::make_unique<MonitorService>(*hub_);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  if (!c.metrics_listen.empty()) {
    if (absl::Status free = CheckListenAddress("--metrics_listen", c.metrics_listen); !free.ok()) return free;
    absl::StatusOr<std::unique_ptr<Metrics>> started =
        Metrics::StartForMonitor(c.metrics_listen, *pool_, *tokens_, *hub_, *poller_);
    if (!started.ok()) return started.status();
    metrics_ = *std::move(started);
    interceptors = metrics_->Interceptors();
    metrics_->Announce(c.metrics_listen, c.metrics_port_file);
  }
  absl::StatusOr<Servers> servers = Servers::Start(c.addresses, {service_.get()}, std::move(interceptors));
  if (!servers.ok()) return servers.status();
  servers_ = std::make_unique<Servers>(*std::move(servers));
  UpdateHealth();
  spdlog::info("monitor serving on {}; polling {} accounts every {} with at most {} requests in flight",
               BoundAddress(c.addresses.listen, servers_->port()), pool_->size(),
               absl::FormatDuration(c.poller.interval), c.poller.max_in_flight);
  if (!c.addresses.health_listen.empty()) {
    spdlog::info("health (grpc.health.v1 only, plaintext) on {}",
                 BoundAddress(c.addresses.health_listen, servers_->health_port()));
  }
  WritePortFile(servers_->port());
  return absl::OkStatus();
}

void MonitorApp::Tick() {
  if (ReloadEgresses(*egresses_)) {
    loader_->Load();  // every account's egress is checked again
  } else {
    loader_->ReloadIfChanged();
  }
  UpdateHealth();
}

void MonitorApp::UpdateHealth() { servers_->SetServing(kServiceName, pool_->UsableCount() > 0); }

void MonitorApp::Stop() {
  if (stopped_) return;
  stopped_ = true;
  // Streams never end by themselves: they are ended (brokers reconnect and keep their cache) so
  // the drain does not wait its whole timeout on them.
  if (servers_) servers_->Drain(config_.drain_timeout, [this] { service_->CloseStreams(); });
  if (poller_) poller_->Stop();
  if (tokens_) tokens_->Stop();
}

}  // namespace tokenbroker
