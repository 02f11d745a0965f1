#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace tokenbroker::testing {

// A real HTTP CONNECT proxy on loopback (port 0), for tests of egresses: it tunnels each CONNECT
// to its target and records it, or answers it with an error status, or never answers. Thread-safe.
class FakeProxy {
 public:
  enum class Mode {
    kTunnel,  // "200 Connection established", then relays bytes both ways
    kRefuse,  // answers the CONNECT with `refuse_status`
    kHang,    // reads the CONNECT and says nothing
  };
  struct Options {
    Mode mode = Mode::kTunnel;
    int refuse_status = 502;
    // When set, a CONNECT without "Proxy-Authorization: Basic base64(user:password)" of these is
    // answered 407.
    std::string user;
    std::string password;
  };
  struct Tunnel {
    std::string target;               // host:port of the CONNECT
    std::string proxy_authorization;  // the header as received ("" when none)
  };

  static absl::StatusOr<std::unique_ptr<FakeProxy>> Start(Options options);
  ~FakeProxy();

  int port() const { return port_; }
  // "http://[user:password@]127.0.0.1:<port>"
  std::string url() const;
  std::vector<Tunnel> tunnels() const;

 private:
  FakeProxy(Options options, int listen_fd, int port) : options_(std::move(options)), listen_fd_(listen_fd), port_(port) {}
  void AcceptLoop();
  void Serve(int fd);

  const Options options_;
  const int listen_fd_;
  const int port_;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  mutable absl::Mutex mu_;
  std::vector<Tunnel> tunnels_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<int> open_fds_ ABSL_GUARDED_BY(mu_);  // shut down on destruction
};

}  // namespace tokenbroker::testing
