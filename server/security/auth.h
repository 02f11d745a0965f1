#pragma once

// Who may call what (DESIGN §8): optional bearer tokens for callers, an optional admin token for
// the admin RPCs, compared in constant time; and TLS (optionally mutual) for the API port.

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace tokenbroker {

// Equal contents, in a time that depends only on the lengths.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

struct AuthConfig {
  // (name, token): the name is what logs and the audit log show for the caller.
  std::vector<std::pair<std::string, std::string>> callers;
  std::string admin_token;  // secret
};

// Reads `callers_file` (one caller a line: "<name> <token>"; blank lines and # comments skipped)
// and `admin_file` (the token alone); either path may be empty (off). The message names the flag
// and the line at fault; it never contains a token.
absl::StatusOr<AuthConfig> LoadAuthConfig(const std::string& callers_file, absl::string_view callers_flag,
                                          const std::string& admin_file, absl::string_view admin_flag);

// Checks the "authorization: Bearer <token>" of a call. Caller RPCs (GetToken, ReportOutcome) need
// a caller token (or the admin token) when caller tokens are configured; admin RPCs
// (SetQuotaManager, ListAccounts, ExplainSelection) need the admin token when one is configured,
// else a caller token when those are. Everything is open when neither is configured.
// Thread-safe.
class Authenticator {
 public:
  explicit Authenticator(AuthConfig config) : config_(std::move(config)) {}
  // Reads the files now and remembers them for ReloadIfChanged. The message names the flag.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Open(const std::string& callers_file,
                                                             const std::string& admin_file);

  bool enabled() const ABSL_LOCKS_EXCLUDED(mu_);
  // The caller's name ("admin" for the admin token, "-" when nothing is configured), or
  // UNAUTHENTICATED (no or an unknown token) / PERMISSION_DENIED (a caller token on an admin RPC).
  absl::StatusOr<std::string> Check(const grpc::ServerContextBase& context, bool admin) const
      ABSL_LOCKS_EXCLUDED(mu_);
  // As Check, for a bearer token that came another way (the status page's HTTP request); empty:
  // none was given.
  absl::StatusOr<std::string> CheckToken(absl::string_view token, bool admin) const ABSL_LOCKS_EXCLUDED(mu_);
  // Reads the files again when they changed (a rotated Secret), so tokens rotate without a
  // restart. A file that no longer parses is logged and the tokens in use are kept. Returns
  // whether new tokens were taken.
  bool ReloadIfChanged() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  std::string Stamp() const;  // size and mtime of the files: what ReloadIfChanged compares

  std::string callers_file_, admin_file_;
  std::string stamp_;  // only ReloadIfChanged's caller (the main loop) touches it
  mutable absl::Mutex mu_;
  AuthConfig config_ ABSL_GUARDED_BY(mu_);
};

// The subject common name of the client certificate the peer presented and the server verified
// (mutual TLS), when it is usable as a caller name (1 to 128 printable characters without space or
// '='; not "admin" nor "-"); unset otherwise. Call on the RPC's own thread.
std::optional<std::string> ClientCertificateName(const grpc::ServerContextBase& context);

// Server credentials for the API port: TLS when `cert_file` is set (with `key_file`), requiring and
// verifying client certificates when `client_ca_file` is set; plaintext otherwise. The message
// names the flag at fault.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ApiCredentials(const std::string& cert_file,
                                                                        const std::string& key_file,
                                                                        const std::string& client_ca_file);

}  // namespace tokenbroker
