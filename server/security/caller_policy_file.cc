#include "server/security/caller_policy_file.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr char kFlag[] = "--caller_policy_file";

}  // namespace

absl::StatusOr<std::unique_ptr<CallerPolicyFile>> CallerPolicyFile::Open(const std::string& path,
                                                                         CallerAdmission& admission) {
  std::unique_ptr<CallerPolicyFile> file(new CallerPolicyFile(path, admission));
  file->stamp_ = file->Stamp();
  absl::StatusOr<CallerPolicies> policies = file->Read();
  if (!policies.ok()) return policies.status();
  spdlog::info("caller policies from {}: {} entries", path, policies->entries().size());
  admission.SetPolicies(std::make_shared<const CallerPolicies>(*std::move(policies)));
  return file;
}

absl::StatusOr<CallerPolicies> CallerPolicyFile::Read() const {
  std::ifstream in(path_, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(kFlag, ": cannot read ", path_));
  // Read at most one byte past the limit: the parser refuses anything larger.
  std::string text(CallerPolicies::kMaxFileBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  return ParseCallerPolicies(text, absl::StrCat(kFlag, " ", path_));
}

std::string CallerPolicyFile::Stamp() const {
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) return "-";
  return absl::StrCat(st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec, ":", st.st_ino);
}

bool CallerPolicyFile::ReloadIfChanged() {
  std::string stamp = Stamp();
  if (stamp == stamp_) return false;
  stamp_ = std::move(stamp);
  absl::StatusOr<CallerPolicies> policies = Read();
  if (!policies.ok()) {
    spdlog::error("caller policy file changed but cannot be used ({}); the policies in force stay",
                  std::string(policies.status().message()));
    return false;
  }
  spdlog::info("caller policies reloaded from {}: {} entries", path_, policies->entries().size());
  admission_.SetPolicies(std::make_shared<const CallerPolicies>(*std::move(policies)));
  return true;
}

}  // namespace tokenbroker
