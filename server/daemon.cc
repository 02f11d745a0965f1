#include "server/daemon.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpc/health/v1/health.pb.h"
#include "server/logging.h"
#include "spdlog/spdlog.h"

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

std::string FlagOrEnv(const std::string& flag_value, const char* env) {
  if (!flag_value.empty()) return flag_value;
  const char* v = std::getenv(env);
  return v == nullptr ? "" : v;
}

sigset_t StopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}

}  // namespace

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
  if (o.client_id.empty()) {
    spdlog::warn("no OAuth client id (--oauth_client_id or $TOKENBROKER_OAUTH_CLIENT_ID): Google will reject "
                 "token refreshes");
  }
  return o;
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

void AccountLoader::Load() {
  fingerprint_ = store_.Fingerprint();
  LoadResult loaded = store_.LoadAll();
  std::set<std::string> now;
  for (const LoadProblem& p : loaded.problems) {
    std::string key = absl::StrCat(p.path, "\n", p.reason);
    now.insert(key);
    if (!reported_.contains(key)) spdlog::warn("skipping account file {}: {}", p.path, p.reason);
  }
  reported_ = std::move(now);
  // Always once at start, even for an empty folder ("0 accounts"); then on every change of count.
  if (!loaded_once_ || loaded.accounts.size() != pool_.size()) {
    spdlog::info("loaded {} accounts from {} ({} files skipped){}", loaded.accounts.size(), store_.dir(),
                 loaded.problems.size(),
                 loaded.accounts.empty() ? "; add <id>.json account files there: they are picked up without a restart"
                                         : "");
  }
  loaded_once_ = true;
  pool_.Load(std::move(loaded.accounts));
}

bool AccountLoader::ReloadIfChanged() {
  if (store_.Fingerprint() == fingerprint_) return false;
  Load();
  return true;
}

absl::StatusOr<Servers> Servers::Start(
    const std::vector<grpc::Service*>& services,
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  // Linking the health descriptors lets reflection describe gRPC's built-in health service.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  auto build = [](const std::string& flag, const std::string& listen, const std::vector<grpc::Service*>& services,
                  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors,
                  std::shared_ptr<grpc::ServerCredentials> creds,
                  int* port) -> absl::StatusOr<std::unique_ptr<grpc::Server>> {
    if (absl::Status free = CheckListenAddress(absl::StrCat("--", flag), listen); !free.ok()) return free;
    grpc::ServerBuilder builder;
    // gRPC sets SO_REUSEPORT by default: a second server on a taken port would start silently.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    *port = 0;
    builder.AddListeningPort(listen, creds ? creds : grpc::InsecureServerCredentials(), port);
    for (grpc::Service* s : services) builder.RegisterService(s);
    if (!interceptors.empty()) builder.experimental().SetInterceptorCreators(std::move(interceptors));
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (server == nullptr || (*port == 0 && listen.rfind("unix:", 0) != 0)) {
      return absl::UnavailableError(absl::StrCat("--", flag, ": cannot listen on ", listen));
    }
    return server;
  };
  Servers out;
  absl::StatusOr<std::unique_ptr<grpc::Server>> api =
      build("listen", absl::GetFlag(FLAGS_listen), services, std::move(interceptors), std::move(credentials), &out.port_);
  if (!api.ok()) return api.status();
  out.api_ = *std::move(api);
  if (std::string health_listen = absl::GetFlag(FLAGS_health_listen); !health_listen.empty()) {
    int health_port = 0;
    absl::StatusOr<std::unique_ptr<grpc::Server>> health = build("health_listen", health_listen, {}, {}, nullptr, &health_port);
    if (!health.ok()) {
      out.api_->Shutdown(std::chrono::system_clock::now());
      return health.status();
    }
    out.health_ = *std::move(health);
    out.health_port_ = health_port;
  }
  return out;
}

void Servers::SetDetail(const std::string& service_name, bool serving) {
  for (grpc::Server* s : {api_.get(), health_.get()}) {
    if (s != nullptr && s->GetHealthCheckService() != nullptr) {
      s->GetHealthCheckService()->SetServingStatus(service_name, serving);
    }
  }
}

void Servers::SetServing(const std::string& service_name, bool serving) {
  for (grpc::Server* s : {api_.get(), health_.get()}) {
    if (s == nullptr || s->GetHealthCheckService() == nullptr) continue;
    s->GetHealthCheckService()->SetServingStatus("", serving);
    s->GetHealthCheckService()->SetServingStatus(service_name, serving);
  }
}

void Servers::Drain(absl::Duration deadline, const std::function<void()>& before_shutdown) {
  for (grpc::Server* s : {api_.get(), health_.get()}) {
    if (s != nullptr && s->GetHealthCheckService() != nullptr) s->GetHealthCheckService()->Shutdown();
  }
  if (before_shutdown) before_shutdown();
  api_->Shutdown(absl::ToChronoTime(absl::Now() + deadline));
  // Probes saw NOT_SERVING during the drain; now the health server goes at once. Without a
  // deadline its Shutdown would wait for every Health/Watch stream (a watcher never ends one).
  if (health_) health_->Shutdown(std::chrono::system_clock::now());
}

std::string BoundAddress(const std::string& listen, int port) {
  if (listen.rfind("unix:", 0) == 0 || listen.rfind("unix-abstract:", 0) == 0) return listen;
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return absl::StrCat(listen, ":", port);
  return absl::StrCat(listen.substr(0, colon + 1), port);
}

absl::Status CheckListenAddress(const std::string& flag, const std::string& listen) {
  if (listen.rfind("unix-abstract:", 0) == 0) return absl::OkStatus();
  if (listen.rfind("unix:", 0) == 0) {
    std::string path = listen.substr(5);
    if (path.rfind("//", 0) == 0) path = path.substr(2);  // unix:///abs/path
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return absl::OkStatus();
    sockaddr_un addr{};
    if (path.size() >= sizeof(addr.sun_path)) {
      return absl::InvalidArgumentError(absl::StrCat(flag, ": ", listen, ": the socket path is too long"));
    }
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return absl::OkStatus();
    const bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
    ::close(fd);
    if (live) {
      return absl::FailedPreconditionError(absl::StrCat(
          flag, ": ", listen, " is already in use by a running process (another tokenbroker?); stop it or choose another path"));
    }
    return absl::OkStatus();  // a stale socket file: gRPC replaces it
  }
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", listen, "' is not host:port or unix:/path"));
  }
  std::string host = listen.substr(0, colon);
  const std::string port = listen.substr(colon + 1);
  if (host.rfind("dns:", 0) == 0 || host.rfind("ipv4:", 0) == 0 || host.rfind("ipv6:", 0) == 0) {
    return absl::OkStatus();  // a gRPC URI form: left to gRPC
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (port.empty() || port.find_first_not_of("0123456789") != std::string::npos || port.size() > 5 ||
      std::stoi(port) > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", listen, "' has no valid port (0 to 65535)"));
  }
  if (port == "0" || std::stoi(port) == 0) return absl::OkStatus();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot listen on ", listen, ": host '", host, "' does not resolve (", gai_strerror(rc), ")"));
  }
  absl::Status result = absl::OkStatus();
  for (addrinfo* a = found; a != nullptr && result.ok(); a = a->ai_next) {
    int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) != 0) {
      const int err = errno;
      if (err == EADDRINUSE) {
        result = absl::FailedPreconditionError(absl::StrCat(
            flag, ": ", listen, " is already in use (another tokenbroker?); stop it or choose another port"));
      } else if (err == EACCES) {
        result = absl::FailedPreconditionError(
            absl::StrCat(flag, ": cannot listen on ", listen, ": permission denied (ports below 1024 need privileges)"));
      } else if (err == EADDRNOTAVAIL) {
        result = absl::FailedPreconditionError(
            absl::StrCat(flag, ": cannot listen on ", listen, ": no such address on this machine"));
      }
    }
    ::close(fd);
  }
  ::freeaddrinfo(found);
  return result;
}

void WritePort(const std::string& path, int port) {
  std::string tmp = path + ".tmp";
  std::ofstream(tmp) << port << "\n";
  std::rename(tmp.c_str(), path.c_str());
}

void WritePortFile(int port) {
  if (std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) WritePort(pf, port);
}

void BlockStopSignals() {
  sigset_t set = StopSignals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

std::string WaitForStopSignal(absl::Duration timeout) {
  sigset_t set = StopSignals();
  timespec ts = absl::ToTimespec(timeout);
  int sig = sigtimedwait(&set, nullptr, &ts);
  if (sig == SIGTERM) return "SIGTERM";
  if (sig == SIGINT) return "SIGINT";
  return "";
}

}  // namespace tokenbroker
