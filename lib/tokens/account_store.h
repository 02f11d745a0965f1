#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/tokens/account_json.h"  // ParseAccountJson

namespace tokenbroker {

// A file that could not be loaded, and why. Never contains file content.
struct LoadProblem {
  std::string path;
  std::string reason;
};

struct LoadResult {
  std::vector<AccountRecord> accounts;  // sorted by id
  std::vector<LoadProblem> problems;    // sorted by path
  uint64_t fingerprint = 0;             // AccountStore::Fingerprint() of the files as they were read
};

// A change to write back into an account's file. Unset members leave the file as it is.
struct AccountUpdate {
  std::optional<std::string> access_token;
  std::optional<absl::Time> access_expiry;
  std::optional<std::string> refresh_token;  // set when the token endpoint rotated it
  std::optional<std::string> project_id;     // token.project_id, set when onboarding found one
  std::optional<std::string> disabled_reason;  // set: disabled=true with this reason and disabled_at
  absl::Time disabled_at = absl::UnixEpoch();
  bool suspended = false;  // with disabled_reason: Google suspended it ("suspended": true)
  bool enable = false;  // disabled=false, and the reason, time and suspension of a disable removed  // disabled=false, and the reason and time of a disable removed
};

// A directory of account files (`<id>.json`), as Antigravity-Manager keeps in
// ~/.antigravity_tools/accounts. Loading tolerates bad files; writes are atomic (temp file, fsync,
// rename), keep every field they do not touch, use mode 0600 and hold an exclusive lock on
// `<dir>/.tokenbroker.lock` so two processes never interleave a read-modify-write.
// Thread-safe: methods may be called concurrently.
class AccountStore {
 public:
  // Fails with NOT_FOUND / FAILED_PRECONDITION when `dir` does not exist or is not a directory.
  // Removes the temp files of writes a crash interrupted (`<id>.json.tmp.<pid>`: they hold tokens),
  // under the folder's lock so no write in progress is touched.
  static absl::StatusOr<std::unique_ptr<AccountStore>> Open(std::string dir);

  const std::string& dir() const { return dir_; }
  // How many such temp files Open removed (for the start-up log).
  int removed_temp_files() const { return removed_temp_files_; }

  // Reads every `*.json` file (hidden files and temp files are ignored). A malformed, empty or
  // unreadable file becomes a LoadProblem naming its path and the reason; the rest load. Files are
  // read and parsed on up to one thread per core (at most 8).
  LoadResult LoadAll() const;

  // A cheap summary of the directory (names, sizes, modification times of the account files):
  // it changes whenever a file is added, removed or rewritten. For polling for changes.
  uint64_t Fingerprint() const;

  // Applies `update` to `<dir>/<id>.json`. NOT_FOUND if the file is gone; the errno text otherwise
  // (a read-only directory gives PERMISSION_DENIED or FAILED_PRECONDITION).
  absl::Status Update(const std::string& id, const AccountUpdate& update) const;

 private:
  explicit AccountStore(std::string dir) : dir_(std::move(dir)) {}
  int RemoveTempFiles() const;

  std::string dir_;
  int removed_temp_files_ = 0;
};

}  // namespace tokenbroker
