#pragma once

#include <cstdio>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tokenbroker {

// One issuance, as the audit log records it. No secret: the session id is hashed, the token is
// never given.
struct AuditRecord {
  std::string caller;
  std::string account_id;
  std::string model;
  std::string session_tag;  // a hash of the session id, "-" without one
  std::string lease_id;
  std::string tier;
};

// Appends one JSON object a line per issued token (DESIGN §8): time, caller, account, model,
// hashed session, lease, tier. Buffered, flushed every second and on close, so a GetToken pays a
// memory copy, not a write. Thread-safe.
class AuditLog {
 public:
  // Opens `path` for appending (created 0600). The message names the flag.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const std::string& path);
  ~AuditLog();  // flushes and closes

  void Issued(const AuditRecord& record, absl::Time when);

 private:
  explicit AuditLog(std::FILE* file);
  void FlushLoop();

  absl::Mutex mu_;
  std::FILE* file_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread flusher_;
};

}  // namespace tokenbroker
