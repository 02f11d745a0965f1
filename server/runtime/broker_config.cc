#include "server/runtime/broker_config.h"

#include <cstdlib>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "server/runtime/flags.h"

// The broker's own flags (the shared ones are in flags.cc).
ABSL_FLAG(std::string, policy, "balance", "Selection policy: balance, fill_first, reset_soonest, round_robin.");
ABSL_FLAG(absl::Duration, session_ttl, absl::Hours(1), "A session binding expires after this long unused.");
ABSL_FLAG(int, max_sessions, 100000, "Most session bindings kept; the least recently used go first.");
ABSL_FLAG(int, max_inflight_per_account, 0,
          "Leases in flight per account beyond which it is skipped (0: no cap). With --state_backend it "
          "counts every replica's leases (fleet-wide; this replica's own while Redis is down).");
ABSL_FLAG(absl::Duration, lease_timeout, absl::Minutes(10),
          "A lease not reported with ReportOutcome within this long ends by itself.");
ABSL_FLAG(int, max_leases, 100000,
          "Leases in flight at most (1 to 10000000; about 250 bytes each). A lease issued to a full table first "
          "ends the oldest lease of the caller holding the most (counted in tokenbroker_leases_evicted_total).");
ABSL_FLAG(absl::Duration, probe_timeout, absl::Seconds(60),
          "After a cooldown ends, how long the single probe request may take to report before another is allowed.");
ABSL_FLAG(absl::Duration, validation_block, absl::Hours(1),
          "How long a 403 VALIDATION_REQUIRED blocks an account when the upstream names no delay.");
ABSL_FLAG(absl::Duration, credits_exhausted_ttl, absl::Hours(5),
          "How long an INSUFFICIENT_G1_CREDITS_BALANCE answer that names no reset marks the account's AI credits "
          "exhausted (GetToken's credits_exhausted); between 1m and 7 days.");
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
ABSL_FLAG(std::string, model_families_file, "",
          "File of \"<model glob> <family>\" lines, one a line, that put models in quota families before the "
          "built-in rules (gemini*, claude*/gpt* as 3p, *image* as image); see README \"Quota families\".");
ABSL_FLAG(double, quota_low_threshold, 0.10, "Remaining fraction below which an account is LOW for a model.");
ABSL_FLAG(double, quota_exhausted_threshold, 0.05,
          "Remaining fraction below which an account is EXHAUSTED for a model and skipped.");
ABSL_FLAG(absl::Duration, poll_interval, absl::Minutes(5), "With --embedded_monitor: each account's quota is read this often.");
ABSL_FLAG(int, poll_concurrency, 4, "With --embedded_monitor: quota requests in flight at most.");
ABSL_FLAG(std::string, metrics_listen, "",
          "Serve Prometheus /metrics on this host:port (port 0: any free one); empty: no metrics.");
ABSL_FLAG(std::string, metrics_port_file, "", "If set, the bound /metrics port is written to this file.");
ABSL_FLAG(bool, status_show_emails, false,
          "Show account emails on the /status page and in /status.json (served on --metrics_listen).");
ABSL_FLAG(std::string, caller_tokens_file, "",
          "Callers and their bearer tokens, one \"<name> <token>\" a line: GetToken and ReportOutcome then need "
          "\"authorization: Bearer <token>\" (empty: open to whoever reaches the socket).");
ABSL_FLAG(std::string, caller_policy_file, "",
          "Caller policies, one \"<name> key=value ...\" a line (README \"Caller policies\"): each caller's leases "
          "in flight, share of the accounts, models and priority. Reloaded when it changes. Empty: no limits.");
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

absl::StatusOr<BrokerConfig> BrokerConfigFromFlags() {
  if (absl::Status s = CheckCommonFlags(); !s.ok()) return s;
  BrokerConfig config;
  absl::StatusOr<Policy> policy = ParsePolicy(absl::GetFlag(FLAGS_policy));
  if (!policy.ok()) return absl::InvalidArgumentError(absl::StrCat("--policy: ", policy.status().message()));
  if (absl::GetFlag(FLAGS_max_sessions) < 1) return absl::InvalidArgumentError("--max_sessions must be at least 1");
  if (absl::GetFlag(FLAGS_session_ttl) <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--session_ttl must be positive");
  }
  if (absl::GetFlag(FLAGS_max_inflight_per_account) < 0) {
    return absl::InvalidArgumentError("--max_inflight_per_account must be 0 or more");
  }
  if (const int max_leases = absl::GetFlag(FLAGS_max_leases); max_leases < 1 || max_leases > 10'000'000) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_leases must be between 1 and 10000000, not ", max_leases));
  }
  for (const auto& [name, value] : {std::pair{"--lease_timeout", absl::GetFlag(FLAGS_lease_timeout)},
                                    std::pair{"--probe_timeout", absl::GetFlag(FLAGS_probe_timeout)},
                                    std::pair{"--validation_block", absl::GetFlag(FLAGS_validation_block)},
                                    std::pair{"--poll_interval", absl::GetFlag(FLAGS_poll_interval)}}) {
    if (value <= absl::ZeroDuration()) return absl::InvalidArgumentError(absl::StrCat(name, " must be positive"));
  }
  if (absl::GetFlag(FLAGS_poll_concurrency) < 1) {
    return absl::InvalidArgumentError("--poll_concurrency must be at least 1");
  }
  const absl::Duration credits_ttl = absl::GetFlag(FLAGS_credits_exhausted_ttl);
  if (credits_ttl < absl::Minutes(1) || credits_ttl > absl::Hours(24 * 7)) {
    return absl::InvalidArgumentError(absl::StrCat("--credits_exhausted_ttl must be between 1m and 168h, not ",
                                                   absl::FormatDuration(credits_ttl)));
  }
  config.embedded_monitor = absl::GetFlag(FLAGS_embedded_monitor);
  config.quota_monitor = absl::GetFlag(FLAGS_quota_monitor);
  if (config.embedded_monitor && !config.quota_monitor.empty()) {
    return absl::InvalidArgumentError("--quota_monitor and --embedded_monitor exclude each other; choose one");
  }
  QuotaSettings& quota = config.quota;
  quota.enabled = config.embedded_monitor || !config.quota_monitor.empty();
  quota.cache_ttl = absl::GetFlag(FLAGS_quota_cache_ttl);
  quota.low_threshold = absl::GetFlag(FLAGS_quota_low_threshold);
  quota.exhausted_threshold = absl::GetFlag(FLAGS_quota_exhausted_threshold);
  quota.call_cost_prior = absl::GetFlag(FLAGS_quota_call_cost_prior);
  quota.max_lag = absl::GetFlag(FLAGS_quota_max_lag);
  if (absl::Status s = ValidateQuotaSettings(quota); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--quota_", s.message()));
  }
  config.families = FamilyMap::Default();
  if (const std::string path = absl::GetFlag(FLAGS_model_families_file); !path.empty()) {
    absl::StatusOr<std::shared_ptr<const FamilyMap>> families = FamilyMap::Load(path);
    if (!families.ok()) return families.status();
    config.families = *std::move(families);
  }
  config.poller.interval = absl::GetFlag(FLAGS_poll_interval);
  config.poller.max_in_flight = absl::GetFlag(FLAGS_poll_concurrency);
  absl::StatusOr<OnboardingOptions> onboarding = OnboardingOptionsFromFlags();
  if (!onboarding.ok()) return onboarding.status();
  config.poller.onboarding = *onboarding;
  // Data must outlive the wait for the next poll (jitter included), or exhausted accounts read
  // as unknown, and are handed out, just before each poll.
  if (config.embedded_monitor && config.poller.interval * 1.1 + absl::Seconds(5) > quota.cache_ttl) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--poll_interval (", absl::FormatDuration(config.poller.interval),
        ") plus 10 % jitter and 5s must stay below --quota_cache_ttl (", absl::FormatDuration(quota.cache_ttl), ")"));
  }
  if (const std::string backend = absl::GetFlag(FLAGS_state_backend); backend != "memory") {
    absl::StatusOr<RedisAddress> address = ParseRedisUrl(backend, "--state_backend");
    if (!address.ok()) return absl::InvalidArgumentError(address.status().message());
    const std::string prefix = absl::GetFlag(FLAGS_state_prefix);
    if (prefix.empty() || prefix.size() > 64 || prefix.find_first_of(" \t\n*?[]") != std::string::npos) {
      return absl::InvalidArgumentError("--state_prefix must be 1 to 64 characters without spaces or * ? [ ]");
    }
    const absl::Duration timeout = absl::GetFlag(FLAGS_state_timeout);
    if (timeout < absl::Milliseconds(1) || timeout > absl::Seconds(10)) {
      return absl::InvalidArgumentError("--state_timeout must be between 1ms and 10s");
    }
    RedisStateOptions& redis = config.redis.emplace();
    redis.address = *address;
    // A password comes from the environment (a Secret), never from the command line.
    if (const char* password = std::getenv("TOKENBROKER_REDIS_PASSWORD"); password != nullptr) {
      redis.address.password = password;
    }
    redis.prefix = prefix;
    redis.command_timeout = timeout;
    redis.session_ttl = absl::GetFlag(FLAGS_session_ttl);
    redis.lease_ttl = absl::GetFlag(FLAGS_lease_timeout);
  }
  PoolOptions& pool = config.pool;
  pool.policy = *policy;
  pool.session_idle_ttl = absl::GetFlag(FLAGS_session_ttl);
  pool.max_sessions = static_cast<size_t>(absl::GetFlag(FLAGS_max_sessions));
  pool.max_inflight_per_account = absl::GetFlag(FLAGS_max_inflight_per_account);
  pool.max_leases = static_cast<size_t>(absl::GetFlag(FLAGS_max_leases));
  pool.lease_timeout = absl::GetFlag(FLAGS_lease_timeout);
  pool.credits_exhausted_ttl = credits_ttl;
  pool.cooldowns.probe_timeout = absl::GetFlag(FLAGS_probe_timeout);
  pool.cooldowns.validation_block = absl::GetFlag(FLAGS_validation_block);
  config.addresses = ServerAddressesFromFlags();
  config.accounts_dir = absl::GetFlag(FLAGS_accounts_dir);
  config.egress_file = absl::GetFlag(FLAGS_egress_file);
  config.oauth = OAuthOptionsFromFlags();
  config.tokens = TokenManagerOptionsFromFlags();
  config.cloudcode_base_urls = CloudCodeBaseUrls();
  config.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  config.metrics_port_file = absl::GetFlag(FLAGS_metrics_port_file);
  config.status_show_emails = absl::GetFlag(FLAGS_status_show_emails);
  config.caller_tokens_file = absl::GetFlag(FLAGS_caller_tokens_file);
  config.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  config.caller_policy_file = absl::GetFlag(FLAGS_caller_policy_file);
  config.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  config.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  config.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  config.audit_log = absl::GetFlag(FLAGS_audit_log);
  config.reload_interval = absl::GetFlag(FLAGS_reload_interval);
  config.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  return config;
}

}  // namespace tokenbroker
