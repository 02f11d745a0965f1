// AI credits (INSUFFICIENT_G1_CREDITS_BALANCE) and accounts without a Cloud Code project, as the
// pool applies them: through ReportOutcome and UpdateQuota, on a fake clock.
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/selection/account_pool.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

std::string CreditsBody(const std::string& reset_delay) {
  std::string metadata = reset_delay.empty() ? "{}" : R"({"quotaResetDelay":")" + reset_delay + R"("})";
  return R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo",)"
         R"("reason":"INSUFFICIENT_G1_CREDITS_BALANCE","metadata":)" + metadata + "}]}}";
}

SelectRequest Req(const std::string& model) {
  SelectRequest r;
  r.model = model;
  return r;
}

TEST(Credits, ExhaustedUntilTheNamedResetWithoutCoolingTheAccount) {
  FakeClock clock;
  PoolOptions options;
  options.credits_exhausted_ttl = absl::Hours(5);
  AccountPool pool(options, clock);
  pool.Load({testing::MakeAccount("a")});
  absl::StatusOr<Selection> first = pool.Select(Req("m"));
  ASSERT_TRUE(first.ok());
  EXPECT_FALSE(first->credits_exhausted_until.has_value());
  Outcome o;
  o.lease_id = first->lease_id;
  o.http_status = 429;
  o.error_body = CreditsBody("2h");
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->scope, CooldownScope::kNone);  // normal use goes on
  ASSERT_TRUE(r->credits_exhausted_until.has_value());
  EXPECT_EQ(*r->credits_exhausted_until, clock.Now() + absl::Hours(2));
  // Still served, for this model and others, with the flag.
  for (const char* model : {"m", "other"}) {
    absl::StatusOr<Selection> s = pool.Select(Req(model));
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE(s->credits_exhausted_until.has_value());
    EXPECT_EQ(*s->credits_exhausted_until, clock.Now() + absl::Hours(2));
  }
  EXPECT_TRUE(pool.List()[0].cooldowns.empty());
  ASSERT_TRUE(pool.List()[0].credits_exhausted_until.has_value());
  clock.Advance(absl::Hours(2) + absl::Seconds(1));
  EXPECT_FALSE(pool.Select(Req("m"))->credits_exhausted_until.has_value());
  EXPECT_FALSE(pool.List()[0].credits_exhausted_until.has_value());
}

TEST(Credits, WithoutANamedResetTheTtlAndAResetClearsIt) {
  FakeClock clock;
  PoolOptions options;
  options.credits_exhausted_ttl = absl::Minutes(90);
  AccountPool pool(options, clock);
  pool.Load({testing::MakeAccount("a")});
  Outcome o;
  o.account_id = "a";
  o.model = "m";
  o.http_status = 403;
  o.error_body = CreditsBody("");
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scope, CooldownScope::kNone);  // a 403 about credits does not cool the account
  ASSERT_TRUE(r->credits_exhausted_until.has_value());
  EXPECT_EQ(*r->credits_exhausted_until, clock.Now() + absl::Minutes(90));
  // A later answer never shortens it.
  o.error_body = CreditsBody("10m");
  EXPECT_EQ(*pool.ReportOutcome(o)->credits_exhausted_until, clock.Now() + absl::Minutes(90));
  // An operator's reset of the account lifts it.
  absl::StatusOr<ResetResult> reset = pool.Reset(ResetRequest{.account_id = "a"});
  ASSERT_TRUE(reset.ok());
  EXPECT_TRUE(reset->cooldown_lifted);
  EXPECT_FALSE(pool.Select(Req("m"))->credits_exhausted_until.has_value());
}

TEST(Credits, AnotherCallersLeaseCannotBeMarked) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a"), testing::MakeAccount("b")});
  SelectRequest mine = Req("m");
  mine.caller = "alice";
  absl::StatusOr<Selection> s = pool.Select(mine);
  ASSERT_TRUE(s.ok());
  Outcome o;
  o.lease_id = s->lease_id;
  o.http_status = 429;
  o.error_body = CreditsBody("1h");
  o.caller = "mallory";
  o.may_report_any_lease = false;
  o.may_name_account = false;
  EXPECT_TRUE(absl::IsPermissionDenied(pool.ReportOutcome(o).status()));
  o.lease_id.clear();
  o.account_id = "b";
  o.model = "m";
  EXPECT_TRUE(absl::IsPermissionDenied(pool.ReportOutcome(o).status()));
  for (const AccountView& v : pool.List()) EXPECT_FALSE(v.credits_exhausted_until.has_value()) << v.account_id;
}

TEST(Credits, AReplicaAppliesTheOutcomeAnotherOnePublished) {
  // What RedisState delivers to every other replica: the outcome, applied by the same function.
  FakeClock clock;
  AccountPool replica(PoolOptions(), clock);
  replica.Load({testing::MakeAccount("a")});
  replica.OnRemoteOutcome(SharedOutcome{"a", "m", 429, "", CreditsBody("30m"), clock.Now()});
  absl::StatusOr<Selection> s = replica.Select(Req("m"));
  ASSERT_TRUE(s.ok()) << s.status();  // not cooled
  ASSERT_TRUE(s->credits_exhausted_until.has_value());
  EXPECT_EQ(*s->credits_exhausted_until, clock.Now() + absl::Minutes(30));
}

TEST(NoProject, NotServedUntilAnObservationCarriesItsProject) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a")});
  // Nothing known of its project: served as before, with an empty one.
  absl::StatusOr<Selection> before = pool.Select(Req("m"));
  ASSERT_TRUE(before.ok());
  EXPECT_TRUE(before->project_id.empty());
  QuotaObservation why;
  why.account_id = "a";
  why.observed = clock.Now();
  why.no_project_reason = "onboarding in progress (onboardUser since ...)";
  pool.UpdateQuota({why});
  absl::StatusOr<Selection> during = pool.Select(Req("m"));
  ASSERT_TRUE(absl::IsResourceExhausted(during.status())) << during.status();
  Explanation ex = pool.Explain(Req("m"));
  ASSERT_EQ(ex.accounts.size(), 1u);
  EXPECT_EQ(ex.accounts[0].verdict, Verdict::kCooldown);
  EXPECT_THAT(ex.accounts[0].detail, HasSubstr("no Cloud Code project: onboarding in progress"));
  // A reload of the folder keeps it (the file names no project either).
  pool.Load({testing::MakeAccount("a")});
  EXPECT_FALSE(pool.Select(Req("m")).ok());
  QuotaObservation done;
  done.account_id = "a";
  done.observed = clock.Now();
  done.project_id = "proj-new";
  pool.UpdateQuota({done});
  absl::StatusOr<Selection> after = pool.Select(Req("m"));
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->project_id, "proj-new");
  EXPECT_TRUE(pool.List()[0].no_project_reason.empty());
}

}  // namespace
}  // namespace tokenbroker
