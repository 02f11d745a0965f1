#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "lib/upstream/http_client.h"

namespace tokenbroker {

// Egresses (README "Egress"): named proxies an account's own calls leave through. The id is what
// operators, logs, ListAccounts and GetToken see; the proxy URL may carry credentials and is shown
// nowhere.

// An egress id: 1 to 64 characters of [A-Za-z0-9._-].
bool IsValidEgressId(absl::string_view id);
inline constexpr char kEgressIdRule[] = "1 to 64 characters of [A-Za-z0-9._-]";

// Checks a proxy URL: scheme http, https, socks5 or socks5h, a host, an optional port 1-65535,
// optional user[:password]@, no path beyond "/", no whitespace. The message never quotes the URL.
absl::Status ValidateProxyUrl(absl::string_view url);

// Parses an egress file: one egress a line, "<id> <proxy url>"; blank lines and lines starting
// with '#' are skipped. INVALID_ARGUMENT naming `source` (the flag), the line and what is allowed
// for a bad id, a bad URL, a duplicate id, a line without both fields, or more than kMaxEgresses.
// Pure.
inline constexpr size_t kMaxEgresses = 10'000;
absl::StatusOr<std::map<std::string, std::string>> ParseEgressFile(absl::string_view text,
                                                                  absl::string_view source = "--egress_file");

// The egresses of --egress_file, re-read when the file changes. Thread-safe.
class EgressBook {
 public:
  // Reads `path` (empty: no egress file, every account with an egress is refused). The message
  // names the flag.
  static absl::StatusOr<std::unique_ptr<EgressBook>> Open(const std::string& path);

  // Re-reads the file when its size, mtime or inode changed. True when new egresses are in use;
  // an error (the file cannot be read or parsed) keeps the egresses in use: the caller logs it.
  absl::StatusOr<bool> ReloadIfChanged() ABSL_LOCKS_EXCLUDED(mu_);

  // How an account with egress `id` leaves: direct for an empty id; NOT_FOUND "egress <id> is not
  // defined in --egress_file" for an id the file does not name.
  absl::StatusOr<EgressRoute> Route(absl::string_view id) const ABSL_LOCKS_EXCLUDED(mu_);
  // Why an account naming `id` cannot be served, or "" when it can (empty or known id).
  std::string Problem(absl::string_view id) const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<std::string> Ids() const ABSL_LOCKS_EXCLUDED(mu_);
  const std::string& path() const { return path_; }

 private:
  explicit EgressBook(std::string path) : path_(std::move(path)) {}
  std::string Stamp() const;

  const std::string path_;
  std::string stamp_;  // only ReloadIfChanged's caller (the main loop) touches it
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> proxies_ ABSL_GUARDED_BY(mu_);  // id -> proxy URL (secret)
};

}  // namespace tokenbroker
