#pragma once

// What the broker and the monitor binaries share: the flags both take, loading and watching the
// account folder, the gRPC server set-up, and the signal wait.

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"
#include "lib/upstream/oauth_client.h"
#include "lib/tokens/token_manager.h"

ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, health_listen);
ABSL_DECLARE_FLAG(std::string, port_file);
ABSL_DECLARE_FLAG(std::string, accounts_dir);
ABSL_DECLARE_FLAG(std::string, oauth_token_url);
ABSL_DECLARE_FLAG(std::string, oauth_client_id);
ABSL_DECLARE_FLAG(std::string, oauth_client_secret);
ABSL_DECLARE_FLAG(std::string, cloudcode_base_url);
ABSL_DECLARE_FLAG(absl::Duration, min_token_ttl);
ABSL_DECLARE_FLAG(absl::Duration, refresh_ahead);
ABSL_DECLARE_FLAG(absl::Duration, refresh_scan_interval);
ABSL_DECLARE_FLAG(int, refresh_workers);
ABSL_DECLARE_FLAG(absl::Duration, reload_interval);
ABSL_DECLARE_FLAG(absl::Duration, drain_timeout);
ABSL_DECLARE_FLAG(std::string, log_format);
ABSL_DECLARE_FLAG(std::string, log_level);

namespace tokenbroker {

// Prints "<program>: <message>" to stderr and returns exit status 2 (bad configuration).
int FailStartup(const std::string& program, const std::string& message);

// Checks the shared flags and sets up logging. The message names the flag.
absl::Status CheckCommonFlags();

// Checks that the addresses of --listen, --health_listen and `metrics_listen` (each may be empty:
// off) can be served on (CheckListenAddress), so that a taken port is one line before anything
// starts or logs. Servers::Start checks again (the port may be taken meanwhile).
absl::Status CheckListenFlags(const std::string& metrics_listen);

// OAuth and token-manager options from the shared flags (client id/secret fall back to
// $TOKENBROKER_OAUTH_CLIENT_ID / $TOKENBROKER_OAUTH_CLIENT_SECRET).
OAuthOptions OAuthOptionsFromFlags();
TokenManagerOptions TokenManagerOptionsFromFlags();
// --cloudcode_base_url, comma-separated, tried in order.
std::vector<std::string> CloudCodeBaseUrls();

// Loads the account folder into the pool, and again whenever it changes. Logs each bad file once
// until it is fixed. Not thread-safe (one caller: the main loop).
class AccountLoader {
 public:
  AccountLoader(const AccountStore& store, AccountPool& pool) : store_(store), pool_(pool) {}
  void Load();
  // Reloads when the folder's fingerprint changed; returns whether it did.
  bool ReloadIfChanged();

 private:
  const AccountStore& store_;
  AccountPool& pool_;
  uint64_t fingerprint_ = 0;
  bool loaded_once_ = false;
  std::set<std::string> reported_;
};

// The API server on --listen (reflection and health included, never sharing a port: SO_REUSEPORT
// off) and, with --health_listen, a second server with only grpc.health.v1 on a plaintext port for
// kubelet probes while the API listens on a unix socket.
class Servers {
 public:
  // `interceptors` (may be empty) see every API call. The message names the flag at fault.
  // `credentials` secure the API port (default plaintext); the health port is always plaintext.
  static absl::StatusOr<Servers> Start(
      const std::vector<grpc::Service*>& services,
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

// Writes --port_file (atomically), if set. Call once health says what it should.
void WritePortFile(int port);
// Writes `port` to `path` atomically (temp file, rename).
void WritePort(const std::string& path, int port);

// Blocks SIGTERM and SIGINT for the process; call before starting any thread.
void BlockStopSignals();
// Waits up to `timeout` for SIGTERM or SIGINT; returns its name, or "" on timeout.
std::string WaitForStopSignal(absl::Duration timeout);

}  // namespace tokenbroker
