#include "server/runtime/broker_app.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "lib/broker/fleet_caller_ledger.h"
#include "lib/common/clock.h"
#include "server/runtime/flags.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr char kServiceName[] = "tokenbroker.v1.TokenBrokerService";
// Health detail: SERVING while the Redis state backend is connected and in sync.
constexpr char kStateServiceName[] = "tokenbroker.v1.StateBackend";
// Health detail: NOT_SERVING while no account holds a valid token and token refreshes keep failing
// (a wrong OAuth client, the token endpoint unreachable); the overall health follows it.
constexpr char kTokenRefreshServiceName[] = "tokenbroker.v1.TokenRefresh";

// The accounts caller policies' shares resolve against: every loaded account, by tier.
PoolShape ShapeOf(const AccountPool& pool) {
  PoolShape shape;
  for (const AccountView& a : pool.List()) {
    ++shape.accounts;
    ++shape.by_tier[a.tier];
  }
  return shape;
}

}  // namespace

// Whether tokens can be had: an account holds a valid access token, or token refreshes are not
// all failing (no failure since the last success). Not thread-safe (the main loop's).
class BrokerApp::RefreshHealth {
 public:
  RefreshHealth(const AccountPool& pool, const TokenManager& tokens) : pool_(pool), tokens_(tokens) {}
  bool Update() {
    std::map<std::string, int64_t> counts = tokens_.RefreshCounts();
    const int64_t ok = counts["ok"];
    const int64_t failed = counts["error"];
    if (ok != last_ok_) failed_at_last_ok_ = failed;
    last_ok_ = ok;
    if (failed == failed_at_last_ok_) return true;
    const absl::Time now = Clock::Real().Now();
    for (const AccountView& a : pool_.List()) {
      if (!a.disabled && !a.proxy_disabled && a.token_expiry && *a.token_expiry > now) return true;
    }
    return false;
  }

 private:
  const AccountPool& pool_;
  const TokenManager& tokens_;
  int64_t last_ok_ = 0;
  int64_t failed_at_last_ok_ = 0;
};

BrokerApp::BrokerApp(BrokerConfig config) : config_(std::move(config)) {}

BrokerApp::~BrokerApp() { Stop(); }

absl::StatusOr<std::unique_ptr<BrokerApp>> BrokerApp::Open(BrokerConfig config) {
  std::unique_ptr<BrokerApp> app(new BrokerApp(std::move(config)));
  const BrokerConfig& c = app->config_;
  absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::Open(c.caller_tokens_file, c.admin_token_file);
  if (!auth.ok()) return auth.status();
  app->auth_ = *std::move(auth);
  if (!c.caller_policy_file.empty()) {
    app->caller_admission_ = std::make_unique<CallerAdmission>(Clock::Real(), c.pool.lease_timeout);
    if (c.families) app->caller_admission_->SetFamilies(c.families);
    absl::StatusOr<std::unique_ptr<CallerPolicyFile>> policies =
        CallerPolicyFile::Open(c.caller_policy_file, *app->caller_admission_);
    if (!policies.ok()) return policies.status();
    app->caller_policies_ = *std::move(policies);
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      ApiCredentials(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file);
  if (!credentials.ok()) return credentials.status();
  app->credentials_ = *std::move(credentials);
  if (!c.audit_log.empty()) {
    absl::StatusOr<std::unique_ptr<AuditLog>> opened = AuditLog::Open(c.audit_log);
    if (!opened.ok()) return opened.status();
    app->audit_ = *std::move(opened);
  }
  absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(c.accounts_dir);
  if (!store.ok()) return absl::Status(store.status().code(), absl::StrCat("--accounts_dir: ", store.status().message()));
  app->store_ = *std::move(store);
  absl::StatusOr<std::unique_ptr<EgressBook>> egresses = EgressBook::Open(c.egress_file);
  if (!egresses.ok()) return egresses.status();
  app->egresses_ = *std::move(egresses);
  // Before anything starts or logs: a taken port is one line.
  if (absl::Status s = CheckListenFlags(c.metrics_listen); !s.ok()) return s;
  return app;
}

absl::Status BrokerApp::Start() {
  const BrokerConfig& c = config_;
  pool_ = std::make_unique<AccountPool>(c.pool, Clock::Real());
  pool_->SetQuotaSettings(c.quota);
  if (c.families) pool_->SetFamilies(c.families);
  loader_ = std::make_unique<AccountLoader>(*store_, *pool_, egresses_.get());
  loader_->Load();
  if (caller_admission_) caller_admission_->SetPoolShape(ShapeOf(*pool_));

  http_ = std::make_unique<HttpClient>();
  WarnIfNoOAuthClient(c.oauth);
  oauth_ = std::make_unique<OAuthClient>(c.oauth, *http_);
  tokens_ = std::make_unique<TokenManager>(c.tokens, *pool_, *oauth_, store_.get(), Clock::Real());
  tokens_->AttachEgresses(egresses_.get());
  LogEgresses(*egresses_);
  if (c.redis) {
    redis_ = std::make_unique<RedisState>(*c.redis);
    pool_->AttachSharedState(redis_.get());
    tokens_->AttachSharedState(redis_.get());
    redis_->Start(pool_.get());
    // Caller budgets count across the fleet (before the service takes its first call).
    if (caller_admission_) {
      caller_admission_->SetLedger(std::make_unique<FleetCallerLedger>(*redis_, c.pool.lease_timeout));
    }
    // A first sync before the first token refresh saves refreshing what other replicas hold;
    // an unreachable Redis does not keep the broker from starting.
    const bool up = redis_->WaitUntilUp(absl::Seconds(2));
    spdlog::info("state backend redis://{}:{}/{} prefix {}: {}", c.redis->address.host, c.redis->address.port,
                 c.redis->address.db, c.redis->prefix,
                 up ? "connected" : "not reachable yet; serving from this replica's view and retrying");
  }
  tokens_->Start();

  cloud_code_ = std::make_unique<CloudCodeClient>(c.cloudcode_base_urls, *http_);
  if (c.embedded_monitor) {
    AccountPool& pool = *pool_;
    TokenManager& tokens = *tokens_;
    QuotaPollerOptions poller_options = c.poller;
    PersistOnboardedProjects(*store_, poller_options);
    poller_ = std::make_unique<QuotaPoller>(
        poller_options, pool, *tokens_, *cloud_code_,
        [&pool, &tokens](const std::vector<QuotaObservation>& o) {
          pool.UpdateQuota(o);
          tokens.ApplyObservations(o);
        },
        Clock::Real());
    poller_->Start();
    spdlog::info("quota validation on, polling in this process every {}", absl::FormatDuration(c.poller.interval));
  }
  subscriber_ = std::make_unique<QuotaSubscriber>(
      *pool_, [&tokens = *tokens_](const std::vector<QuotaObservation>& o) { tokens.ApplyObservations(o); });
  if (!c.quota_monitor.empty()) {
    subscriber_->Connect(c.quota_monitor);
    spdlog::info("quota validation on, streaming from the monitor at {}", c.quota_monitor);
  }

  service_ = std::make_unique<BrokerService>(*pool_, *tokens_, subscriber_.get(), Clock::Real(), c.issuer);
  service_->SetSecurity(auth_->enabled() ? auth_.get() : nullptr, audit_.get());
  service_->SetCallerAdmission(caller_admission_.get());
  service_->SetCallersFromCertificates(!auth_->enabled() && !c.tls_client_ca_file.empty());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  if (!c.metrics_listen.empty()) {
    if (absl::Status free = CheckListenAddress("--metrics_listen", c.metrics_listen); !free.ok()) return free;
    absl::StatusOr<std::unique_ptr<Metrics>> started =
        Metrics::Start(c.metrics_listen, *pool_, *tokens_, *subscriber_, *service_, redis_.get());
    if (!started.ok()) return started.status();
    metrics_ = *std::move(started);
    interceptors = metrics_->Interceptors();
    metrics_->Announce(c.metrics_listen, c.metrics_port_file);
    status_page_ = std::make_unique<StatusPage>(
        StatusSources{pool_.get(), tokens_.get(), subscriber_.get(), service_.get(), redis_.get(), auth_.get()},
        StatusPageOptions{.show_emails = c.status_show_emails, .embedded_monitor = c.embedded_monitor});
    status_page_->ServeOn(metrics_->port());
    spdlog::info("status page on http://{}/status", BoundAddress(c.metrics_listen, metrics_->port()));
  }
  absl::StatusOr<Servers> servers = Servers::Start(c.addresses, {service_.get()}, std::move(interceptors), credentials_);
  if (!servers.ok()) return servers.status();
  servers_ = std::make_unique<Servers>(*std::move(servers));
  refresh_health_ = std::make_unique<RefreshHealth>(*pool_, *tokens_);

  serving_ = UpdateHealth();
  spdlog::info("serving on {}{} with policy {}; {}", BoundAddress(c.addresses.listen, servers_->port()),
               c.tls_cert_file.empty()         ? ""
               : c.tls_client_ca_file.empty() ? " over TLS"
                                               : " over mutual TLS",
               std::string(PolicyName(c.pool.policy)),
               serving_ ? "health SERVING" : absl::StrCat("health NOT_SERVING: ", NotServingReason()));
  if (!c.addresses.health_listen.empty()) {
    spdlog::info("health (grpc.health.v1 only, plaintext) on {}",
                 BoundAddress(c.addresses.health_listen, servers_->health_port()));
  }
  WritePortFile(servers_->port());
  next_reload_ = Clock::Real().Now() + c.reload_interval;
  return absl::OkStatus();
}

absl::Duration BrokerApp::tick_interval() const {
  // Health follows the state backend within half a second; the folder is checked every --reload_interval.
  return redis_ ? std::min(config_.reload_interval, absl::Milliseconds(500)) : config_.reload_interval;
}

void BrokerApp::Tick() {
  if (Clock::Real().Now() >= next_reload_) {
    bool reloaded = false;
    if (ReloadEgresses(*egresses_)) {
      loader_->Load();  // every account's egress is checked again
      reloaded = true;
    } else {
      reloaded = loader_->ReloadIfChanged();
    }
    if (reloaded && caller_admission_) caller_admission_->SetPoolShape(ShapeOf(*pool_));
    auth_->ReloadIfChanged();
    if (caller_policies_) caller_policies_->ReloadIfChanged();
    next_reload_ = Clock::Real().Now() + config_.reload_interval;
  }
  if (bool now_serving = UpdateHealth(); now_serving != serving_) {
    spdlog::info("health is now {}", now_serving ? "SERVING" : absl::StrCat("NOT_SERVING: ", NotServingReason()));
    serving_ = now_serving;
  }
}

bool BrokerApp::UpdateHealth() {
  const bool tokens_obtainable = refresh_health_->Update();
  const bool serving = pool_->UsableCount() > 0 && tokens_obtainable;
  servers_->SetServing(kServiceName, serving);
  servers_->SetDetail(kTokenRefreshServiceName, tokens_obtainable);
  if (redis_) servers_->SetDetail(kStateServiceName, redis_->Up());
  return serving;
}

std::string BrokerApp::NotServingReason() const {
  if (pool_->UsableCount() == 0) return "no usable account is loaded (SERVING once one is)";
  return "no account holds a valid access token and every token refresh since the last success failed (see the "
         "'token refresh ... failed' lines; invalid_client means the OAuth client id/secret are not the ones "
         "the accounts were authorised with)";
}

void BrokerApp::Stop() {
  if (stopped_) return;
  stopped_ = true;
  // Drain: probes see NOT_SERVING at once; calls waiting for an account get their answer now;
  // running RPCs get until the deadline.
  if (servers_) {
    servers_->Drain(config_.drain_timeout, [this] { service_->Shutdown(); });
  } else if (service_) {
    service_->Shutdown();
  }
  if (subscriber_) subscriber_->Stop();
  if (poller_) poller_->Stop();
  if (tokens_) tokens_->Stop();
  if (redis_) {
    pool_->AttachSharedState(nullptr);
    redis_->Stop();
  }
}

}  // namespace tokenbroker
