#include "server/audit_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "lib/errors.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return InvalidFieldError("--audit_log", absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  std::FILE* file = ::fdopen(fd, "a");
  if (file == nullptr) {
    ::close(fd);
    return InvalidFieldError("--audit_log", absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  return std::unique_ptr<AuditLog>(new AuditLog(file));
}

AuditLog::AuditLog(std::FILE* file) : file_(file) {
  flusher_ = std::thread([this] { FlushLoop(); });
}

AuditLog::~AuditLog() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  flusher_.join();
  absl::MutexLock lock(&mu_);
  std::fclose(file_);
  file_ = nullptr;
}

void AuditLog::Issued(const AuditRecord& r, absl::Time when) {
  nlohmann::json line = {{"time", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", when, absl::UTCTimeZone())},
                         {"event", "token_issued"},
                         {"caller", r.caller},
                         {"account_id", r.account_id},
                         {"model", r.model},
                         {"session", r.session_tag},
                         {"lease_id", r.lease_id},
                         {"tier", r.tier}};
  std::string text = line.dump();
  text.push_back('\n');
  absl::MutexLock lock(&mu_);
  std::fwrite(text.data(), 1, text.size(), file_);
}

void AuditLog::FlushLoop() {
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(1));
    std::fflush(file_);
  }
}

}  // namespace tokenbroker
