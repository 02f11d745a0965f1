#include "lib/selection/cooldowns.h"

#include "absl/strings/str_cat.h"
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
  // A reported invalid_grant is a caller's word: it cools the account and drops its token, so the
  // broker's own refresh decides.
  CooldownDecision grant = c.Apply("g", "m", Parse(400, R"({"error":"invalid_grant"})"), kT0);
  EXPECT_EQ(grant.scope, CooldownScope::kAccount);
  EXPECT_EQ(grant.until, kT0 + absl::Seconds(60));
  EXPECT_TRUE(grant.invalidate_token);
  EXPECT_THAT(grant.reason, HasSubstr("refresh decides"));
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
  c.OnIssued("a", "m", ended + absl::Seconds(30), "l-probe");
  EXPECT_TRUE(c.Check("a", "m", ended + absl::Seconds(31)).has_value());
  // Its success closes the cooldown: everyone may use the account again.
  c.Apply("a", "m", Parse(200, ""), ended + absl::Seconds(32), "l-probe");
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

// Issue 11 item 1: whatever a report says, nothing in it can disable an account.
TEST(Cooldowns, NoReportDisablesRepeatedInvalidGrantOnlyBacksOff) {
  Cooldowns c({});
  const std::string body = R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})";
  absl::Time t = kT0;
  absl::Duration last = absl::ZeroDuration();
  for (int i = 0; i < 6; ++i) {
    CooldownDecision d = c.Apply("a", "m", Parse(400, body), t);
    EXPECT_EQ(d.scope, CooldownScope::kAccount);
    EXPECT_NE(d.until, absl::InfiniteFuture());
    EXPECT_GE(d.until - t, last);
    last = d.until - t;
    t = d.until;
  }
  EXPECT_FALSE(c.Check("a", "m", t).has_value());  // it ends, like any cooldown
}

// Issue 11 item 2: two leases on one (account, model); a 429 on the first, a 200 on the second.
TEST(Cooldowns, ASuccessNeverEndsALiveCooldown) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(429, "", "3600"), kT0, "l-first");
  CooldownDecision d = c.Apply("a", "m", Parse(200, ""), kT0 + absl::Seconds(1), "l-second");
  EXPECT_EQ(c.Streak("a"), 0);  // the streak ends...
  ASSERT_TRUE(c.Check("a", "m", kT0 + absl::Seconds(2)).has_value());  // ...the cooldown does not
  EXPECT_EQ(c.Check("a", "m", kT0 + absl::Seconds(2))->until, kT0 + absl::Hours(1));
  EXPECT_EQ(d.scope, CooldownScope::kModel);
  EXPECT_EQ(d.until, kT0 + absl::Hours(1));
  EXPECT_THAT(d.reason, HasSubstr("never ends a live cooldown"));
  // Without a lease (another replica's copy of the report) it stays too.
  c.Apply("a", "m", Parse(200, ""), kT0 + absl::Seconds(3));
  EXPECT_TRUE(c.Check("a", "m", kT0 + absl::Seconds(4)).has_value());
  // The same for a whole-account cooldown.
  c.Apply("b", "m", Parse(403, R"({"error":{"code":403}})"), kT0);
  c.Apply("b", "m", Parse(200, ""), kT0 + absl::Seconds(1), "l-x");
  EXPECT_TRUE(c.Check("b", "m", kT0 + absl::Seconds(2)).has_value());
  // Once it has run out (and no probe is out), a success closes it.
  c.Apply("a", "m", Parse(200, ""), kT0 + absl::Hours(1), "l-late");
  EXPECT_TRUE(c.List("a", kT0 + absl::Hours(1)).empty());
}

TEST(Cooldowns, WhileAProbeIsOutOnlyItsOwnSuccessClosesTheCooldown) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(429, "", "10"), kT0);
  const absl::Time ended = kT0 + absl::Seconds(10);
  c.OnIssued("a", "m", ended, "l-probe");
  // A lease issued before the 429 reports success: the half-open state stays.
  c.Apply("a", "m", Parse(200, ""), ended + absl::Seconds(1), "l-old");
  ASSERT_TRUE(c.Check("a", "m", ended + absl::Seconds(2)).has_value());
  EXPECT_TRUE(c.Check("a", "m", ended + absl::Seconds(2))->probe_in_flight);
  c.Apply("a", "m", Parse(200, ""), ended + absl::Seconds(3), "l-probe");
  EXPECT_FALSE(c.Check("a", "m", ended + absl::Seconds(4)).has_value());
}

TEST(Cooldowns, AProbeLeaseReleasedWithoutAReportFreesTheProbe) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(429, "", "10"), kT0);
  const absl::Time ended = kT0 + absl::Seconds(10);
  c.OnIssued("a", "m", ended, "l-dead");
  ASSERT_TRUE(c.Check("a", "m", ended).has_value());
  c.OnLeaseEnded("a", "m", "l-other");  // not the probe: nothing changes
  ASSERT_TRUE(c.Check("a", "m", ended).has_value());
  c.OnLeaseEnded("a", "m", "l-dead");
  EXPECT_FALSE(c.Check("a", "m", ended).has_value());
  c.OnIssued("a", "m", ended, "l-live");  // the next request is the probe
  EXPECT_TRUE(c.Check("a", "m", ended + absl::Seconds(1))->probe_in_flight);
}

// Issue 16: the fleet's half-open probe. Which uses would be probes, a probe held by another
// replica, and how its report (lease-less, from the shared state) closes or reopens the cooldown.
TEST(Cooldowns, AProbeHeldElsewhereBlocksUntilItsReportOrItsTime) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(429, "", "10"), kT0);
  const absl::Time ended = kT0 + absl::Seconds(10);
  EXPECT_TRUE(c.ProbeScopes("a", "m", kT0 + absl::Seconds(5)).empty());  // still cooling: no probe
  EXPECT_EQ(c.ProbeScopes("a", "m", ended), std::vector<std::string>{"m"});
  EXPECT_TRUE(c.ProbeScopes("a", "other", ended).empty());
  EXPECT_TRUE(c.ProbeScopes("b", "m", ended).empty());
  c.ProbeElsewhere("a", "m", ended, ended + absl::Seconds(60));
  ASSERT_TRUE(c.Check("a", "m", ended + absl::Seconds(59)).has_value());
  EXPECT_TRUE(c.Check("a", "m", ended + absl::Seconds(59))->probe_in_flight);
  EXPECT_TRUE(c.ProbeScopes("a", "m", ended + absl::Seconds(59)).empty());
  EXPECT_FALSE(c.IsProbe("a", "m", ""));
  // A success of a lease issued here (before the 429) is not the probe's report.
  c.Apply("a", "m", Parse(200, ""), ended + absl::Seconds(1), "l-old");
  EXPECT_TRUE(c.Check("a", "m", ended + absl::Seconds(2)).has_value());
  // Its time is up with no report: the next use here probes.
  EXPECT_EQ(c.ProbeScopes("a", "m", ended + absl::Seconds(60)), std::vector<std::string>{"m"});
  // The other replica's report arrives lease-less: a success closes it.
  c.Apply("a", "m", Parse(200, ""), ended + absl::Seconds(3));
  EXPECT_FALSE(c.Check("a", "m", ended + absl::Seconds(4)).has_value());
  EXPECT_FALSE(c.Has("a"));
}

TEST(Cooldowns, AFailedProbeElsewhereCoolsAgainAndAWholeAccountCooldownHasItsOwnScope) {
  Cooldowns c({});
  c.Apply("a", "m", Parse(401, ""), kT0);
  c.Apply("a", "m", Parse(401, ""), kT0);  // the second 401 in a row cools the whole account
  const std::optional<CooldownBlock> block = c.Check("a", "m", kT0);
  ASSERT_TRUE(block.has_value());
  ASSERT_EQ(block->scope, CooldownScope::kAccount);
  const absl::Time ended = block->until;
  EXPECT_EQ(c.ProbeScopes("a", "m", ended), std::vector<std::string>{""});
  c.ProbeElsewhere("a", "m", ended, ended + absl::Seconds(60));
  // The probe (another replica's) failed the same way: the account cools again, for longer.
  c.Apply("a", "m", Parse(401, ""), ended + absl::Seconds(1));
  const std::optional<CooldownBlock> again = c.Check("a", "m", ended + absl::Seconds(2));
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->scope, CooldownScope::kAccount);
  EXPECT_FALSE(again->probe_in_flight);
  EXPECT_GT(again->until, ended + absl::Seconds(60));
  // The probe taken here is known by its lease.
  c.OnIssued("a", "m", again->until, "l-probe");
  EXPECT_TRUE(c.IsProbe("a", "m", "l-probe"));
  EXPECT_FALSE(c.IsProbe("a", "m", "l-other"));
}

// Issue 11 item 6: model names come from callers; the table per account stays bounded, and what
// ends soonest goes first.
TEST(Cooldowns, DistinctModelsPerAccountAreBounded) {
  Cooldowns c({});
  c.Apply("a", "real-model", Parse(429, "", "86400"), kT0);
  for (int i = 0; i < 10'000; ++i) {
    c.Apply("a", absl::StrCat("made-up-", i), Parse(429, "", "60"), kT0 + absl::Seconds(i));
  }
  EXPECT_EQ(c.List("a", kT0).size(), Cooldowns::kMaxModelsPerAccount);
  EXPECT_TRUE(c.Check("a", "real-model", kT0 + absl::Hours(1)).has_value());  // the longest one stays
  CooldownState merged;
  for (int i = 0; i < 1000; ++i) merged.items.push_back({absl::StrCat("remote-", i), kT0 + absl::Hours(30), "x", true});
  c.Merge("a", merged);
  EXPECT_EQ(c.List("a", kT0).size(), Cooldowns::kMaxModelsPerAccount);
}

TEST(Cooldowns, LiftRemovesWhatReportsCaused) {
  Cooldowns c({});
  c.Apply("a", "m1", Parse(429, "", "3600"), kT0);
  c.Apply("a", "m2", Parse(429, "", "3600"), kT0);
  EXPECT_TRUE(c.Lift("a", "m1"));
  EXPECT_FALSE(c.Check("a", "m1", kT0).has_value());
  EXPECT_TRUE(c.Check("a", "m2", kT0).has_value());
  EXPECT_FALSE(c.Lift("a", "m1"));
  c.Apply("a", "m1", Parse(403, R"({"error":{"code":403}})"), kT0);
  EXPECT_TRUE(c.Lift("a", ""));
  EXPECT_FALSE(c.Check("a", "m2", kT0).has_value());
  EXPECT_FALSE(c.Check("a", "m1", kT0).has_value());
  EXPECT_EQ(c.Streak("a"), 0);
  EXPECT_FALSE(c.Lift("nobody", ""));
}

}  // namespace
}  // namespace tokenbroker
