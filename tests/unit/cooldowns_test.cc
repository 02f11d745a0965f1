#include "lib/cooldowns.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1795914000);

UpstreamError Parse(int status, const std::string& body, const std::string& retry_after = "") {
  return ParseUpstreamError(status, retry_after, body, kT0);
}

std::string QuotaBody(const std::string& reset_delay) {
  return R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You have exhausted your capacity on this model.",
    "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED",
                "metadata":{"model":"m","quotaResetDelay":")" + reset_delay + R"("}}]}})";
}

TEST(Cooldowns, TwoHourQuotaResetDelayGivesTwoHourModelCooldown) {
  Cooldowns c({});
  CooldownDecision d = c.Apply("a", "m", Parse(429, QuotaBody("2h0m0s")), kT0);
  EXPECT_EQ(d.scope, CooldownScope::kModel);
  EXPECT_EQ(d.until, kT0 + absl::Hours(2));
  EXPECT_THAT(d.reason, HasSubstr("QUOTA_EXHAUSTED"));
  // Blocks the model, not the account.
  ASSERT_TRUE(c.Check("a", "m", kT0 + absl::Minutes(119)).has_value());
  EXPECT_EQ(c.Check("a", "m", kT0 + absl::Minutes(119))->until, kT0 + absl::Hours(2));
  EXPECT_FALSE(c.Check("a", "other-model", kT0).has_value());
  EXPECT_FALSE(c.Check("a", "m", kT0 + absl::Hours(2)).has_value());
}

TEST(Cooldowns, ExplicitDelaysAreNeverCapped) {
  Cooldowns c({});
  CooldownDecision d = c.Apply("a", "m", Parse(429, QuotaBody("72h")), kT0);
  EXPECT_EQ(d.until, kT0 + absl::Hours(72));
}

TEST(Cooldowns, ScopesByKind) {
  Cooldowns c({});
  EXPECT_EQ(c.Apply("a", "m", Parse(429, "", "30"), kT0).scope, CooldownScope::kModel);
  EXPECT_EQ(c.Apply("b", "m", Parse(503, R"({"error":{"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"MODEL_CAPACITY_EXHAUSTED"}]}})"), kT0).scope,
            CooldownScope::kModel);
  CooldownDecision unauthorized = c.Apply("c", "m", Parse(401, ""), kT0);
  EXPECT_EQ(unauthorized.scope, CooldownScope::kAccount);
  EXPECT_TRUE(unauthorized.invalidate_token);
  CooldownDecision forbidden = c.Apply("d", "m", Parse(403, R"({"error":{"code":403}})"), kT0);
  EXPECT_EQ(forbidden.scope, CooldownScope::kAccount);
  EXPECT_EQ(forbidden.until, kT0 + absl::Seconds(60));
  ASSERT_TRUE(c.Check("d", "any-model", kT0).has_value());
  EXPECT_EQ(c.Check("d", "any-model", kT0)->scope, CooldownScope::kAccount);
  CooldownDecision server = c.Apply("e", "m", Parse(500, "boom"), kT0);
  EXPECT_EQ(server.scope, CooldownScope::kModel);
  EXPECT_EQ(server.until, kT0 + absl::Seconds(10));
  CooldownDecision client = c.Apply("f", "m", Parse(400, R"({"error":{"code":400}})"), kT0);
  EXPECT_EQ(client.scope, CooldownScope::kNone);
  EXPECT_FALSE(c.Check("f", "m", kT0).has_value());
  CooldownDecision grant = c.Apply("g", "m", Parse(400, R"({"error":"invalid_grant"})"), kT0);
  EXPECT_TRUE(grant.disable);
}

TEST(Cooldowns, FirstUnauthorizedOnlyRefreshesRepeatedOnesBackOff) {
  Cooldowns c({});
  CooldownDecision first = c.Apply("a", "m", Parse(401, ""), kT0);
  EXPECT_EQ(first.until, kT0);
  EXPECT_FALSE(c.Check("a", "m", kT0).has_value());
  CooldownDecision second = c.Apply("a", "m", Parse(401, ""), kT0);
  EXPECT_EQ(second.until, kT0 + absl::Seconds(60));
}

TEST(Cooldowns, AShorterSecondCooldownNeverShortensALiveOne) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(429, QuotaBody("2h")), kT0);
  CooldownDecision d = c.Apply("a", "m", Parse(429, "", "5"), kT0 + absl::Minutes(1));
  EXPECT_EQ(d.until, kT0 + absl::Hours(2));
  EXPECT_EQ(c.Check("a", "m", kT0 + absl::Minutes(90))->until, kT0 + absl::Hours(2));
  // A longer one extends it.
  d = c.Apply("a", "m", Parse(429, QuotaBody("3h")), kT0);
  EXPECT_EQ(d.until, kT0 + absl::Hours(3));
}

TEST(Cooldowns, BackoffFollowsTheStreakAndASuccessResetsIt) {
  Cooldowns c({});
  EXPECT_EQ(c.Apply("a", "m", Parse(429, ""), kT0).until, kT0 + absl::Seconds(60));
  EXPECT_EQ(c.Apply("a", "m", Parse(429, ""), kT0).until, kT0 + absl::Minutes(5));
  EXPECT_EQ(c.Apply("a", "m", Parse(429, ""), kT0).until, kT0 + absl::Minutes(30));
  EXPECT_EQ(c.Apply("a", "m", Parse(429, ""), kT0).until, kT0 + absl::Hours(2));
  EXPECT_EQ(c.Apply("a", "m", Parse(429, ""), kT0).until, kT0 + absl::Hours(2));
  EXPECT_EQ(c.Streak("a"), 5);
  const absl::Time later = kT0 + absl::Hours(3);
  c.Apply("a", "m", Parse(200, ""), later);
  EXPECT_EQ(c.Streak("a"), 0);
  EXPECT_FALSE(c.Check("a", "m", later).has_value());
  EXPECT_EQ(c.Apply("a", "m", Parse(429, ""), later).until, later + absl::Seconds(60));
}

TEST(Cooldowns, StreakIsPerAccountAcrossModels) {
  Cooldowns c({});
  c.Apply("a", "m1", Parse(429, ""), kT0);
  EXPECT_EQ(c.Apply("a", "m2", Parse(429, ""), kT0).until, kT0 + absl::Minutes(5));
  EXPECT_EQ(c.Apply("b", "m1", Parse(429, ""), kT0).until, kT0 + absl::Seconds(60));
}

TEST(Cooldowns, HalfOpenAdmitsExactlyOneProbeAtATime) {
  CooldownPolicy policy;
  policy.probe_timeout = absl::Seconds(30);
  Cooldowns c(policy);
  c.Apply("a", "m", Parse(429, "", "10"), kT0);
  const absl::Time ended = kT0 + absl::Seconds(10);
  // The cooldown ended: the account may be tried...
  EXPECT_FALSE(c.Check("a", "m", ended).has_value());
  c.OnIssued("a", "m", ended);  // ...by exactly one probe.
  std::optional<CooldownBlock> block = c.Check("a", "m", ended + absl::Seconds(1));
  ASSERT_TRUE(block.has_value());
  EXPECT_TRUE(block->probe_in_flight);
  EXPECT_EQ(block->until, ended + absl::Seconds(30));
  EXPECT_THAT(block->reason, HasSubstr("probe"));
  // The probe never reported: after probe_timeout another single probe may go.
  EXPECT_FALSE(c.Check("a", "m", ended + absl::Seconds(30)).has_value());
  c.OnIssued("a", "m", ended + absl::Seconds(30));
  EXPECT_TRUE(c.Check("a", "m", ended + absl::Seconds(31)).has_value());
  // Its success closes the cooldown: everyone may use the account again.
  c.Apply("a", "m", Parse(200, ""), ended + absl::Seconds(32));
  EXPECT_FALSE(c.Check("a", "m", ended + absl::Seconds(33)).has_value());
  c.OnIssued("a", "m", ended + absl::Seconds(33));
  EXPECT_FALSE(c.Check("a", "m", ended + absl::Seconds(34)).has_value());
  EXPECT_TRUE(c.List("a", ended).empty());
}

TEST(Cooldowns, AFailedProbeReopensWithTheNextBackoffStep) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(429, ""), kT0);  // 60 s
  const absl::Time ended = kT0 + absl::Seconds(60);
  c.OnIssued("a", "m", ended);
  CooldownDecision d = c.Apply("a", "m", Parse(429, ""), ended + absl::Seconds(1));
  EXPECT_EQ(d.until, ended + absl::Seconds(1) + absl::Minutes(5));
  std::optional<CooldownBlock> block = c.Check("a", "m", ended + absl::Seconds(2));
  ASSERT_TRUE(block.has_value());
  EXPECT_FALSE(block->probe_in_flight);
}

TEST(Cooldowns, ValidationRequiredBlocksTheAccountAndKeepsTheUrl) {
  CooldownPolicy policy;
  policy.validation_block = absl::Hours(6);
  Cooldowns c(policy);
  CooldownDecision d = c.Apply("a", "m", Parse(403, R"({"error":{"code":403,"message":"Verify your account","details":[
      {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"VALIDATION_REQUIRED","metadata":{"validation_url":"https://accounts.google.com/v/1"}}]}})"),
                               kT0);
  EXPECT_EQ(d.scope, CooldownScope::kAccount);
  EXPECT_EQ(d.until, kT0 + absl::Hours(6));
  EXPECT_EQ(c.ValidationUrl("a"), "https://accounts.google.com/v/1");
  EXPECT_THAT(d.reason, HasSubstr("https://accounts.google.com/v/1"));
  std::vector<CooldownView> views = c.List("a", kT0);
  ASSERT_EQ(views.size(), 1u);
  EXPECT_EQ(views[0].model, "");
}

}  // namespace
}  // namespace tokenbroker
