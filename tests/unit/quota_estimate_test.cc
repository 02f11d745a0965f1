// Predictive admission: the estimate (lease counts, learned cost, prior, lag, fleet-wide counts)
// and the stale-observation rule, on their own and through AccountPool on a fake clock.
#include "lib/quota/quota_estimate.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/selection/account_pool.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1795914000);

QuotaReading Q(double fraction, absl::Time observed, std::optional<absl::Time> reset = std::nullopt) {
  return QuotaReading{fraction, reset, observed};
}

TEST(ModelFamily, ClaudeAndGptAreThirdPartyEverythingElseGemini) {
  EXPECT_EQ(ModelFamily("claude-sonnet-4-6-thinking"), "3p");
  EXPECT_EQ(ModelFamily("Claude-Opus"), "3p");
  EXPECT_EQ(ModelFamily("gpt-oss-120b"), "3p");
  EXPECT_EQ(ModelFamily("gemini-3-pro-high"), "gemini");
  EXPECT_EQ(ModelFamily(""), "gemini");
}

TEST(QuotaUsage, CountsLeasesSinceATimeInAnyArrivalOrder) {
  QuotaUsage u;
  for (int i = 0; i < 10; ++i) u.Record("gemini", kT0 + absl::Seconds(i));
  u.Record("gemini", kT0 + absl::Seconds(4) + absl::Milliseconds(500), 3);  // a late remote batch
  u.Record("3p", kT0);
  EXPECT_EQ(u.IssuedSince("gemini", kT0), 13);
  EXPECT_EQ(u.IssuedSince("gemini", kT0 + absl::Seconds(5)), 5);
  EXPECT_EQ(u.IssuedSince("gemini", kT0 + absl::Seconds(4) + absl::Milliseconds(1)), 8);
  EXPECT_EQ(u.IssuedSince("3p", kT0), 1);
  EXPECT_EQ(u.IssuedSince("none", kT0), 0);
  u.Trim(kT0 + absl::Seconds(5));
  EXPECT_EQ(u.IssuedSince("gemini", kT0), 5);
}

TEST(QuotaUsage, MemoryIsBoundedPerFamily) {
  QuotaUsage u;
  for (int i = 0; i < 3 * static_cast<int>(QuotaUsage::kMaxTimesPerFamily); ++i) u.Record("gemini", kT0 + absl::Milliseconds(i));
  u.Record("gemini", kT0, 1'000'000'000);  // a hostile count
  EXPECT_EQ(u.IssuedSince("gemini", absl::InfinitePast()), static_cast<int64_t>(QuotaUsage::kMaxTimesPerFamily));
}

TEST(QuotaUsage, LearnsTheCostOfOneCallFromTwoObservationsOfOneWindow) {
  QuotaUsage u;
  const absl::Time reset = kT0 + absl::Hours(5);
  EXPECT_FALSE(u.Cost("gemini"));
  for (int i = 0; i < 20; ++i) u.Record("gemini", kT0 + absl::Seconds(1 + i));
  std::optional<double> sample = u.Learn("gemini", "gemini", Q(0.9, kT0, reset), Q(0.8, kT0 + absl::Seconds(30), reset), absl::ZeroDuration());
  ASSERT_TRUE(sample);
  EXPECT_NEAR(*sample, 0.005, 1e-9);
  EXPECT_NEAR(*u.Cost("gemini"), 0.005, 1e-9);
  // A second model of the family observed in the same poll teaches nothing more.
  EXPECT_FALSE(u.Learn("gemini", "gemini", Q(0.9, kT0, reset), Q(0.8, kT0 + absl::Seconds(30), reset), absl::ZeroDuration()));
  // A reset between the two observations: no sample.
  EXPECT_FALSE(u.Learn("gemini", "gemini", Q(0.1, kT0, reset), Q(1.0, kT0 + absl::Seconds(60), reset + absl::Hours(5)),
                       absl::ZeroDuration()));
  // No lease between them: no sample (someone else's use cannot be priced).
  EXPECT_FALSE(u.Learn("gemini", "gemini", Q(0.8, kT0 + absl::Seconds(30), reset), Q(0.7, kT0 + absl::Seconds(60), reset),
                       absl::ZeroDuration()));
  // Newer samples weigh more: 20 calls for 0.1, then 10 calls for 0.2 → (0.05 + 0.2) / (10 + 10).
  for (int i = 0; i < 10; ++i) u.Record("gemini", kT0 + absl::Seconds(61 + i));
  ASSERT_TRUE(u.Learn("gemini", "gemini", Q(0.8, kT0 + absl::Seconds(60), reset), Q(0.6, kT0 + absl::Seconds(90), reset),
                      absl::ZeroDuration()));
  EXPECT_NEAR(*u.Cost("gemini"), 0.25 / 20, 1e-9);
}

TEST(QuotaUsage, EstimateUsesThePriorUntilLearnedAndCountsFromTheResetOnceItPassed) {
  QuotaUsage u;
  const absl::Time reset = kT0 + absl::Seconds(100);
  for (int i = 0; i < 4; ++i) u.Record("gemini", kT0 + absl::Seconds(10 + i));
  QuotaEstimate e = u.Estimate("gemini", "gemini", Q(0.5, kT0, reset), kT0 + absl::Seconds(20), absl::ZeroDuration(), 0.05);
  EXPECT_FALSE(e.cost_learned);
  EXPECT_EQ(e.leases, 4);
  EXPECT_NEAR(e.estimated, 0.3, 1e-9);
  EXPECT_NEAR(e.observed, 0.5, 1e-9);
  // Never below 0.
  EXPECT_EQ(u.Estimate("gemini", "gemini", Q(0.1, kT0, reset), kT0 + absl::Seconds(20), absl::ZeroDuration(), 0.5).estimated, 0);
  // Past the reset: a full bucket minus what was issued after the reset.
  u.Record("gemini", reset + absl::Seconds(1), 2);
  e = u.Estimate("gemini", "gemini", Q(0.0, kT0, reset), reset + absl::Seconds(5), absl::ZeroDuration(), 0.05);
  EXPECT_TRUE(e.reset_passed);
  EXPECT_EQ(e.leases, 2);
  EXPECT_NEAR(e.estimated, 0.9, 1e-9);
}

TEST(QuotaUsage, ALaggingQuotaApiCountsTheLeasesItHasNotSeenYet) {
  QuotaUsage u;
  // Leases at T0+1..T0+10; the answer taken at T0+10 shows the quota as of T0+5.
  for (int i = 1; i <= 10; ++i) u.Record("gemini", kT0 + absl::Seconds(i));
  const QuotaReading q = Q(0.5, kT0 + absl::Seconds(10), kT0 + absl::Hours(1));
  EXPECT_EQ(u.Estimate("gemini", "gemini", q, kT0 + absl::Seconds(10), absl::ZeroDuration(), 0.01).leases, 1);
  EXPECT_EQ(u.Estimate("gemini", "gemini", q, kT0 + absl::Seconds(10), absl::Seconds(5), 0.01).leases, 6);
}

TEST(ObservationEndsExhaustion, OnlyAFreshTruthfulObservationOfARealReset) {
  const QuotaMark mark{"m", kT0, 0.3, kT0 + absl::Hours(1)};
  const absl::Duration lag = absl::Seconds(10);
  const double threshold = 0.05;
  // Taken before the 429, or within the lag after it: it may show the quota from before.
  EXPECT_FALSE(ObservationEndsExhaustion(mark, 0.9, kT0 + absl::Hours(2), kT0 - absl::Seconds(1), lag, threshold));
  EXPECT_FALSE(ObservationEndsExhaustion(mark, 0.9, kT0 + absl::Hours(2), kT0 + absl::Seconds(5), lag, threshold));
  // After the 429 but no reset shown: the same window at a fraction not above the one at the 429.
  EXPECT_FALSE(ObservationEndsExhaustion(mark, 0.3, kT0 + absl::Hours(1), kT0 + absl::Seconds(30), lag, threshold));
  EXPECT_FALSE(ObservationEndsExhaustion(mark, 0.2, kT0 + absl::Hours(1), kT0 + absl::Seconds(30), lag, threshold));
  // A reset that is itself exhausted ends nothing.
  EXPECT_FALSE(ObservationEndsExhaustion(mark, 0.01, kT0 + absl::Hours(6), kT0 + absl::Seconds(30), lag, threshold));
  // The reset time moved on, or the fraction rose: the quota came back.
  EXPECT_TRUE(ObservationEndsExhaustion(mark, 1.0, kT0 + absl::Hours(6), kT0 + absl::Seconds(30), lag, threshold));
  EXPECT_TRUE(ObservationEndsExhaustion(mark, 0.6, kT0 + absl::Hours(1), kT0 + absl::Seconds(30), lag, threshold));
  // Nothing on record at the 429: no yardstick, no early end.
  EXPECT_FALSE(ObservationEndsExhaustion(QuotaMark{"m", kT0, std::nullopt, std::nullopt}, 1.0, kT0 + absl::Hours(6),
                                         kT0 + absl::Seconds(30), lag, threshold));
}

// Through the pool.

QuotaSettings On() {
  QuotaSettings s;
  s.enabled = true;
  return s;
}

QuotaObservation Obs(const std::string& account, const std::string& model, double fraction, absl::Time observed,
                     std::optional<absl::Time> reset = std::nullopt) {
  QuotaObservation o;
  o.account_id = account;
  o.model = model;
  o.remaining_fraction = fraction;
  o.observed = observed;
  o.reset_time = reset;
  o.source = QuotaSource::kAvailableModels;
  return o;
}

SelectRequest Req(const std::string& model) {
  SelectRequest r;
  r.model = model;
  return r;
}

Outcome Quota429(const std::string& account, const std::string& model, const std::string& retry_after) {
  Outcome o;
  o.account_id = account;
  o.model = model;
  o.http_status = 429;
  o.retry_after = retry_after;
  o.error_body = R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED"}]}})";
  return o;
}

TEST(PredictiveAdmission, LeasesSinceTheObservationDriveTheAccountToExhaustedBeforeAny429) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(On());
  const absl::Time reset = kT0 + absl::Seconds(60);
  // Two polls 10 leases apart teach the cost: 0.4 over 10 calls = 0.04 a call.
  pool.UpdateQuota({Obs("a", "gemini-3-pro-high", 1.0, kT0, reset)});
  for (int i = 0; i < 10; ++i) {
    clock.Advance(absl::Seconds(1));
    ASSERT_TRUE(pool.Select(Req("gemini-3-pro-high")).ok());
  }
  clock.Advance(absl::Seconds(1));
  pool.UpdateQuota({Obs("a", "gemini-3-pro-high", 0.6, clock.Now(), reset)});
  // 0.6 left at 0.04 a call, exhausted below 0.05: fourteen more calls, and a flash model of the
  // same family spends the same bucket.
  for (int i = 0; i < 14; ++i) {
    clock.Advance(absl::Seconds(1));
    absl::StatusOr<Selection> s = pool.Select(Req(i % 2 ? "gemini-3-flash" : "gemini-3-pro-high"));
    ASSERT_TRUE(s.ok()) << i << ": " << s.status();
  }
  clock.Advance(absl::Seconds(1));
  absl::StatusOr<Selection> s = pool.Select(Req("gemini-3-pro-high"));
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(s.status())) << s.status();
  Explanation e = pool.Explain(Req("gemini-3-pro-high"));
  ASSERT_EQ(e.accounts.size(), 1u);
  EXPECT_EQ(e.accounts[0].verdict, Verdict::kExhausted);
  EXPECT_THAT(e.accounts[0].detail, HasSubstr("14 leases since"));
  EXPECT_NEAR(*e.accounts[0].observed_fraction, 0.6, 1e-9);
  EXPECT_NEAR(*e.accounts[0].estimated_fraction, 0.04, 1e-9);
  EXPECT_EQ(e.accounts[0].available_at, reset);
  // Claude draws from another family: unaffected.
  EXPECT_TRUE(pool.Select(Req("claude-sonnet-4-6")).ok());
  // At the reset the bucket is full again without waiting for a poll.
  clock.Set(reset + absl::Seconds(1));
  s = pool.Select(Req("gemini-3-pro-high"));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->quota_decision, QuotaDecision::kProceed);
  EXPECT_NEAR(*s->remaining_fraction, 1.0, 1e-9);
}

TEST(PredictiveAdmission, CautiousPriorThenTheCostLearnedByAnotherAccountOfTheTier) {
  FakeClock clock(kT0);
  QuotaSettings settings = On();
  settings.call_cost_prior = 0.1;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(settings);
  const absl::Time reset = kT0 + absl::Hours(5);
  pool.UpdateQuota({Obs("a", "m", 0.5, kT0, reset)});
  // The prior prices a call at 0.1: 0.5 lasts four calls (0.1 left: LOW from 0.1 down, EXHAUSTED
  // below 0.05).
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(pool.Select(Req("m")).ok()) << i;
  EXPECT_FALSE(pool.Select(Req("m")).ok());
  // b joins (a reload keeps a's counts) and learns 0.01 a call: a is repriced with it.
  pool.Load({testing::MakeAccount("a", Tier::kPro), testing::MakeAccount("b", Tier::kPro)});
  pool.UpdateQuota({Obs("b", "m", 1.0, kT0, reset)});
  pool.OnRemoteLeasesIssued("b", "m", 10, kT0 + absl::Milliseconds(1));
  clock.Advance(absl::Seconds(10));
  pool.UpdateQuota({Obs("b", "m", 0.9, clock.Now(), reset)});
  Explanation e = pool.Explain(Req("m"));
  for (const AccountVerdict& v : e.accounts) {
    if (v.account_id == "a") EXPECT_NEAR(*v.estimated_fraction, 0.45, 1e-9);
  }
}

TEST(PredictiveAdmission, AQuota429PricesTheCallsSinceTheObservationAndFailedCallsSpendNothing) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kFree), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());  // prior 0.05: twenty calls to a full bucket
  const absl::Time reset = kT0 + absl::Hours(1);
  pool.UpdateQuota({Obs("a", "m", 1.0, kT0, reset)});
  // Only a is known to have quota: b stays unknown and ranks below it.
  std::vector<std::string> leases;
  for (int i = 0; i < 4; ++i) {
    clock.Advance(absl::Seconds(1));
    absl::StatusOr<Selection> s = pool.Select(Req("m"));
    ASSERT_TRUE(s.ok());
    ASSERT_EQ(s->account_id, "a");
    leases.push_back(s->lease_id);
  }
  // A 5xx spent nothing: its lease no longer counts.
  Outcome failed;
  failed.lease_id = leases[0];
  failed.http_status = 503;
  ASSERT_TRUE(pool.ReportOutcome(failed).ok());
  // The fourth call found the bucket empty: the two that went through (leases 1 and 2) cost it all.
  Outcome quota = Quota429("", "", "3600");
  quota.lease_id = leases[3];
  ASSERT_TRUE(pool.ReportOutcome(quota).ok());
  Explanation e = pool.Explain(Req("m"));
  for (const AccountVerdict& v : e.accounts) {
    if (v.account_id == "a") EXPECT_EQ(v.verdict, Verdict::kCooldown);
  }
  // b, observed now, is priced by what a learned: 1.0 for 2 calls.
  pool.UpdateQuota({Obs("b", "m", 1.0, clock.Now(), reset)});
  ASSERT_TRUE(pool.Select(Req("m")).ok());
  e = pool.Explain(Req("m"));
  for (const AccountVerdict& v : e.accounts) {
    if (v.account_id == "b") EXPECT_NEAR(*v.estimated_fraction, 0.5, 1e-9);
  }
}

TEST(PredictiveAdmission, LeasesIssuedByOtherReplicasCount) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(On());
  pool.UpdateQuota({Obs("a", "m", 0.5, kT0, kT0 + absl::Hours(1))});
  ASSERT_TRUE(pool.Select(Req("m")).ok());
  pool.OnRemoteLeasesIssued("a", "m", 9, kT0);
  EXPECT_TRUE(absl::IsResourceExhausted(pool.Select(Req("m")).status()));
  // Leases before the observation were already in it.
  pool.UpdateQuota({Obs("a", "m", 0.5, kT0 + absl::Seconds(1), kT0 + absl::Hours(1))});
  pool.OnRemoteLeasesIssued("a", "m", 50, kT0);
  EXPECT_TRUE(pool.Select(Req("m")).ok());
}

TEST(PredictiveAdmission, TheLagIsLearnedFromAnswersOlderThanTheirOwnReset) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(On());
  EXPECT_EQ(pool.quota_lag(), absl::ZeroDuration());
  pool.UpdateQuota({Obs("a", "m", 0.2, kT0, kT0 - absl::Seconds(4))});
  EXPECT_EQ(pool.quota_lag(), absl::Seconds(6));  // at least 4 s old: 4 s and half again
  pool.UpdateQuota({Obs("a", "m", 0.2, kT0 + absl::Seconds(1), kT0 - absl::Seconds(1))});
  EXPECT_EQ(pool.quota_lag(), absl::Seconds(6));  // the longest seen
  pool.UpdateQuota({Obs("a", "m", 0.2, kT0 + absl::Hours(1), kT0 - absl::Hours(1))});
  EXPECT_EQ(pool.quota_lag(), QuotaSettings().max_lag);  // never past the bound
}

TEST(StaleObservations, ALaggingOrOutOfOrderObservationNeverEndsAQuotaCooldown) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());
  const absl::Time reset = kT0 + absl::Hours(1);
  pool.UpdateQuota({Obs("a", "m", 0.4, kT0, reset)});
  clock.Advance(absl::Seconds(30));
  ASSERT_TRUE(pool.ReportOutcome(Quota429("a", "m", "3600")).ok());
  const absl::Time at_429 = clock.Now();
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "b");
  // An answer taken before the 429 but arriving after it (out of order), showing more than now.
  clock.Advance(absl::Seconds(5));
  pool.UpdateQuota({Obs("a", "m", 0.35, at_429 - absl::Seconds(1), reset)});
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "b");
  // A fresh answer of the same window, not above what it was at the 429 (the API lagging).
  pool.UpdateQuota({Obs("a", "m", 0.3, clock.Now(), reset)});
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "b");
  // A source that lies about Claude reports 1.0: never an end.
  pool.UpdateQuota({Obs("a", "claude-sonnet-4-6", 0.2, kT0, reset)});
  ASSERT_TRUE(pool.ReportOutcome(Quota429("a", "claude-sonnet-4-6", "3600")).ok());
  clock.Advance(absl::Seconds(30));
  pool.UpdateQuota({Obs("a", "claude-sonnet-4-6", 1.0, clock.Now(), reset + absl::Hours(5))});
  EXPECT_EQ(pool.Select(Req("claude-sonnet-4-6"))->account_id, "b");
  // A real reset (the reset time moved on) ends the gemini cooldown.
  pool.UpdateQuota({Obs("a", "m", 1.0, clock.Now(), reset + absl::Hours(5))});
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "a");
}

TEST(StaleObservations, ObservationsWithinTheLearnedLagOfThe429DoNotCount) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());
  // The quota API is 20 s behind or more: an answer at T0 still names a reset 20 s past (30 s with
  // the margin).
  pool.UpdateQuota({Obs("a", "m", 0.1, kT0, kT0 - absl::Seconds(20))});
  ASSERT_EQ(pool.quota_lag(), absl::Seconds(30));
  ASSERT_TRUE(pool.ReportOutcome(Quota429("a", "m", "3600")).ok());
  // 10 s later the answer still shows the window before (reset at T0+2h, 0.5): within the lag.
  clock.Advance(absl::Seconds(10));
  pool.UpdateQuota({Obs("a", "m", 0.5, clock.Now(), kT0 + absl::Hours(2))});
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "b");
  clock.Advance(absl::Seconds(21));
  pool.UpdateQuota({Obs("a", "m", 0.6, clock.Now(), kT0 + absl::Hours(2))});
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "a");
}

QuotaObservation Bucket(const std::string& account, const std::string& group, const std::string& bucket,
                        double fraction, absl::Time observed, absl::Time reset) {
  return testing::BucketObservation(account, group, bucket, fraction, observed, reset);
}

TEST(PredictiveAdmission, StateFromCallerModelNamesIsBounded) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(On());
  pool.UpdateQuota({Obs("a", "m", 1.0, kT0, kT0 + absl::Hours(1))});
  for (int i = 0; i < 10'000; ++i) {
    absl::StatusOr<Selection> s = pool.Select(Req("made-up-" + std::to_string(i)));
    ASSERT_TRUE(s.ok());
    pool.ReleaseLease(s->lease_id);
  }
  EXPECT_LE(pool.TrackedModels(), 4096u);
  // Leases given back unused spent nothing.
  Explanation e = pool.Explain(Req("m"));
  EXPECT_NEAR(*e.accounts[0].estimated_fraction, 1.0, 1e-9);
}

TEST(QuotaBuckets, AWeeklyBucketAtZeroBlocksTheFamilyWhileItsFiveHourBucketIsPositive) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());
  pool.UpdateQuota({Obs("a", "claude-sonnet-4-6", 1.0, kT0, kT0 + absl::Hours(5)),  // the known lie
                    Bucket("a", "3p", "3p-5h", 0.9, kT0, kT0 + absl::Hours(5)),
                    Bucket("a", "3p", "3p-weekly", 0.0, kT0, kT0 + absl::Hours(100)),
                    Bucket("a", "gemini", "gemini-5h", 0.8, kT0, kT0 + absl::Hours(5))});
  EXPECT_EQ(pool.Select(Req("claude-sonnet-4-6"))->account_id, "b");
  EXPECT_EQ(pool.Select(Req("gpt-oss-120b"))->account_id, "b");
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "a");
  Explanation e = pool.Explain(Req("claude-sonnet-4-6"));
  ASSERT_EQ(e.accounts.back().account_id, "a");
  EXPECT_EQ(e.accounts.back().verdict, Verdict::kExhausted);
  EXPECT_THAT(e.accounts.back().detail, HasSubstr("bucket 3p-weekly"));
  EXPECT_EQ(e.accounts.back().available_at, kT0 + absl::Hours(100));
}

TEST(QuotaBuckets, EachBucketLearnsItsOwnCostAndTheTightestBinds) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(On());
  const absl::Time r5 = kT0 + absl::Hours(5), rw = kT0 + absl::Hours(100);
  pool.UpdateQuota({Bucket("a", "gemini", "gemini-5h", 1.0, kT0, r5), Bucket("a", "gemini", "gemini-weekly", 0.8, kT0, rw)});
  for (int i = 0; i < 10; ++i) {
    clock.Advance(absl::Seconds(1));
    ASSERT_TRUE(pool.Select(Req("gemini-3-flash")).ok()) << i;
  }
  clock.Advance(absl::Seconds(1));
  // Ten calls: 0.4 of the 5-hour bucket (0.04 each), 0.48 of the weekly one (0.048 each).
  pool.UpdateQuota({Bucket("a", "gemini", "gemini-5h", 0.6, clock.Now(), r5),
                    Bucket("a", "gemini", "gemini-weekly", 0.32, clock.Now(), rw)});
  // The weekly bucket binds: 0.32 at 0.048 a call lasts six calls above 0.05 (the 5-hour one, at
  // 0.04 from 0.6, would have allowed fourteen).
  int served = 0;
  while (pool.Select(Req("gemini-3-pro-high")).ok() && served < 100) ++served;
  EXPECT_EQ(served, 6);
  Explanation e = pool.Explain(Req("gemini-3-pro-high"));
  EXPECT_THAT(e.accounts[0].detail, HasSubstr("bucket gemini-weekly"));
  EXPECT_NEAR(*e.accounts[0].observed_fraction, 0.32, 1e-9);
}

TEST(QuotaOutcomes, AQuota429SpendsTheWholeFamilyUntilItsResetAndALaggingReadCannotUndoIt) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());
  const absl::Time reset = kT0 + absl::Hours(1);
  pool.UpdateQuota({Obs("a", "gemini-3-pro-high", 0.6, kT0, reset), Obs("a", "gemini-3-flash", 0.6, kT0, reset),
                    // an answer still naming a reset 20 s past: the quota API lags by 20 s
                    Obs("a", "claude-sonnet-4-6", 0.5, kT0, kT0 - absl::Seconds(20))});
  ASSERT_EQ(pool.quota_lag(), absl::Seconds(30));
  absl::StatusOr<Selection> s = pool.Select(Req("gemini-3-pro-high"));
  ASSERT_EQ(s->account_id, "a");
  Outcome o = Quota429("", "", "120");
  o.lease_id = s->lease_id;
  ASSERT_TRUE(pool.ReportOutcome(o).ok());
  // The flash model shares the bucket: not handed out into the same 429.
  EXPECT_EQ(pool.Select(Req("gemini-3-flash"))->account_id, "b");
  // An answer read within the lag of the 429 still shows the quota from before: ignored.
  clock.Advance(absl::Seconds(1));
  pool.UpdateQuota({Obs("a", "gemini-3-flash", 0.6, clock.Now(), reset)});
  EXPECT_EQ(pool.Select(Req("gemini-3-flash"))->account_id, "b");
  // At the reset the 429 named, the family is back.
  clock.Advance(absl::Seconds(120));
  EXPECT_EQ(pool.Select(Req("gemini-3-flash"))->account_id, "a");
}

TEST(QuotaOutcomes, AnOperatorsResetUndoesWhatAReported429MadeTheEstimateBelieve) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());
  const absl::Time reset = kT0 + absl::Hours(1);
  pool.UpdateQuota({Obs("a", "gemini-3-pro-high", 0.6, kT0, reset), Obs("a", "gemini-3-flash", 0.6, kT0, reset)});
  absl::StatusOr<Selection> s = pool.Select(Req("gemini-3-pro-high"));
  ASSERT_EQ(s->account_id, "a");
  Outcome o = Quota429("", "", "86400");  // a caller's report: the family spent for a day
  o.lease_id = s->lease_id;
  ASSERT_TRUE(pool.ReportOutcome(o).ok());
  ASSERT_EQ(pool.Select(Req("gemini-3-flash"))->account_id, "b");
  ASSERT_TRUE(pool.Reset(ResetRequest{"a", "gemini-3-pro-high", false}).ok());
  EXPECT_EQ(pool.Select(Req("gemini-3-flash"))->account_id, "a");
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "a");
}

TEST(QuotaOutcomes, AnAnswerStillShowingQuotaInTheWindowA429SpentTeachesTheLag) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.SetQuotaSettings(On());
  const absl::Time reset = kT0 + absl::Seconds(100);
  pool.UpdateQuota({Obs("a", "m", 0.5, kT0, reset)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_EQ(s->account_id, "a");
  Outcome o = Quota429("", "", "100");  // the window resets in 100 s, as the reading says
  o.lease_id = s->lease_id;
  ASSERT_TRUE(pool.ReportOutcome(o).ok());
  ASSERT_EQ(pool.quota_lag(), absl::ZeroDuration());
  // 2 s after the 429 the API still shows 0.4 left in that window: it is at least 2 s behind.
  clock.Advance(absl::Seconds(2));
  pool.UpdateQuota({Obs("a", "m", 0.4, clock.Now(), reset)});
  EXPECT_EQ(pool.quota_lag(), absl::Seconds(3));  // 2 s and half again
  // ...and that answer did not bring the account back.
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "b");
  // An answer of the next window teaches nothing of the kind.
  clock.Advance(absl::Seconds(10));
  pool.UpdateQuota({Obs("a", "m", 0.9, clock.Now(), reset + absl::Seconds(300))});
  EXPECT_EQ(pool.quota_lag(), absl::Seconds(3));
}

TEST(QuotaOutcomes, LessThanHalfACallLeftIsNoCallLeft) {
  FakeClock clock(kT0);
  QuotaSettings settings = On();
  settings.exhausted_threshold = 0;
  settings.low_threshold = 0;
  settings.call_cost_prior = 0.3;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro)});
  pool.SetQuotaSettings(settings);
  pool.UpdateQuota({Obs("a", "m", 1.0, kT0, kT0 + absl::Hours(1))});
  int served = 0;
  while (pool.Select(Req("m")).ok() && served < 10) ++served;
  EXPECT_EQ(served, 3);  // 1.0 → 0.7 → 0.4 → 0.1 (< 0.15): stop
}

}  // namespace
}  // namespace tokenbroker
