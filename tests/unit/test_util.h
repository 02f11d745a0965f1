#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace tokenbroker::testing {

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
