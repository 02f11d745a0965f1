#include "server/runtime/servers.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <netdb.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.pb.h"

namespace tokenbroker {

absl::StatusOr<Servers> Servers::Start(
    const ServerAddresses& addresses, const std::vector<grpc::Service*>& services,
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
      build("listen", addresses.listen, services, std::move(interceptors), std::move(credentials), &out.port_);
  if (!api.ok()) return api.status();
  out.api_ = *std::move(api);
  if (const std::string& health_listen = addresses.health_listen; !health_listen.empty()) {
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
  api_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(deadline));
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

}  // namespace tokenbroker
