// tokenbroker: the broker binary. Wires the account store, the pool, the token manager, quota
// validation and the gRPC server together, then waits for SIGTERM/SIGINT to drain.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <cstdlib>
#include <map>
#include <memory>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "lib/account_pool.h"
#include "lib/account_store.h"
#include "lib/cloud_code_client.h"
#include "lib/http_client.h"
#include "lib/oauth_client.h"
#include "lib/quota_poller.h"
#include "lib/redis_state.h"
#include "lib/token_manager.h"
#include "server/audit_log.h"
#include "server/auth.h"
#include "server/broker_service.h"
#include "server/command_line.h"
#include "server/daemon.h"
#include "server/metrics.h"
#include "server/quota_subscriber.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, policy, "balance", "Selection policy: balance, fill_first, reset_soonest, round_robin.");
ABSL_FLAG(absl::Duration, session_ttl, absl::Hours(1), "A session binding expires after this long unused.");
ABSL_FLAG(int, max_sessions, 100000, "Most session bindings kept; the least recently used go first.");
ABSL_FLAG(int, max_inflight_per_account, 0,
          "Leases in flight per account beyond which it is skipped (0: no cap).");
ABSL_FLAG(absl::Duration, lease_timeout, absl::Minutes(10),
          "A lease not reported with ReportOutcome within this long ends by itself.");
ABSL_FLAG(absl::Duration, probe_timeout, absl::Seconds(60),
          "After a cooldown ends, how long the single probe request may take to report before another is allowed.");
ABSL_FLAG(absl::Duration, validation_block, absl::Hours(1),
          "How long a 403 VALIDATION_REQUIRED blocks an account when the upstream names no delay.");
ABSL_FLAG(std::string, quota_monitor, "",
          "gRPC target of a tokenbroker-monitor (host:port or unix:path): turns quota validation on at start.");
ABSL_FLAG(bool, embedded_monitor, false,
          "Poll quota in this process (one-machine use) and turn quota validation on.");
ABSL_FLAG(absl::Duration, quota_cache_ttl, absl::Minutes(15),
          "Quota data older than this reads as unknown. Keep it well above the monitor's --poll_interval "
          "(default 5m, +10 % jitter) so data never lapses between polls; with --embedded_monitor a "
          "--poll_interval that could reach it is refused.");
ABSL_FLAG(double, quota_call_cost_prior, 0.05,
          "Predictive admission: fraction of a quota bucket one call is taken to cost until an account (or "
          "another of its tier) has learned its own from successive observations. Cautious: high rather than low.");
ABSL_FLAG(absl::Duration, quota_max_lag, absl::Seconds(60),
          "Longest the quota API is believed to lag behind; the lag learned from its answers never exceeds it.");
ABSL_FLAG(double, quota_low_threshold, 0.10, "Remaining fraction below which an account is LOW for a model.");
ABSL_FLAG(double, quota_exhausted_threshold, 0.05,
          "Remaining fraction below which an account is EXHAUSTED for a model and skipped.");
ABSL_FLAG(absl::Duration, poll_interval, absl::Minutes(5), "With --embedded_monitor: each account's quota is read this often.");
ABSL_FLAG(int, poll_concurrency, 4, "With --embedded_monitor: quota requests in flight at most.");
ABSL_FLAG(std::string, metrics_listen, "",
          "Serve Prometheus /metrics on this host:port (port 0: any free one); empty: no metrics.");
ABSL_FLAG(std::string, metrics_port_file, "", "If set, the bound /metrics port is written to this file.");
ABSL_FLAG(std::string, caller_tokens_file, "",
          "Callers and their bearer tokens, one \"<name> <token>\" a line: GetToken and ReportOutcome then need "
          "\"authorization: Bearer <token>\" (empty: open to whoever reaches the socket).");
ABSL_FLAG(std::string, admin_token_file, "",
          "A file holding the admin token: SetQuotaManager, ListAccounts and ExplainSelection then need it.");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM certificate (chain) of the API port: serve TLS (with --tls_key_file).");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA certificates: the API port then requires client certificates they sign (mutual TLS).");
ABSL_FLAG(std::string, audit_log, "",
          "Append one JSON line per issued token (time, caller, account, model, hashed session, lease) to this file.");
ABSL_FLAG(std::string, state_backend, "memory",
          "Where session bindings, cooldowns, leases, runtime disables and tokens are shared: memory (this "
          "process only) or redis://host:port[/db] (every replica using the same Redis and --state_prefix).");
ABSL_FLAG(std::string, state_prefix, "tokenbroker:",
          "With a Redis backend: the prefix of every key and of the event channel (one per account pool).");
ABSL_FLAG(absl::Duration, state_timeout, absl::Milliseconds(50),
          "With a Redis backend: the longest a request waits on one Redis round trip before the backend counts "
          "as down (then requests go on with this replica's view, without waiting).");

namespace tokenbroker {
namespace {

constexpr char kProgram[] = "tokenbroker";
constexpr char kServiceName[] = "tokenbroker.v1.TokenBrokerService";
// Health detail: SERVING while the Redis state backend is connected and in sync.
constexpr char kStateServiceName[] = "tokenbroker.v1.StateBackend";
// Health detail: NOT_SERVING while no account holds a valid token and token refreshes keep failing
// (a wrong OAuth client, the token endpoint unreachable); the overall health follows it.
constexpr char kTokenRefreshServiceName[] = "tokenbroker.v1.TokenRefresh";

// Whether tokens can be had: an account holds a valid access token, or token refreshes are not
// all failing (no failure since the last success). Not thread-safe (the main loop's).
class RefreshHealth {
 public:
  RefreshHealth(const AccountPool& pool, const TokenManager& tokens) : pool_(pool), tokens_(tokens) {}
  bool Update() {
    std::map<std::string, int64_t> counts = tokens_.RefreshCounts();
    const int64_t ok = counts["ok"];
    const int64_t failed = counts["error"];
    if (ok != last_ok_) failed_at_last_ok_ = failed;
    last_ok_ = ok;
    if (failed == failed_at_last_ok_) return true;
    const absl::Time now = absl::Now();
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

int Run() {
  if (absl::Status s = CheckCommonFlags(); !s.ok()) return FailStartup(kProgram, std::string(s.message()));
  absl::StatusOr<Policy> policy = ParsePolicy(absl::GetFlag(FLAGS_policy));
  if (!policy.ok()) return FailStartup(kProgram, absl::StrCat("--policy: ", policy.status().message()));
  if (absl::GetFlag(FLAGS_max_sessions) < 1) return FailStartup(kProgram, "--max_sessions must be at least 1");
  if (absl::GetFlag(FLAGS_session_ttl) <= absl::ZeroDuration()) return FailStartup(kProgram, "--session_ttl must be positive");
  if (absl::GetFlag(FLAGS_max_inflight_per_account) < 0) {
    return FailStartup(kProgram, "--max_inflight_per_account must be 0 or more");
  }
  for (const auto& [name, value] : {std::pair{"--lease_timeout", absl::GetFlag(FLAGS_lease_timeout)},
                                    std::pair{"--probe_timeout", absl::GetFlag(FLAGS_probe_timeout)},
                                    std::pair{"--validation_block", absl::GetFlag(FLAGS_validation_block)},
                                    std::pair{"--poll_interval", absl::GetFlag(FLAGS_poll_interval)}}) {
    if (value <= absl::ZeroDuration()) return FailStartup(kProgram, absl::StrCat(name, " must be positive"));
  }
  if (absl::GetFlag(FLAGS_poll_concurrency) < 1) return FailStartup(kProgram, "--poll_concurrency must be at least 1");
  const bool embedded = absl::GetFlag(FLAGS_embedded_monitor);
  const std::string monitor = absl::GetFlag(FLAGS_quota_monitor);
  if (embedded && !monitor.empty()) {
    return FailStartup(kProgram, "--quota_monitor and --embedded_monitor exclude each other; choose one");
  }
  QuotaSettings quota;
  quota.enabled = embedded || !monitor.empty();
  quota.cache_ttl = absl::GetFlag(FLAGS_quota_cache_ttl);
  quota.low_threshold = absl::GetFlag(FLAGS_quota_low_threshold);
  quota.exhausted_threshold = absl::GetFlag(FLAGS_quota_exhausted_threshold);
  quota.call_cost_prior = absl::GetFlag(FLAGS_quota_call_cost_prior);
  quota.max_lag = absl::GetFlag(FLAGS_quota_max_lag);
  if (absl::Status s = ValidateQuotaSettings(quota); !s.ok()) {
    return FailStartup(kProgram, absl::StrCat("--quota_", s.message()));
  }
  // Data must outlive the wait for the next poll (jitter included), or exhausted accounts read
  // as unknown, and are handed out, just before each poll.
  if (embedded && absl::GetFlag(FLAGS_poll_interval) * 1.1 + absl::Seconds(5) > quota.cache_ttl) {
    return FailStartup(kProgram, absl::StrCat("--poll_interval (", absl::FormatDuration(absl::GetFlag(FLAGS_poll_interval)),
                                              ") plus 10 % jitter and 5s must stay below --quota_cache_ttl (",
                                              absl::FormatDuration(quota.cache_ttl), ")"));
  }
  std::optional<RedisStateOptions> redis_options;
  if (const std::string backend = absl::GetFlag(FLAGS_state_backend); backend != "memory") {
    absl::StatusOr<RedisAddress> address = ParseRedisUrl(backend, "--state_backend");
    if (!address.ok()) return FailStartup(kProgram, std::string(address.status().message()));
    const std::string prefix = absl::GetFlag(FLAGS_state_prefix);
    if (prefix.empty() || prefix.size() > 64 || prefix.find_first_of(" \t\n*?[]") != std::string::npos) {
      return FailStartup(kProgram, "--state_prefix must be 1 to 64 characters without spaces or * ? [ ]");
    }
    const absl::Duration timeout = absl::GetFlag(FLAGS_state_timeout);
    if (timeout < absl::Milliseconds(1) || timeout > absl::Seconds(10)) {
      return FailStartup(kProgram, "--state_timeout must be between 1ms and 10s");
    }
    redis_options = RedisStateOptions{};
    redis_options->address = *address;
    // A password comes from the environment (a Secret), never from the command line.
    if (const char* password = std::getenv("TOKENBROKER_REDIS_PASSWORD"); password != nullptr) {
      redis_options->address.password = password;
    }
    redis_options->prefix = prefix;
    redis_options->command_timeout = timeout;
    redis_options->session_ttl = absl::GetFlag(FLAGS_session_ttl);
    redis_options->lease_ttl = absl::GetFlag(FLAGS_lease_timeout);
  }
  absl::StatusOr<std::unique_ptr<Authenticator>> auth =
      Authenticator::Open(absl::GetFlag(FLAGS_caller_tokens_file), absl::GetFlag(FLAGS_admin_token_file));
  if (!auth.ok()) return FailStartup(kProgram, std::string(auth.status().message()));
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = ApiCredentials(
      absl::GetFlag(FLAGS_tls_cert_file), absl::GetFlag(FLAGS_tls_key_file), absl::GetFlag(FLAGS_tls_client_ca_file));
  if (!credentials.ok()) return FailStartup(kProgram, std::string(credentials.status().message()));
  std::unique_ptr<AuditLog> audit;
  if (const std::string path = absl::GetFlag(FLAGS_audit_log); !path.empty()) {
    absl::StatusOr<std::unique_ptr<AuditLog>> opened = AuditLog::Open(path);
    if (!opened.ok()) return FailStartup(kProgram, std::string(opened.status().message()));
    audit = *std::move(opened);
  }
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

  PoolOptions pool_options;
  pool_options.policy = *policy;
  pool_options.session_idle_ttl = absl::GetFlag(FLAGS_session_ttl);
  pool_options.max_sessions = static_cast<size_t>(absl::GetFlag(FLAGS_max_sessions));
  pool_options.max_inflight_per_account = absl::GetFlag(FLAGS_max_inflight_per_account);
  pool_options.lease_timeout = absl::GetFlag(FLAGS_lease_timeout);
  pool_options.cooldowns.probe_timeout = absl::GetFlag(FLAGS_probe_timeout);
  pool_options.cooldowns.validation_block = absl::GetFlag(FLAGS_validation_block);
  AccountPool pool(pool_options, Clock::Real());
  pool.SetQuotaSettings(quota);
  AccountLoader loader(**store, pool);
  loader.Load();

  HttpClient http;
  OAuthClient oauth(OAuthOptionsFromFlags(), http);
  TokenManager tokens(TokenManagerOptionsFromFlags(), pool, oauth, store->get(), Clock::Real());
  std::unique_ptr<RedisState> redis;
  if (redis_options) {
    redis = std::make_unique<RedisState>(*redis_options);
    pool.AttachSharedState(redis.get());
    tokens.AttachSharedState(redis.get());
    redis->Start(&pool);
    // A first sync before the first token refresh saves refreshing what other replicas hold;
    // an unreachable Redis does not keep the broker from starting.
    const bool up = redis->WaitUntilUp(absl::Seconds(2));
    spdlog::info("state backend redis://{}:{}/{} prefix {}: {}", redis_options->address.host,
                 redis_options->address.port, redis_options->address.db, redis_options->prefix,
                 up ? "connected" : "not reachable yet; serving from this replica's view and retrying");
  }
  tokens.Start();

  CloudCodeClient cloud_code(CloudCodeBaseUrls(), http);
  std::unique_ptr<QuotaPoller> poller;
  if (embedded) {
    QuotaPollerOptions po;
    po.interval = absl::GetFlag(FLAGS_poll_interval);
    po.max_in_flight = absl::GetFlag(FLAGS_poll_concurrency);
    poller = std::make_unique<QuotaPoller>(
        po, pool, tokens, cloud_code, [&pool](const std::vector<QuotaObservation>& o) { pool.UpdateQuota(o); },
        Clock::Real());
    poller->Start();
    spdlog::info("quota validation on, polling in this process every {}", absl::FormatDuration(po.interval));
  }
  QuotaSubscriber subscriber(pool);
  if (!monitor.empty()) {
    subscriber.Connect(monitor);
    spdlog::info("quota validation on, streaming from the monitor at {}", monitor);
  }

  BrokerService service(pool, tokens, &subscriber);
  service.SetSecurity((*auth)->enabled() ? auth->get() : nullptr, audit.get());
  std::unique_ptr<Metrics> metrics;
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  if (std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen); !metrics_listen.empty()) {
    const absl::Status free = CheckListenAddress("--metrics_listen", metrics_listen);
    absl::StatusOr<std::unique_ptr<Metrics>> started =
        free.ok() ? Metrics::Start(metrics_listen, pool, tokens, subscriber, service, redis.get()) : absl::StatusOr<std::unique_ptr<Metrics>>(free);
    if (!started.ok()) {
      if (poller) poller->Stop();
      tokens.Stop();
      return FailStartup(kProgram, std::string(started.status().message()));
    }
    metrics = *std::move(started);
    interceptors = metrics->Interceptors();
    metrics->Announce(metrics_listen, absl::GetFlag(FLAGS_metrics_port_file));
  }
  absl::StatusOr<Servers> servers = Servers::Start({&service}, std::move(interceptors), *credentials);
  if (!servers.ok()) {
    if (poller) poller->Stop();
    tokens.Stop();
    return FailStartup(kProgram, std::string(servers.status().message()));
  }
  const int port = servers->port();
  RefreshHealth refresh_health(pool, tokens);
  auto update_health = [&] {
    const bool tokens_obtainable = refresh_health.Update();
    const bool serving = pool.UsableCount() > 0 && tokens_obtainable;
    servers->SetServing(kServiceName, serving);
    servers->SetDetail(kTokenRefreshServiceName, tokens_obtainable);
    if (redis) servers->SetDetail(kStateServiceName, redis->Up());
    return serving;
  };
  auto not_serving_reason = [&]() -> std::string {
    if (pool.UsableCount() == 0) return "no usable account is loaded (SERVING once one is)";
    return "no account holds a valid access token and every token refresh since the last success failed (see the "
           "'token refresh ... failed' lines; invalid_client means the OAuth client id/secret are not the ones "
           "the accounts were authorised with)";
  };
  bool serving = update_health();
  const std::string listen = absl::GetFlag(FLAGS_listen);
  spdlog::info("serving on {}{} with policy {}; {}", BoundAddress(listen, port),
               absl::GetFlag(FLAGS_tls_cert_file).empty()         ? ""
               : absl::GetFlag(FLAGS_tls_client_ca_file).empty() ? " over TLS"
                                                                 : " over mutual TLS",
               std::string(PolicyName(*policy)),
               serving ? "health SERVING" : absl::StrCat("health NOT_SERVING: ", not_serving_reason()));
  if (const std::string health_listen = absl::GetFlag(FLAGS_health_listen); !health_listen.empty()) {
    spdlog::info("health (grpc.health.v1 only, plaintext) on {}", BoundAddress(health_listen, servers->health_port()));
  }
  WritePortFile(port);

  const absl::Duration reload = absl::GetFlag(FLAGS_reload_interval);
  std::string signal;
  // Health follows the state backend within half a second; the folder is checked every --reload_interval.
  const absl::Duration tick = redis ? std::min(reload, absl::Milliseconds(500)) : reload;
  absl::Time next_reload = absl::Now() + reload;
  while ((signal = WaitForStopSignal(tick)).empty()) {
    if (absl::Now() >= next_reload) {
      loader.ReloadIfChanged();
      (*auth)->ReloadIfChanged();
      next_reload = absl::Now() + reload;
    }
    if (bool now_serving = update_health(); now_serving != serving) {
      spdlog::info("health is now {}", now_serving ? "SERVING" : absl::StrCat("NOT_SERVING: ", not_serving_reason()));
      serving = now_serving;
    }
  }
  spdlog::info("received {}; draining for up to {}", signal, absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)));
  // Drain: probes see NOT_SERVING at once; calls waiting for an account get their answer now;
  // running RPCs get until the deadline.
  servers->Drain(absl::GetFlag(FLAGS_drain_timeout), [&service] { service.Shutdown(); });
  subscriber.Disconnect();
  if (poller) poller->Stop();
  tokens.Stop();
  if (redis) {
    pool.AttachSharedState(nullptr);
    redis->Stop();
  }
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace tokenbroker

int main(int argc, char** argv) {
  tokenbroker::ParseFlagsOrExit(
      argc, argv,
      {.program = "tokenbroker",
       .usage = "tokenbroker: hands out fresh Google OAuth access tokens of the best account, request by request.\n"
                "\n"
                "Usage: tokenbroker --accounts_dir=DIR [--listen=127.0.0.1:50051] [flags]\n"
                "\n"
                "Environment: TOKENBROKER_OAUTH_CLIENT_ID and TOKENBROKER_OAUTH_CLIENT_SECRET (the OAuth client the\n"
                "accounts were authorised with), TOKENBROKER_REDIS_PASSWORD (with a Redis --state_backend).\n"
                "Exit status: 0 after SIGTERM/SIGINT and a drain; 2 for a bad flag or configuration (one line on\n"
                "stderr names it)."});
  return tokenbroker::Run();
}
