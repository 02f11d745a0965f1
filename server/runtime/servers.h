#pragma once

// The gRPC servers of a binary, and the checks of a listen address.

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Where the servers listen ("host:port" or "unix:/path"); health_listen empty: no health server.
struct ServerAddresses {
  std::string listen;
  std::string health_listen;
};

// The API server on `addresses.listen` (--listen) (reflection and health included, never sharing a port: SO_REUSEPORT
// off) and, with `addresses.health_listen` (--health_listen), a second server with only grpc.health.v1 on a plaintext port for
// kubelet probes while the API listens on a unix socket.
class Servers {
 public:
  // `interceptors` (may be empty) see every API call. The message names the flag at fault.
  // `credentials` secure the API port (default plaintext); the health port is always plaintext.
  static absl::StatusOr<Servers> Start(
      const ServerAddresses& addresses, const std::vector<grpc::Service*>& services,
      std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors = {},
      std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);

  // The bound TCP port of the API server; 0 for a unix socket.
  int port() const { return port_; }
  // The bound port of the --health_listen server; 0 when there is none.
  int health_port() const { return health_port_; }
  // Sets `service_name` and "" SERVING or NOT_SERVING on both servers.
  void SetServing(const std::string& service_name, bool serving);
  // Sets only `service_name` (a health detail, e.g. a dependency), leaving "" as it is.
  void SetDetail(const std::string& service_name, bool serving);
  // Drains: health NOT_SERVING for good at once, then in-flight calls get until `deadline`; the
  // --health_listen server keeps answering probes (NOT_SERVING) meanwhile and is then closed at
  // once, cancelling any Health/Watch stream on it. Returns within `deadline` (plus scheduling).
  // `before_shutdown` runs in between (e.g. to answer waiting calls).
  void Drain(absl::Duration deadline, const std::function<void()>& before_shutdown = nullptr);

 private:
  std::unique_ptr<grpc::Server> api_;
  std::unique_ptr<grpc::Server> health_;
  int port_ = 0;
  int health_port_ = 0;
};

// `listen` ("host:port", "unix:/path") with its port replaced by `port` (the one bound when it
// asked for port 0), for log lines: "127.0.0.1:0" and 41234 give "127.0.0.1:41234".
std::string BoundAddress(const std::string& listen, int port);

// Whether `listen` ("host:port" or "unix:/path") can be served on: OK when its port is free (or 0);
// else FAILED_PRECONDITION or INVALID_ARGUMENT, one line naming `flag` and the address ("--listen:
// 127.0.0.1:50051 is already in use ..."). A unix socket in use by a live process counts as taken
// (gRPC would silently replace it).
absl::Status CheckListenAddress(const std::string& flag, const std::string& listen);

// Writes `port` to `path` atomically (temp file, rename).
void WritePort(const std::string& path, int port);

}  // namespace tokenbroker
