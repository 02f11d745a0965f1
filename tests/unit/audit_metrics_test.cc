// The audit log and the metrics' label rules (issue 11 items 4, 7 and 15).
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/security/audit_log.h"
#include "server/runtime/metrics.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using testing::ReadText;
using testing::TempDir;
using testing::WriteText;

std::vector<nlohmann::json> Lines(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::istringstream in(ReadText(path));
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
TEST(SessionTagger, IsTruncatedHmacSha256UnderTheKey) {
  EXPECT_EQ(SessionTagger("Jefe").Tag("what do ya want for nothing?"), "5bdcc146bf60754e");
  EXPECT_EQ(SessionTagger("Jefe").Tag(""), "-");
  EXPECT_NE(SessionTagger("another key").Tag("what do ya want for nothing?"), "5bdcc146bf60754e");
  // Without a configured key, a random one: the tag is not computable from the id alone.
  EXPECT_NE(SessionTagger().Tag("conv-1"), SessionTagger().Tag("conv-1"));
}

TEST(SessionTagger, KeyFromTheEnvironmentOrAFile) {
  ::setenv("TOKENBROKER_AUDIT_KEY", "0123456789abcdef-key", 1);
  absl::StatusOr<SessionTagger> env = SessionTagger::FromEnvironment();
  ::unsetenv("TOKENBROKER_AUDIT_KEY");
  ASSERT_TRUE(env.ok());
  EXPECT_TRUE(env->stable());
  EXPECT_EQ(env->Tag("s"), SessionTagger("0123456789abcdef-key").Tag("s"));
  TempDir dir;
  WriteText(dir.Join("key"), "0123456789abcdef-key\n");
  ::setenv("TOKENBROKER_AUDIT_KEY_FILE", dir.Join("key").c_str(), 1);
  absl::StatusOr<SessionTagger> file = SessionTagger::FromEnvironment();
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->Tag("s"), env->Tag("s"));
  WriteText(dir.Join("key"), "short");
  absl::StatusOr<SessionTagger> too_short = SessionTagger::FromEnvironment();
  ::unsetenv("TOKENBROKER_AUDIT_KEY_FILE");
  EXPECT_EQ(too_short.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_short.status().message(), ::testing::Not(::testing::HasSubstr("short")));
}

TEST(AuditLog, AnExistingFileIsMadePrivateAndEveryReportIsALine) {
  TempDir dir;
  const std::string path = dir.Join("audit.jsonl");
  WriteText(path, "");
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  {
    absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(path);
    ASSERT_TRUE(log.ok()) << log.status();
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    ReportAudit denied;
    denied.caller = "proxy-b";
    denied.lease_id = "l-1";
    denied.http_status = 429;
    denied.result = "permission_denied";
    denied.detail = "lease_id l-1 was issued to another caller";
    (*log)->Reported(denied, absl::FromUnixSeconds(1795914000));
    ReportAudit applied;
    applied.caller = "proxy-a";
    applied.account_id = "acct-a";
    applied.model = "m";
    applied.http_status = 429;
    applied.result = "model_cooldown";
    applied.scope = "model";
    applied.until = absl::FromUnixSeconds(1795914060);
    (*log)->Reported(applied, absl::FromUnixSeconds(1795914000));
    (*log)->Admin({"admin", "account_reset", "acct-a", "", "cooldown lifted"}, absl::FromUnixSeconds(1795914001));
  }  // closed: flushed
  std::vector<nlohmann::json> lines = Lines(path);
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0]["event"], "outcome_reported");
  EXPECT_EQ(lines[0]["caller"], "proxy-b");
  EXPECT_EQ(lines[0]["result"], "permission_denied");
  EXPECT_FALSE(lines[0].contains("until"));
  EXPECT_EQ(lines[1]["account_id"], "acct-a");
  EXPECT_EQ(lines[1]["scope"], "model");
  EXPECT_EQ(lines[1]["until"], "2026-11-29T01:01:00.000Z");
  EXPECT_EQ(lines[2]["event"], "account_reset");
}

TEST(RpcMethodLabel, OnlyServedMethodsGetALabelOfTheirOwn) {
  EXPECT_EQ(RpcMethodLabel("/tokenbroker.v1.TokenBrokerService/GetToken"),
            "/tokenbroker.v1.TokenBrokerService/GetToken");
  EXPECT_EQ(RpcMethodLabel("/tokenbroker.v1.TokenBrokerService/ResetAccount"),
            "/tokenbroker.v1.TokenBrokerService/ResetAccount");
  EXPECT_EQ(RpcMethodLabel("/grpc.health.v1.Health/Check"), "/grpc.health.v1.Health/Check");
  EXPECT_EQ(RpcMethodLabel("/tokenbroker.v1.TokenBrokerService/GetToken2"), "unknown");
  EXPECT_EQ(RpcMethodLabel("/evil.Service1/Method1"), "unknown");
  EXPECT_EQ(RpcMethodLabel(nullptr), "unknown");
}

}  // namespace
}  // namespace tokenbroker
