#pragma once

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Short tags of session ids for logs and the audit log: HMAC-SHA256 under a secret key, truncated
// to 16 hex digits, so a tag can be matched against other tags but never turned back into the
// session id, nor computed by anyone without the key. Thread-safe (immutable).
class SessionTagger {
 public:
  // A tagger with a fresh random key: tags are stable for this process only.
  SessionTagger();
  explicit SessionTagger(std::string key) : key_(std::move(key)) {}
  // The key from $TOKENBROKER_AUDIT_KEY, or the file named by $TOKENBROKER_AUDIT_KEY_FILE (at
  // least 16 bytes either way), so tags stay comparable across restarts and replicas; a random one
  // when neither is set. INVALID_ARGUMENT for a key that is too short or a file that cannot be read
  // (the message never contains the key).
  static absl::StatusOr<SessionTagger> FromEnvironment();
  // "-" for no session.
  std::string Tag(absl::string_view session_id) const;
  // Whether the key came from the environment (tags survive a restart).
  bool stable() const { return stable_; }

 private:
  std::string key_;  // secret
  bool stable_ = false;
};

// One issuance, as the audit log records it. No secret: the session id is tagged, the token is
// never given.
struct AuditRecord {
  std::string caller;
  std::string account_id;
  std::string model;
  std::string session_tag;  // SessionTagger::Tag of the session id, "-" without one
  std::string lease_id;
  std::string tier;
};

// One ReportOutcome call, accepted or refused. Fields are SafeText (they may come from callers).
struct ReportAudit {
  std::string caller;
  std::string lease_id;
  std::string account_id;
  std::string model;
  int http_status = 0;
  // "model_cooldown", "account_cooldown", "no_cooldown", or why it was refused
  // ("permission_denied", "not_found", "invalid_argument", ...).
  std::string result;
  std::string scope;                // "model", "account" or empty
  std::optional<absl::Time> until;  // end of the resulting cooldown
  std::string detail;               // the reason returned to the caller
};

// An operator's action (e.g. ResetAccount).
struct AdminAudit {
  std::string caller;
  std::string action;
  std::string account_id;
  std::string model;
  std::string result;
};

// Appends one JSON object a line (docs/ARCHITECTURE.md §8): per issued token (time, caller, account, model,
// tagged session, lease, tier), per report (caller, lease, account, model, status, resulting
// cooldown or refusal) and per operator action. Buffered, flushed every second and on close, so
// a call pays a memory copy, not a write. Thread-safe.
class AuditLog {
 public:
  // Opens `path` for appending (created 0600; an existing file is made 0600), with session tags
  // keyed by SessionTagger::FromEnvironment. The message names the flag or variable at fault.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const std::string& path);
  ~AuditLog();  // flushes and closes

  // The tag the audit log records for a session id.
  std::string SessionTag(absl::string_view session_id) const { return tagger_.Tag(session_id); }

  void Issued(const AuditRecord& record, absl::Time when) ABSL_LOCKS_EXCLUDED(mu_);
  void Reported(const ReportAudit& record, absl::Time when) ABSL_LOCKS_EXCLUDED(mu_);
  void Admin(const AdminAudit& record, absl::Time when) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  AuditLog(std::FILE* file, SessionTagger tagger);
  void FlushLoop() ABSL_LOCKS_EXCLUDED(mu_);
  void Append(std::string line) ABSL_LOCKS_EXCLUDED(mu_);

  const SessionTagger tagger_;
  absl::Mutex mu_;
  std::FILE* file_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread flusher_;
};

}  // namespace tokenbroker
