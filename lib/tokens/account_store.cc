#include "lib/tokens/account_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

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

namespace {

// One file's term of the folder's fingerprint (a sum, so files may be visited in any order).
uint64_t FingerprintTerm(const std::string& name, const struct stat& st) {
  uint64_t h = std::hash<std::string>{}(name);
  h ^= static_cast<uint64_t>(st.st_size) * 0x9e3779b97f4a7c15ULL;
  h ^= (static_cast<uint64_t>(st.st_mtim.tv_sec) * 1'000'000'000ULL + st.st_mtim.tv_nsec) * 0xc2b2ae3d27d4eb4fULL;
  return h * 0x165667b19e3779f9ULL + (h >> 29);
}

bool IsAccountFileName(absl::string_view name) {
  return !name.empty() && name[0] != '.' && absl::EndsWith(name, ".json");
}

// The account file names in `dir`, or the errno of listing it.
absl::StatusOr<std::vector<std::string>> AccountFileNames(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return absl::InternalError(std::strerror(errno));
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) {
    if (IsAccountFileName(e->d_name)) names.emplace_back(e->d_name);
  }
  ::closedir(d);
  return names;
}

// One file read for LoadAll: its text's length in the caller's buffer, or why it could not be read;
// and its stat (for the fingerprint) when it exists.
struct FileRead {
  absl::StatusOr<size_t> length;
  std::optional<struct stat> st;
};

// Reads `name` in the folder `dir_fd` into `buf`, followed by AccountJsonParser::kPadding spare
// bytes. (Relative to the folder: the kernel walks one path component per file, not all of them.)
FileRead ReadPadded(int dir_fd, const std::string& name, std::string& buf) {
  FileRead out{.length = 0, .st = std::nullopt};
  struct stat st {};
  int fd = ::openat(dir_fd, name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (::fstatat(dir_fd, name.c_str(), &st, 0) == 0) out.st = st;  // unreadable, yet part of the fingerprint
    out.length = ErrnoStatus(err, "cannot open");
    return out;
  }
  if (::fstat(fd, &st) == 0) out.st = st;
  const size_t stat_size = out.st && st.st_size > 0 ? static_cast<size_t>(st.st_size) : 0;
  buf.resize(std::max<size_t>(stat_size + 1, 4096) + AccountJsonParser::kPadding);
  size_t len = 0;
  while (true) {
    if (buf.size() - len <= AccountJsonParser::kPadding) buf.resize(buf.size() * 2);
    ssize_t n = ::read(fd, buf.data() + len, buf.size() - AccountJsonParser::kPadding - len);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      out.length = ErrnoStatus(err, "cannot read");
      return out;
    }
    if (n == 0) break;
    len += static_cast<size_t>(n);
    // The whole file as stat saw it: no read for the end (a syscall per file). A file growing now
    // is read again at the next reload: its fingerprint will have changed.
    if (stat_size > 0 && len == stat_size) break;
  }
  ::close(fd);
  out.length = len;
  return out;
}

// Threads for parsing a folder: the cores this process may run on, at most 8.
int LoadThreads(size_t files) {
  cpu_set_t set;
  int cores = ::sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  constexpr size_t kFilesPerThread = 256;  // below that a thread costs more than it saves
  return static_cast<int>(std::clamp<size_t>(files / kFilesPerThread, 1, std::clamp(cores, 1, 8)));
}

}  // namespace

LoadResult AccountStore::LoadAll() const {
  LoadResult result;
  absl::StatusOr<std::vector<std::string>> listed = AccountFileNames(dir_);
  if (!listed.ok()) {
    result.problems.push_back({dir_, absl::StrCat("cannot list directory: ", listed.status().message())});
    return result;
  }
  std::vector<std::string>& names = *listed;
  const int dir_fd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    result.problems.push_back({dir_, absl::StrCat("cannot list directory: ", std::strerror(errno))});
    return result;
  }
  // In id order ("<id>.json"), so the records come out sorted as they are parsed.
  std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) {
    return absl::string_view(a).substr(0, a.size() - 5) < absl::string_view(b).substr(0, b.size() - 5);
  });
  // Each file parses into its own slot, on several threads; then the slots are gathered in order.
  std::vector<absl::StatusOr<AccountRecord>> parsed(names.size(), absl::UnknownError(""));
  std::vector<uint64_t> terms(names.size(), 0);
  std::atomic<size_t> next{0};
  auto work = [&] {
    AccountJsonParser parser;
    std::string buf;
    constexpr size_t kBatch = 32;
    for (size_t begin; (begin = next.fetch_add(kBatch)) < names.size();) {
      for (size_t i = begin; i < std::min(begin + kBatch, names.size()); ++i) {
        const std::string& name = names[i];
        FileRead read = ReadPadded(dir_fd, name, buf);
        if (read.st) terms[i] = FingerprintTerm(name, *read.st);
        if (!read.length.ok()) {
          parsed[i] = read.length.status();
          continue;
        }
        parsed[i] = parser.ParsePadded(name.substr(0, name.size() - 5), absl::string_view(buf.data(), *read.length));
      }
    }
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < LoadThreads(names.size()); ++t) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  ::close(dir_fd);

  result.accounts.reserve(names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    result.fingerprint += terms[i];
    if (parsed[i].ok()) {
      result.accounts.push_back(*std::move(parsed[i]));
    } else {
      result.problems.push_back({absl::StrCat(dir_, "/", names[i]), std::string(parsed[i].status().message())});
    }
  }
  std::sort(result.problems.begin(), result.problems.end(),
            [](const LoadProblem& a, const LoadProblem& b) { return a.path < b.path; });
  return result;
}

uint64_t AccountStore::Fingerprint() const {
  absl::StatusOr<std::vector<std::string>> names = AccountFileNames(dir_);
  if (!names.ok()) return 0;
  uint64_t sum = 0;
  for (const std::string& name : *names) {
    struct stat st {};
    if (::stat(absl::StrCat(dir_, "/", name).c_str(), &st) != 0) continue;
    sum += FingerprintTerm(name, st);
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
  if (update.project_id) token["project_id"] = *update.project_id;
  if (update.disabled_reason) {
    doc["disabled"] = true;
    doc["disabled_reason"] = *update.disabled_reason;
    doc["disabled_at"] = absl::ToUnixSeconds(update.disabled_at);
    if (update.suspended) doc["suspended"] = true;
  } else if (update.enable) {
    doc["disabled"] = false;
    doc["disabled_reason"] = nullptr;  // as Antigravity-Manager writes an enabled account
    doc.erase("disabled_at");
    doc.erase("suspended");
  }
  return WriteFileAtomic(dir_, path, doc.dump(2) + "\n");
}

}  // namespace tokenbroker
