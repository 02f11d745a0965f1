#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/quota/quota.h"

namespace tokenbroker::testing {

// Polls `cond` until it holds or a generous deadline passes; no fixed sleeps.
template <typename F>
bool Eventually(F cond, absl::Duration deadline = absl::Seconds(15)) {
  const absl::Time end = absl::Now() + deadline;
  while (absl::Now() < end) {
    if (cond()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return cond();
}

// An account record with id, email "<id>@example.com", refresh token "rt-<id>" and `tier`.
inline AccountRecord MakeAccount(const std::string& id, Tier tier = Tier::kUnknown) {
  AccountRecord r;
  r.id = id;
  r.email = id + "@example.com";
  r.refresh_token = "rt-" + id;
  r.tier = tier;
  return r;
}

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/tokenbroker-test-XXXXXX";
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::permissions(path_, std::filesystem::perms::owner_all, ec);
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string Join(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// One bucket of retrieveUserQuotaSummary as the monitor streams it.
inline QuotaObservation BucketObservation(const std::string& account, const std::string& group,
                                          const std::string& bucket, double fraction, absl::Time observed,
                                          absl::Time reset) {
  QuotaObservation o;
  o.account_id = account;
  o.family = group;
  o.bucket = bucket;
  o.remaining_fraction = fraction;
  o.observed = observed;
  o.reset_time = reset;
  o.source = QuotaSource::kQuotaSummary;
  return o;
}

inline void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// An account file body in Antigravity-Manager's format.
inline std::string AccountJson(const std::string& email, const std::string& refresh_token,
                               const std::string& tier, const std::string& extra = "") {
  return "{\"email\":\"" + email + "\",\"token\":{\"access_token\":\"\",\"refresh_token\":\"" +
         refresh_token + "\",\"expiry_timestamp\":0,\"project_id\":\"proj-" + email +
         "\"},\"quota\":{\"subscription_tier\":\"" + tier + "\",\"models\":[]}" + extra + "}";
}

}  // namespace tokenbroker::testing
