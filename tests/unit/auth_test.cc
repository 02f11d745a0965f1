// Loading caller and admin tokens, the constant-time compare and the TLS flag checks. Who may call
// what is tested end to end against the real binary (tests/e2e/security_test.py).
#include "server/security/auth.h"

#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::tokenbroker::testing::TempDir;
using ::tokenbroker::testing::WriteText;

TEST(ConstantTimeEqualsTest, ComparesContentAndLength) {
  EXPECT_TRUE(ConstantTimeEquals("abcdef", "abcdef"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("abcdef", "abcdeg"));
  EXPECT_FALSE(ConstantTimeEquals("abcdef", "abcde"));
  EXPECT_FALSE(ConstantTimeEquals("abc", std::string("abc\0", 4)));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
}

TEST(LoadAuthConfigTest, ReadsCallersAndAdmin) {
  TempDir dir;
  WriteText(dir.Join("callers"), "# comment\n\nproxy-a  token-aaaaaaaaaaaaaaaa\n\tproxy-b\ttoken-bbbbbbbbbbbbbbbb  \n");
  WriteText(dir.Join("admin"), "  admin-token-cccccccccccc\n");
  absl::StatusOr<AuthConfig> c = LoadAuthConfig(dir.Join("callers"), "--callers", dir.Join("admin"), "--admin");
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->callers.size(), 2u);
  EXPECT_EQ(c->callers[0].first, "proxy-a");
  EXPECT_EQ(c->callers[1].second, "token-bbbbbbbbbbbbbbbb");
  EXPECT_EQ(c->admin_token, "admin-token-cccccccccccc");
  EXPECT_TRUE(Authenticator(*c).enabled());
  absl::StatusOr<AuthConfig> off = LoadAuthConfig("", "--callers", "", "--admin");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(Authenticator(*off).enabled());
}

TEST(LoadAuthConfigTest, BadFilesNameTheFlagAndLineButNeverTheToken) {
  TempDir dir;
  struct Case {
    std::string text;
    std::string want;
  } cases[] = {
      {"proxy-a\n", "line 1: want \"<name> <token>\""},
      {"proxy-a short-secret\n", "line 1: the token must be 16 to 4096 printable characters"},
      {"a tok-aaaaaaaaaaaaaaaa\na tok-bbbbbbbbbbbbbbbb\n", "line 2: caller a appears twice"},
      {"a b c-dddddddddddddddd\n", "line 1: want"},
      {"# nobody\n", "names no caller"},
  };
  for (const Case& c : cases) {
    WriteText(dir.Join("callers"), c.text);
    absl::StatusOr<AuthConfig> r = LoadAuthConfig(dir.Join("callers"), "--caller_tokens_file", "", "--admin");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
    const std::string msg(r.status().message());
    EXPECT_EQ(msg.rfind("--caller_tokens_file", 0), 0u) << msg;
    EXPECT_NE(msg.find(c.want), std::string::npos) << msg;
    EXPECT_EQ(msg.find("short-secret"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("tok-"), std::string::npos) << msg;
  }
  EXPECT_FALSE(LoadAuthConfig("", "--c", dir.Join("missing"), "--admin_token_file").ok());
  WriteText(dir.Join("admin"), "short\n");
  absl::StatusOr<AuthConfig> r = LoadAuthConfig("", "--c", dir.Join("admin"), "--admin_token_file");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(std::string(r.status().message()).rfind("--admin_token_file", 0), 0u);
}

TEST(ApiCredentialsTest, TlsFlagsMustComeTogether) {
  TempDir dir;
  EXPECT_TRUE(ApiCredentials("", "", "").ok());
  for (const auto& [cert, key, ca, flag] :
       std::vector<std::tuple<std::string, std::string, std::string, std::string>>{
           {"", "k.pem", "", "--tls_key_file"},
           {"", "", "ca.pem", "--tls_client_ca_file"},
           {"c.pem", "", "", "--tls_cert_file"},
           {dir.Join("missing.pem"), dir.Join("missing.key"), "", "--tls_cert_file"}}) {
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> r = ApiCredentials(cert, key, ca);
    ASSERT_FALSE(r.ok()) << flag;
    EXPECT_EQ(std::string(r.status().message()).rfind(flag, 0), 0u) << r.status().message();
  }
  WriteText(dir.Join("c.pem"), "not a certificate");
  WriteText(dir.Join("k.pem"), "not a key");
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> r = ApiCredentials(dir.Join("c.pem"), dir.Join("k.pem"), "");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("holds no PEM certificate"), absl::string_view::npos);
}

}  // namespace
}  // namespace tokenbroker
