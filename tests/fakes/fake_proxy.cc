#include "tests/fakes/fake_proxy.h"

#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tokenbroker::testing {
namespace {

bool SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

int ConnectTo(const std::string& target) {
  const size_t colon = target.rfind(':');
  if (colon == std::string::npos) return -1;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(target.substr(0, colon).c_str(), target.substr(colon + 1).c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && ::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  return fd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<FakeProxy>> FakeProxy::Start(Options options) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 64) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    return absl::UnavailableError("cannot listen on 127.0.0.1:0");
  }
  std::unique_ptr<FakeProxy> proxy(new FakeProxy(std::move(options), fd, ntohs(addr.sin_port)));
  proxy->accept_thread_ = std::thread([p = proxy.get()] { p->AcceptLoop(); });
  return proxy;
}

FakeProxy::~FakeProxy() {
  stopping_ = true;
  ::shutdown(listen_fd_, SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  ::close(listen_fd_);
  std::vector<std::thread> workers;
  {
    absl::MutexLock lock(&mu_);
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
    workers.swap(workers_);
  }
  for (std::thread& t : workers) t.join();
}

std::string FakeProxy::url() const {
  std::string credentials = options_.user.empty() ? "" : absl::StrCat(options_.user, ":", options_.password, "@");
  return absl::StrCat("http://", credentials, "127.0.0.1:", port_);
}

std::vector<FakeProxy::Tunnel> FakeProxy::tunnels() const {
  absl::MutexLock lock(&mu_);
  return tunnels_;
}

void FakeProxy::AcceptLoop() {
  while (!stopping_) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      ::close(fd);
      return;
    }
    open_fds_.push_back(fd);
    workers_.emplace_back([this, fd] { Serve(fd); });
  }
}

void FakeProxy::Serve(int fd) {
  int upstream = -1;
  auto finish = [&] {
    absl::MutexLock lock(&mu_);
    for (int f : {fd, upstream}) {
      if (f < 0) continue;
      open_fds_.erase(std::remove(open_fds_.begin(), open_fds_.end(), f), open_fds_.end());
      ::close(f);
    }
  };
  std::string data;
  char buf[16384];
  size_t end = std::string::npos;
  while ((end = data.find("\r\n\r\n")) == std::string::npos) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0 || data.size() > 65536) return finish();
    data.append(buf, static_cast<size_t>(n));
  }
  std::vector<std::string> lines = absl::StrSplit(data.substr(0, end), "\r\n");
  std::vector<std::string> request = absl::StrSplit(lines[0], ' ');
  Tunnel tunnel;
  if (request.size() >= 2) tunnel.target = request[1];
  for (size_t i = 1; i < lines.size(); ++i) {
    if (absl::StartsWithIgnoreCase(lines[i], "proxy-authorization:")) {
      tunnel.proxy_authorization = std::string(absl::StripAsciiWhitespace(lines[i].substr(20)));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    tunnels_.push_back(tunnel);
  }
  if (options_.mode == Mode::kHang) {
    while (::recv(fd, buf, sizeof buf, 0) > 0) {
    }
    return finish();
  }
  if (request.size() < 2 || request[0] != "CONNECT") {
    SendAll(fd, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
    return finish();
  }
  if (!options_.user.empty() &&
      tunnel.proxy_authorization != absl::StrCat("Basic ", absl::Base64Escape(absl::StrCat(options_.user, ":", options_.password)))) {
    SendAll(fd, "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"fake\"\r\n"
                "Content-Length: 0\r\n\r\n");
    return finish();
  }
  if (options_.mode == Mode::kRefuse) {
    SendAll(fd, absl::StrCat("HTTP/1.1 ", options_.refuse_status, " Refused\r\nContent-Length: 0\r\n\r\n"));
    return finish();
  }
  upstream = ConnectTo(tunnel.target);
  if (upstream < 0) {
    SendAll(fd, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
    return finish();
  }
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return finish();
    open_fds_.push_back(upstream);
  }
  if (!SendAll(fd, "HTTP/1.1 200 Connection established\r\n\r\n") || !SendAll(upstream, data.substr(end + 4))) {
    return finish();
  }
  pollfd fds[2] = {{fd, POLLIN, 0}, {upstream, POLLIN, 0}};
  while (true) {
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
    bool done = false;
    for (int i = 0; i < 2 && !done; ++i) {
      if (fds[i].revents == 0) continue;
      ssize_t n = ::recv(fds[i].fd, buf, sizeof buf, 0);
      done = n <= 0 || !SendAll(fds[1 - i].fd, absl::string_view(buf, static_cast<size_t>(n)));
    }
    if (done) break;
  }
  finish();
}

}  // namespace tokenbroker::testing
