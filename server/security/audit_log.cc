#include "server/security/audit_log.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "lib/common/errors.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {
namespace {

std::string AuditTime(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone()); }

constexpr size_t kMinKeyBytes = 16;

}  // namespace

SessionTagger::SessionTagger() {
  key_.resize(32);
  size_t got = 0;
  while (got < key_.size()) {
    ssize_t r = ::getrandom(key_.data() + got, key_.size() - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) std::abort();  // no randomness on this system: nothing sane to do
    got += static_cast<size_t>(r);
  }
}

absl::StatusOr<SessionTagger> SessionTagger::FromEnvironment() {
  std::string key;
  if (const char* env = std::getenv("TOKENBROKER_AUDIT_KEY"); env != nullptr && *env != '\0') {
    key = env;
  } else if (const char* file = std::getenv("TOKENBROKER_AUDIT_KEY_FILE"); file != nullptr && *file != '\0') {
    std::ifstream in(file, std::ios::binary);
    if (!in) return InvalidFieldError("TOKENBROKER_AUDIT_KEY_FILE", absl::StrCat("cannot read ", file));
    std::stringstream ss;
    ss << in.rdbuf();
    key = std::string(absl::StripTrailingAsciiWhitespace(ss.str()));
  } else {
    return SessionTagger();
  }
  if (key.size() < kMinKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat("the audit session key must be at least ", kMinKeyBytes,
                                                   " bytes (TOKENBROKER_AUDIT_KEY or TOKENBROKER_AUDIT_KEY_FILE)"));
  }
  SessionTagger tagger(std::move(key));
  tagger.stable_ = true;
  return tagger;
}

std::string SessionTagger::Tag(absl::string_view session_id) const {
  if (session_id.empty()) return "-";
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key_.data(), static_cast<int>(key_.size()), reinterpret_cast<const unsigned char*>(session_id.data()),
       session_id.size(), mac, &len);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(mac), 8));
}

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const std::string& path) {
  absl::StatusOr<SessionTagger> tagger = SessionTagger::FromEnvironment();
  if (!tagger.ok()) return tagger.status();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return InvalidFieldError("--audit_log", absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  // An existing file keeps its mode on open: an audit log others could read tells them who used
  // which account when.
  if (::fchmod(fd, 0600) != 0) {
    const int err = errno;
    ::close(fd);
    return InvalidFieldError("--audit_log", absl::StrCat("cannot make ", path, " private (mode 0600): ", std::strerror(err)));
  }
  std::FILE* file = ::fdopen(fd, "a");
  if (file == nullptr) {
    ::close(fd);
    return InvalidFieldError("--audit_log", absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  return std::unique_ptr<AuditLog>(new AuditLog(file, *std::move(tagger)));
}

AuditLog::AuditLog(std::FILE* file, SessionTagger tagger) : tagger_(std::move(tagger)), file_(file) {
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

void AuditLog::Append(std::string text) {
  text.push_back('\n');
  absl::MutexLock lock(&mu_);
  std::fwrite(text.data(), 1, text.size(), file_);
}

void AuditLog::Issued(const AuditRecord& r, absl::Time when) {
  nlohmann::json line = {{"time", AuditTime(when)},
                         {"event", "token_issued"},
                         {"caller", r.caller},
                         {"account_id", r.account_id},
                         {"model", r.model},
                         {"session", r.session_tag},
                         {"lease_id", r.lease_id},
                         {"tier", r.tier}};
  Append(line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

void AuditLog::Reported(const ReportAudit& r, absl::Time when) {
  nlohmann::json line = {{"time", AuditTime(when)},
                         {"event", "outcome_reported"},
                         {"caller", r.caller},
                         {"lease_id", r.lease_id},
                         {"account_id", r.account_id},
                         {"model", r.model},
                         {"http_status", r.http_status},
                         {"result", r.result}};
  if (!r.scope.empty()) line["scope"] = r.scope;
  if (r.until) line["until"] = AuditTime(*r.until);
  if (!r.detail.empty()) line["detail"] = r.detail;
  Append(line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

void AuditLog::Admin(const AdminAudit& r, absl::Time when) {
  nlohmann::json line = {{"time", AuditTime(when)}, {"event", r.action},     {"caller", r.caller},
                         {"account_id", r.account_id}, {"model", r.model}, {"result", r.result}};
  Append(line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

void AuditLog::FlushLoop() {
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(1));
    std::fflush(file_);
  }
}

}  // namespace tokenbroker
