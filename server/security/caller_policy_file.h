#pragma once

// The caller policy file (--caller_policy_file, issue 16.1): read at start, and again whenever it
// changes, like the tokens files (auth.h).

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "lib/broker/caller_admission.h"
#include "lib/broker/caller_policy.h"

namespace tokenbroker {

// Reads the policy file into a CallerAdmission and keeps it current. Not thread-safe: the main
// loop's (the CallerAdmission it feeds is thread-safe).
class CallerPolicyFile {
 public:
  // Reads `path` now and hands the policies to `admission` (which must outlive this). The message
  // names the flag, the file, the line and the field at fault.
  static absl::StatusOr<std::unique_ptr<CallerPolicyFile>> Open(const std::string& path, CallerAdmission& admission);

  // Reads the file again when it changed (size, mtime or inode). A file that no longer parses (or
  // cannot be read) is logged, and the policies in force stay. Returns whether new ones were taken.
  bool ReloadIfChanged();

 private:
  CallerPolicyFile(std::string path, CallerAdmission& admission) : path_(std::move(path)), admission_(admission) {}
  absl::StatusOr<CallerPolicies> Read() const;
  std::string Stamp() const;

  const std::string path_;
  CallerAdmission& admission_;
  std::string stamp_;
};

}  // namespace tokenbroker
