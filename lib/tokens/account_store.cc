#include "lib/tokens/account_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "lib/upstream/egress.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

absl::Status ErrnoStatus(int err, absl::string_view what) {
  std::string message = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT: return absl::NotFoundError(message);
    case EACCES:
    case EPERM: return absl::PermissionDeniedError(message);
    case EROFS: return absl::FailedPreconditionError(message);
    default: return absl::InternalError(message);
  }
}

absl::Status FieldError(absl::string_view field, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("field '", field, "' must be ", want));
}

// Reads an optional string member; null counts as absent.
absl::Status OptString(const Json& obj, const char* key, absl::string_view path, std::string* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_string()) return FieldError(path, "a string");
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status OptBool(const Json& obj, const char* key, bool* out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return FieldError(key, "true or false");
  *out = it->get<bool>();
  return absl::OkStatus();
}

std::optional<absl::Time> ParseRfc3339(const std::string& text) {
  absl::Time t;
  std::string err;
  if (absl::ParseTime(absl::RFC3339_full, text, &t, &err)) return t;
  return std::nullopt;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, "cannot open");
  std::string data;
  char buf[8192];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return ErrnoStatus(err, "cannot read");
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return data;
}

// Writes `data` to `path` atomically: a temp file in the same folder, fsync, rename, fsync folder.
absl::Status WriteFileAtomic(const std::string& dir, const std::string& path, const std::string& data) {
  std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("cannot create ", tmp));
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return ErrnoStatus(err, absl::StrCat("cannot write ", tmp));
    }
    off += static_cast<size_t>(n);
  }
  if (::fchmod(fd, 0600) != 0 || ::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return ErrnoStatus(err, absl::StrCat("cannot sync ", tmp));
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoStatus(err, absl::StrCat("cannot replace ", path));
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

// An exclusive flock held for the life of the object.
class DirLock {
 public:
  static absl::StatusOr<DirLock> Acquire(const std::string& dir) {
    std::string path = absl::StrCat(dir, "/.tokenbroker.lock");
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return ErrnoStatus(errno, absl::StrCat("cannot open lock file ", path));
    while (::flock(fd, LOCK_EX) != 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return ErrnoStatus(err, absl::StrCat("cannot lock ", path));
    }
    return DirLock(fd);
  }
  DirLock(DirLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  DirLock& operator=(DirLock&&) = delete;
  ~DirLock() {
    if (fd_ >= 0) ::close(fd_);  // closing releases the flock
  }

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace

absl::StatusOr<AccountRecord> ParseAccountJson(const std::string& id, absl::string_view text) {
  if (text.find_first_not_of(" \t\r\n") == absl::string_view::npos) {
    return absl::InvalidArgumentError("file is empty");
  }
  Json doc = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  if (!doc.is_object()) return absl::InvalidArgumentError("top level must be a JSON object");

  AccountRecord rec;
  rec.id = id;
  if (absl::Status s = OptString(doc, "email", "email", &rec.email); !s.ok()) return s;
  if (rec.email.empty()) rec.email = id;

  auto token = doc.find("token");
  if (token == doc.end() || !token->is_object()) return FieldError("token", "an object");
  if (absl::Status s = OptString(*token, "refresh_token", "token.refresh_token", &rec.refresh_token);
      !s.ok()) {
    return s;
  }
  if (rec.refresh_token.empty()) return FieldError("token.refresh_token", "a non-empty string");
  if (absl::Status s = OptString(*token, "access_token", "token.access_token", &rec.access_token);
      !s.ok()) {
    return s;
  }
  if (auto it = token->find("expiry_timestamp"); it != token->end() && !it->is_null()) {
    if (!it->is_number()) return FieldError("token.expiry_timestamp", "a number of Unix seconds");
    rec.access_expiry = absl::FromUnixSeconds(it->get<int64_t>());
  }
  if (rec.access_token.empty()) rec.access_expiry = absl::InfinitePast();
  if (absl::Status s = OptString(*token, "project_id", "token.project_id", &rec.project_id); !s.ok()) {
    return s;
  }

  if (auto quota = doc.find("quota"); quota != doc.end() && !quota->is_null()) {
    if (!quota->is_object()) return FieldError("quota", "an object");
    std::string tier;
    if (absl::Status s = OptString(*quota, "subscription_tier", "quota.subscription_tier", &tier);
        !s.ok()) {
      return s;
    }
    rec.tier = ParseTier(tier);
    absl::Time observed = absl::InfinitePast();
    if (auto lu = quota->find("last_updated"); lu != quota->end() && lu->is_number()) {
      observed = absl::FromUnixSeconds(lu->get<int64_t>());
    }
    if (auto models = quota->find("models"); models != quota->end() && !models->is_null()) {
      if (!models->is_array()) return FieldError("quota.models", "an array");
      for (const Json& m : *models) {
        if (!m.is_object()) return FieldError("quota.models[]", "objects");
        ModelQuota q;
        if (absl::Status s = OptString(m, "name", "quota.models[].name", &q.model); !s.ok()) return s;
        if (q.model.empty()) continue;
        if (auto p = m.find("percentage"); p != m.end() && p->is_number()) {
          q.remaining_fraction = std::clamp(p->get<double>() / 100.0, 0.0, 1.0);
        }
        std::string reset;
        if (absl::Status s = OptString(m, "reset_time", "quota.models[].reset_time", &reset); !s.ok()) {
          return s;
        }
        if (!reset.empty()) q.reset_time = ParseRfc3339(reset);
        q.observed = observed;
        rec.quotas.push_back(std::move(q));
      }
    }
  }
  if (absl::Status s = OptBool(doc, "disabled", &rec.disabled); !s.ok()) return s;
  if (absl::Status s = OptString(doc, "disabled_reason", "disabled_reason", &rec.disabled_reason);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = OptBool(doc, "proxy_disabled", &rec.proxy_disabled); !s.ok()) return s;
  if (absl::Status s = OptString(doc, "egress", "egress", &rec.egress_id); !s.ok()) return s;
  if (!rec.egress_id.empty() && !IsValidEgressId(rec.egress_id)) {
    return FieldError("egress", absl::StrCat("an egress id of --egress_file: ", kEgressIdRule));
  }
  if (auto pm = doc.find("protected_models"); pm != doc.end() && !pm->is_null()) {
    if (!pm->is_array()) return FieldError("protected_models", "an array of strings");
    for (const Json& m : *pm) {
      if (!m.is_string()) return FieldError("protected_models", "an array of strings");
      rec.protected_models.push_back(m.get<std::string>());
    }
  }
  return rec;
}

absl::StatusOr<std::unique_ptr<AccountStore>> AccountStore::Open(std::string dir) {
  std::error_code ec;
  fs::file_status st = fs::status(dir, ec);
  if (ec || !fs::exists(st)) {
    return absl::NotFoundError(absl::StrCat("accounts directory ", dir, " does not exist"));
  }
  if (!fs::is_directory(st)) {
    return absl::FailedPreconditionError(absl::StrCat("accounts directory ", dir, " is not a directory"));
  }
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  auto store = std::unique_ptr<AccountStore>(new AccountStore(std::move(dir)));
  store->removed_temp_files_ = store->RemoveTempFiles();
  return store;
}

namespace {

bool IsTempFileName(absl::string_view name) {
  // "<id>.json.tmp.<pid>", as WriteFileAtomic names them.
  size_t at = name.rfind(".json.tmp.");
  if (at == absl::string_view::npos || at == 0) return false;
  absl::string_view pid = name.substr(at + 10);
  return !pid.empty() && pid.find_first_not_of("0123456789") == absl::string_view::npos;
}

}  // namespace

int AccountStore::RemoveTempFiles() const {
  // Under the folder's lock no write is half done: every temp file there is left by a process
  // that died mid-write, and holds tokens.
  absl::StatusOr<DirLock> lock = DirLock::Acquire(dir_);
  if (!lock.ok()) return 0;  // a read-only folder: nothing could have been left by us
  int removed = 0;
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (IsTempFileName(name) && ::unlink(entry.path().c_str()) == 0) ++removed;
  }
  return removed;
}

LoadResult AccountStore::LoadAll() const {
  LoadResult result;
  std::error_code ec;
  fs::directory_iterator it(dir_, ec);
  if (ec) {
    result.problems.push_back({dir_, absl::StrCat("cannot list directory: ", ec.message())});
    return result;
  }
  for (const fs::directory_entry& entry : it) {
    std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.' || !absl::EndsWith(name, ".json")) continue;
    std::string path = entry.path().string();
    absl::StatusOr<std::string> text = ReadFile(path);
    if (!text.ok()) {
      result.problems.push_back({path, std::string(text.status().message())});
      continue;
    }
    std::string id = name.substr(0, name.size() - 5);
    absl::StatusOr<AccountRecord> rec = ParseAccountJson(id, *text);
    if (!rec.ok()) {
      result.problems.push_back({path, std::string(rec.status().message())});
      continue;
    }
    result.accounts.push_back(*std::move(rec));
  }
  std::sort(result.accounts.begin(), result.accounts.end(),
            [](const AccountRecord& a, const AccountRecord& b) { return a.id < b.id; });
  std::sort(result.problems.begin(), result.problems.end(),
            [](const LoadProblem& a, const LoadProblem& b) { return a.path < b.path; });
  return result;
}

uint64_t AccountStore::Fingerprint() const {
  uint64_t sum = 0;
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir_, ec)) {
    std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.' || !absl::EndsWith(name, ".json")) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) != 0) continue;
    uint64_t h = std::hash<std::string>{}(name);
    h ^= static_cast<uint64_t>(st.st_size) * 0x9e3779b97f4a7c15ULL;
    h ^= (static_cast<uint64_t>(st.st_mtim.tv_sec) * 1'000'000'000ULL + st.st_mtim.tv_nsec) * 0xc2b2ae3d27d4eb4fULL;
    sum += h * 0x165667b19e3779f9ULL + (h >> 29);
  }
  return sum;
}

absl::Status AccountStore::Update(const std::string& id, const AccountUpdate& update) const {
  absl::StatusOr<DirLock> lock = DirLock::Acquire(dir_);
  if (!lock.ok()) return lock.status();
  std::string path = absl::StrCat(dir_, "/", id, ".json");
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  Json doc = Json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::FailedPreconditionError(absl::StrCat(path, " is no longer a valid account file"));
  }
  Json& token = doc["token"];
  if (!token.is_object()) token = Json::object();
  if (update.access_token) token["access_token"] = *update.access_token;
  if (update.access_expiry) {
    token["expiry_timestamp"] = absl::ToUnixSeconds(*update.access_expiry);
  }
  if (update.refresh_token) token["refresh_token"] = *update.refresh_token;
  if (update.disabled_reason) {
    doc["disabled"] = true;
    doc["disabled_reason"] = *update.disabled_reason;
    doc["disabled_at"] = absl::ToUnixSeconds(update.disabled_at);
  } else if (update.enable) {
    doc["disabled"] = false;
    doc["disabled_reason"] = nullptr;  // as Antigravity-Manager writes an enabled account
    doc.erase("disabled_at");
  }
  return WriteFileAtomic(dir_, path, doc.dump(2) + "\n");
}

}  // namespace tokenbroker
