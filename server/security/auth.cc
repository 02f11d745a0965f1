#include "server/security/auth.h"

#include <grpcpp/security/server_credentials.h>

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "lib/common/errors.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidFieldError(std::string(flag), absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Tokens are opaque printable text; at least 16 characters so a guess is hopeless.
bool PlausibleToken(absl::string_view token) {
  if (token.size() < 16 || token.size() > 4096) return false;
  for (char c : token) {
    if (c <= ' ' || c > '~') return false;
  }
  return true;
}

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Walks the longer of the two, so only the lengths show in the time taken.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

absl::StatusOr<AuthConfig> LoadAuthConfig(const std::string& callers_file, absl::string_view callers_flag,
                                          const std::string& admin_file, absl::string_view admin_flag) {
  AuthConfig out;
  if (!callers_file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(callers_file, callers_flag);
    if (!text.ok()) return text.status();
    int line_no = 0;
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      ++line_no;
      line = absl::StripAsciiWhitespace(line);
      if (line.empty() || line[0] == '#') continue;
      std::vector<absl::string_view> parts = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
      if (parts.size() != 2) {
        return InvalidFieldError(std::string(callers_flag),
                                 absl::StrCat(callers_file, " line ", line_no, ": want \"<name> <token>\""));
      }
      if (!PlausibleToken(parts[1])) {
        return InvalidFieldError(std::string(callers_flag),
                                 absl::StrCat(callers_file, " line ", line_no,
                                              ": the token must be 16 to 4096 printable characters"));
      }
      for (const auto& [name, token] : out.callers) {
        if (name == parts[0]) {
          return InvalidFieldError(std::string(callers_flag),
                                   absl::StrCat(callers_file, " line ", line_no, ": caller ", name, " appears twice"));
        }
      }
      out.callers.emplace_back(std::string(parts[0]), std::string(parts[1]));
    }
    if (out.callers.empty()) {
      return InvalidFieldError(std::string(callers_flag), absl::StrCat(callers_file, " names no caller"));
    }
  }
  if (!admin_file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(admin_file, admin_flag);
    if (!text.ok()) return text.status();
    out.admin_token = std::string(absl::StripAsciiWhitespace(*text));
    if (!PlausibleToken(out.admin_token)) {
      return InvalidFieldError(std::string(admin_flag),
                               absl::StrCat(admin_file, ": the token must be 16 to 4096 printable characters"));
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Open(const std::string& callers_file,
                                                                   const std::string& admin_file) {
  absl::StatusOr<AuthConfig> config =
      LoadAuthConfig(callers_file, "--caller_tokens_file", admin_file, "--admin_token_file");
  if (!config.ok()) return config.status();
  auto auth = std::make_unique<Authenticator>(*std::move(config));
  auth->callers_file_ = callers_file;
  auth->admin_file_ = admin_file;
  auth->stamp_ = auth->Stamp();
  return auth;
}

std::string Authenticator::Stamp() const {
  std::string out;
  for (const std::string* path : {&callers_file_, &admin_file_}) {
    struct stat st {};
    if (!path->empty() && ::stat(path->c_str(), &st) == 0) {
      absl::StrAppend(&out, st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec, ":", st.st_ino, ";");
    } else {
      out += "-;";
    }
  }
  return out;
}

bool Authenticator::ReloadIfChanged() {
  if (callers_file_.empty() && admin_file_.empty()) return false;
  std::string stamp = Stamp();
  if (stamp == stamp_) return false;
  stamp_ = std::move(stamp);
  absl::StatusOr<AuthConfig> config =
      LoadAuthConfig(callers_file_, "--caller_tokens_file", admin_file_, "--admin_token_file");
  if (!config.ok()) {
    spdlog::error("token files changed but cannot be used ({}); the tokens in use stay", std::string(config.status().message()));
    return false;
  }
  absl::MutexLock lock(&mu_);
  config_ = *std::move(config);
  spdlog::info("token files reloaded: {} callers{}", config_.callers.size(),
               config_.admin_token.empty() ? "" : " and the admin token");
  return true;
}

bool Authenticator::enabled() const {
  absl::ReaderMutexLock lock(&mu_);
  return !config_.callers.empty() || !config_.admin_token.empty();
}

absl::StatusOr<std::string> Authenticator::Check(const grpc::ServerContextBase& context, bool admin) const {
  std::string token;
  const auto& metadata = context.client_metadata();
  if (auto it = metadata.find("authorization"); it != metadata.end()) {
    absl::string_view value(it->second.data(), it->second.size());
    if (absl::ConsumePrefix(&value, "Bearer ") || absl::ConsumePrefix(&value, "bearer ")) token = std::string(value);
  }
  return CheckToken(token, admin);
}

absl::StatusOr<std::string> Authenticator::CheckToken(absl::string_view token, bool admin) const {
  absl::ReaderMutexLock lock(&mu_);
  const bool callers_on = !config_.callers.empty();
  const bool admin_on = !config_.admin_token.empty();
  if (!callers_on && !admin_on) return std::string("-");
  if (!admin && !callers_on) return std::string("-");
  if (token.empty()) {
    return absl::UnauthenticatedError("this call needs \"authorization: Bearer <token>\" metadata");
  }
  // Every configured token is compared, whatever matches, so the time taken tells nothing.
  bool is_admin = admin_on && ConstantTimeEquals(token, config_.admin_token);
  const std::string* caller = nullptr;
  for (const auto& [name, t] : config_.callers) {
    if (ConstantTimeEquals(token, t) && caller == nullptr) caller = &name;
  }
  if (admin && admin_on) {
    if (is_admin) return std::string("admin");
    if (caller != nullptr) {
      return absl::PermissionDeniedError(
          absl::StrCat("caller ", *caller, " may not call admin methods; they need the admin token"));
    }
    return absl::UnauthenticatedError("unknown bearer token");
  }
  if (is_admin) return std::string("admin");
  if (caller != nullptr) return *caller;
  return absl::UnauthenticatedError("unknown bearer token");
}

std::optional<std::string> ClientCertificateName(const grpc::ServerContextBase& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return std::nullopt;
  std::vector<grpc::string_ref> names = auth->FindPropertyValues("x509_common_name");
  if (names.size() != 1) return std::nullopt;
  std::string name(names[0].data(), names[0].size());
  if (name.empty() || name.size() > 128 || name == "admin" || name == "-") return std::nullopt;
  for (char c : name) {
    if (c <= ' ' || c > '~' || c == '=') return std::nullopt;
  }
  return name;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ApiCredentials(const std::string& cert_file,
                                                                        const std::string& key_file,
                                                                        const std::string& client_ca_file) {
  if (cert_file.empty()) {
    if (!key_file.empty()) return InvalidFieldError("--tls_key_file", "needs --tls_cert_file");
    if (!client_ca_file.empty()) return InvalidFieldError("--tls_client_ca_file", "needs --tls_cert_file");
    return grpc::InsecureServerCredentials();
  }
  if (key_file.empty()) return InvalidFieldError("--tls_cert_file", "needs --tls_key_file");
  absl::StatusOr<std::string> cert = ReadFile(cert_file, "--tls_cert_file");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(key_file, "--tls_key_file");
  if (!key.ok()) return key.status();
  if (!absl::StrContains(*cert, "-----BEGIN CERTIFICATE-----")) {
    return InvalidFieldError("--tls_cert_file", absl::StrCat(cert_file, " holds no PEM certificate"));
  }
  if (!absl::StrContains(*key, "PRIVATE KEY-----")) {
    return InvalidFieldError("--tls_key_file", absl::StrCat(key_file, " holds no PEM private key"));
  }
  grpc::SslServerCredentialsOptions options;
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFile(client_ca_file, "--tls_client_ca_file");
    if (!ca.ok()) return ca.status();
    if (!absl::StrContains(*ca, "-----BEGIN CERTIFICATE-----")) {
      return InvalidFieldError("--tls_client_ca_file", absl::StrCat(client_ca_file, " holds no PEM certificate"));
    }
    options.pem_root_certs = *ca;
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

}  // namespace tokenbroker
