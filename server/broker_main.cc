// tokenbroker: the broker binary. Wires flags, the account store, the pool, the token manager and
// the gRPC server together, then waits for SIGTERM/SIGINT to drain.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.pb.h"
#include "lib/account_pool.h"
#include "lib/account_store.h"
#include "lib/http_client.h"
#include "lib/oauth_client.h"
#include "lib/token_manager.h"
#include "server/broker_service.h"
#include "server/logging.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "Where to serve gRPC: host:port (port 0 picks a free one) or unix:/path/to.sock.");
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
          "Base URL of the Cloud Code API (used by quota validation).");
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
ABSL_FLAG(std::string, log_format, "text", "Log format: text or json (one object per line).");
ABSL_FLAG(std::string, log_level, "info", "Log level: trace, debug, info, warn, error, off.");

namespace tokenbroker {
namespace {

constexpr char kServiceName[] = "tokenbroker.v1.TokenBrokerService";

int Fail(const std::string& message) {
  std::cerr << "tokenbroker: " << message << "\n";
  return 2;
}

std::string FlagOrEnv(const std::string& flag_value, const char* env) {
  if (!flag_value.empty()) return flag_value;
  const char* v = std::getenv(env);
  return v == nullptr ? "" : v;
}

// Logs each problem file once (until it is fixed), so a bad file does not flood the log.
class ProblemReporter {
 public:
  void Report(const std::vector<LoadProblem>& problems) {
    std::set<std::string> now;
    for (const LoadProblem& p : problems) {
      std::string key = absl::StrCat(p.path, "\n", p.reason);
      now.insert(key);
      if (!seen_.contains(key)) spdlog::warn("skipping account file {}: {}", p.path, p.reason);
    }
    seen_ = std::move(now);
  }

 private:
  std::set<std::string> seen_;
};

int Run() {
  if (absl::Status s = SetUpLogging(absl::GetFlag(FLAGS_log_format), absl::GetFlag(FLAGS_log_level));
      !s.ok()) {
    return Fail(std::string(s.message()));
  }
  const std::string accounts_dir = absl::GetFlag(FLAGS_accounts_dir);
  if (accounts_dir.empty()) return Fail("--accounts_dir is required (a folder of <id>.json account files)");
  absl::StatusOr<Policy> policy = ParsePolicy(absl::GetFlag(FLAGS_policy));
  if (!policy.ok()) return Fail(absl::StrCat("--policy: ", policy.status().message()));
  if (absl::GetFlag(FLAGS_max_sessions) < 1) return Fail("--max_sessions must be at least 1");
  if (absl::GetFlag(FLAGS_refresh_workers) < 1) return Fail("--refresh_workers must be at least 1");
  if (absl::GetFlag(FLAGS_session_ttl) <= absl::ZeroDuration()) return Fail("--session_ttl must be positive");
  if (absl::GetFlag(FLAGS_max_inflight_per_account) < 0) return Fail("--max_inflight_per_account must be 0 or more");
  for (const auto& [name, value] : {std::pair{"--lease_timeout", absl::GetFlag(FLAGS_lease_timeout)},
                                    std::pair{"--probe_timeout", absl::GetFlag(FLAGS_probe_timeout)},
                                    std::pair{"--validation_block", absl::GetFlag(FLAGS_validation_block)}}) {
    if (value <= absl::ZeroDuration()) return Fail(absl::StrCat(name, " must be positive"));
  }
  if (absl::GetFlag(FLAGS_reload_interval) <= absl::ZeroDuration()) {
    return Fail("--reload_interval must be positive");
  }

  absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(accounts_dir);
  if (!store.ok()) return Fail(absl::StrCat("--accounts_dir: ", store.status().message()));

  // Signals are taken synchronously by the main thread; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  PoolOptions pool_options;
  pool_options.policy = *policy;
  pool_options.session_idle_ttl = absl::GetFlag(FLAGS_session_ttl);
  pool_options.max_sessions = static_cast<size_t>(absl::GetFlag(FLAGS_max_sessions));
  pool_options.max_inflight_per_account = absl::GetFlag(FLAGS_max_inflight_per_account);
  pool_options.lease_timeout = absl::GetFlag(FLAGS_lease_timeout);
  pool_options.cooldowns.probe_timeout = absl::GetFlag(FLAGS_probe_timeout);
  pool_options.cooldowns.validation_block = absl::GetFlag(FLAGS_validation_block);
  AccountPool pool(pool_options, Clock::Real());
  ProblemReporter problems;
  uint64_t fingerprint = (*store)->Fingerprint();
  {
    LoadResult loaded = (*store)->LoadAll();
    problems.Report(loaded.problems);
    spdlog::info("loaded {} accounts from {} ({} files skipped)", loaded.accounts.size(), accounts_dir,
                 loaded.problems.size());
    pool.Load(std::move(loaded.accounts));
  }

  OAuthOptions oauth_options;
  oauth_options.token_url = absl::GetFlag(FLAGS_oauth_token_url);
  oauth_options.client_id = FlagOrEnv(absl::GetFlag(FLAGS_oauth_client_id), "TOKENBROKER_OAUTH_CLIENT_ID");
  oauth_options.client_secret =
      FlagOrEnv(absl::GetFlag(FLAGS_oauth_client_secret), "TOKENBROKER_OAUTH_CLIENT_SECRET");
  if (oauth_options.client_id.empty()) {
    spdlog::warn("no OAuth client id (--oauth_client_id or $TOKENBROKER_OAUTH_CLIENT_ID): Google will "
                 "reject token refreshes");
  }
  HttpClient http;
  OAuthClient oauth(oauth_options, http);
  TokenManagerOptions token_options;
  token_options.min_token_ttl = absl::GetFlag(FLAGS_min_token_ttl);
  token_options.refresh_ahead = absl::GetFlag(FLAGS_refresh_ahead);
  token_options.scan_interval = absl::GetFlag(FLAGS_refresh_scan_interval);
  token_options.workers = absl::GetFlag(FLAGS_refresh_workers);
  TokenManager tokens(token_options, pool, oauth, store->get(), Clock::Real());
  tokens.Start();

  // Linking the health descriptors lets reflection describe gRPC's built-in health service.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  BrokerService service(pool, tokens);
  grpc::ServerBuilder builder;
  // gRPC sets SO_REUSEPORT by default: a second server on a taken port would start silently.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int port = 0;
  const std::string listen = absl::GetFlag(FLAGS_listen);
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (port == 0 && listen.rfind("unix:", 0) != 0)) {
    tokens.Stop();
    return Fail(absl::StrCat("--listen: cannot listen on ", listen));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  auto update_health = [&] {
    const bool serving = pool.UsableCount() > 0;
    health->SetServingStatus("", serving);
    health->SetServingStatus(kServiceName, serving);
    return serving;
  };
  bool serving = update_health();
  spdlog::info("serving on {}{} with policy {}; {}", listen,
               listen.rfind("unix:", 0) == 0 ? "" : absl::StrCat(" (port ", port, ")"),
               std::string(PolicyName(*policy)),
               serving ? "health SERVING" : "health NOT_SERVING until a usable account is loaded");
  if (std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    std::string tmp = pf + ".tmp";
    std::ofstream(tmp) << port << "\n";
    std::rename(tmp.c_str(), pf.c_str());
  }

  const absl::Duration reload = absl::GetFlag(FLAGS_reload_interval);
  while (true) {
    timespec timeout = absl::ToTimespec(reload);
    int sig = sigtimedwait(&signals, nullptr, &timeout);
    if (sig == SIGTERM || sig == SIGINT) {
      spdlog::info("received {}; draining for up to {}", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                   absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)));
      break;
    }
    uint64_t now_fingerprint = (*store)->Fingerprint();
    if (now_fingerprint != fingerprint) {
      fingerprint = now_fingerprint;
      LoadResult loaded = (*store)->LoadAll();
      problems.Report(loaded.problems);
      if (loaded.accounts.size() != pool.size()) {
        spdlog::info("accounts folder changed: {} accounts now loaded", loaded.accounts.size());
      }
      pool.Load(std::move(loaded.accounts));
    }
    bool now_serving = update_health();
    if (now_serving != serving) {
      spdlog::info("health is now {}", now_serving ? "SERVING" : "NOT_SERVING");
      serving = now_serving;
    }
  }

  // Drain: probes see NOT_SERVING at once; calls waiting for an account get their answer now;
  // running RPCs get until the deadline.
  health->Shutdown();
  service.Shutdown();
  server->Shutdown(std::chrono::system_clock::now() +
                   absl::ToChronoSeconds(absl::GetFlag(FLAGS_drain_timeout)));
  tokens.Stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace tokenbroker

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "tokenbroker: hands out fresh Google OAuth access tokens of the best account, request by "
      "request.\nUsage: tokenbroker --accounts_dir=DIR [--listen=127.0.0.1:50051] [flags]");
  absl::ParseCommandLine(argc, argv);
  return tokenbroker::Run();
}
