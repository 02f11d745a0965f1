#include "lib/quota/quota.h"

#include <thread>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/test_util.h"
#include "lib/selection/account_pool.h"
#include "lib/upstream/cloud_code_client.h"
#include "lib/selection/cooldowns.h"
#include "lib/monitor/quota_hub.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1795914000);

QuotaSettings On() {
  QuotaSettings s;
  s.enabled = true;
  return s;
}

TEST(DecideQuota, ThresholdsTtlAndReset) {
  QuotaSettings s = On();
  EXPECT_EQ(DecideQuota(s, 0.5, kT0, std::nullopt, kT0), QuotaDecision::kProceed);
  EXPECT_EQ(DecideQuota(s, 0.07, kT0, std::nullopt, kT0), QuotaDecision::kLow);
  EXPECT_EQ(DecideQuota(s, 0.9, kT0, std::nullopt, kT0), QuotaDecision::kProceed);
  EXPECT_EQ(DecideQuota(s, 0.02, kT0, std::nullopt, kT0), QuotaDecision::kExhausted);
  EXPECT_EQ(DecideQuota(s, 0.10, kT0, std::nullopt, kT0), QuotaDecision::kProceed);
  EXPECT_EQ(DecideQuota(s, 0.05, kT0, std::nullopt, kT0), QuotaDecision::kLow);
  // Older than cache_ttl: unknown.
  EXPECT_EQ(DecideQuota(s, 0.5, kT0, std::nullopt, kT0 + absl::Seconds(901)), QuotaDecision::kUnknown);
  // Exhausted, but its reset time has passed: unknown (it is probably back).
  EXPECT_EQ(DecideQuota(s, 0.0, kT0, kT0 + absl::Seconds(10), kT0 + absl::Seconds(11)), QuotaDecision::kUnknown);
  EXPECT_EQ(DecideQuota(QuotaSettings(), 0.0, kT0, std::nullopt, kT0), QuotaDecision::kUnknown);
}

TEST(ValidateQuotaSettings, NamesTheField) {
  QuotaSettings s = On();
  s.exhausted_threshold = 0.3;
  EXPECT_THAT(ValidateQuotaSettings(s).message(), HasSubstr("exhausted_threshold"));
  s = On();
  s.low_threshold = 1.5;
  EXPECT_THAT(ValidateQuotaSettings(s).message(), HasSubstr("low_threshold"));
  s = On();
  s.cache_ttl = absl::ZeroDuration();
  EXPECT_THAT(ValidateQuotaSettings(s).message(), HasSubstr("cache_ttl"));
  EXPECT_TRUE(ValidateQuotaSettings(On()).ok());
}

AccountRecord Account(const std::string& id, Tier tier) { return testing::MakeAccount(id, tier); }

QuotaObservation Obs(const std::string& account, const std::string& model, double fraction, absl::Time observed) {
  QuotaObservation o;
  o.account_id = account;
  o.model = model;
  o.remaining_fraction = fraction;
  o.observed = observed;
  return o;
}

SelectRequest Req(const std::string& model) {
  SelectRequest r;
  r.model = model;
  return r;
}

TEST(PoolQuota, ProceedLowProceedAndLowOnlyWhenNoProceedIsEligible) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("half", Tier::kPro), Account("low", Tier::kPro), Account("most", Tier::kPro)});
  pool.SetQuotaSettings(On());
  pool.UpdateQuota({Obs("half", "m", 0.5, kT0), Obs("low", "m", 0.07, kT0), Obs("most", "m", 0.9, kT0)});
  std::map<std::string, QuotaDecision> decisions;
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<Selection> s = pool.Select(Req("m"));
    ASSERT_TRUE(s.ok());
    decisions[s->account_id] = s->quota_decision;
    EXPECT_NE(s->account_id, "low");
    clock.Advance(absl::Milliseconds(10));
  }
  EXPECT_EQ(decisions["most"], QuotaDecision::kProceed);  // most quota first under balance
  Explanation e = pool.Explain(Req("m"));
  ASSERT_EQ(e.accounts.size(), 3u);
  EXPECT_EQ(e.accounts[2].account_id, "low");
  EXPECT_THAT(e.accounts[2].detail, HasSubstr("LOW"));
  // With both PROCEED accounts out (protected), the LOW one serves.
  AccountRecord half = Account("half", Tier::kPro);
  half.protected_models = {"m"};
  AccountRecord most = Account("most", Tier::kPro);
  most.protected_models = {"m"};
  pool.Load({half, Account("low", Tier::kPro), most});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->account_id, "low");
  EXPECT_EQ(s->quota_decision, QuotaDecision::kLow);
  EXPECT_DOUBLE_EQ(*s->remaining_fraction, 0.07);
}

TEST(PoolQuota, ExhaustedIsSkippedUntilValidationIsOffOrDataGoesStale) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kUltra), Account("b", Tier::kPro)});
  QuotaObservation a = Obs("a", "m", 0.02, kT0);
  a.reset_time = kT0 + absl::Hours(3);
  pool.UpdateQuota({a, Obs("b", "m", 0.8, kT0)});
  // Validation off: tiers alone.
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "a");
  pool.SetQuotaSettings(On());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(pool.Select(Req("m"))->account_id, "b");
  Explanation e = pool.Explain(Req("m"));
  EXPECT_EQ(e.accounts.back().verdict, Verdict::kExhausted);
  EXPECT_THAT(e.accounts.back().detail, HasSubstr("below exhausted_threshold"));
  EXPECT_EQ(e.accounts.back().available_at, kT0 + absl::Hours(3));
  // Stale data reads unknown.
  clock.Advance(absl::Seconds(901));
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  EXPECT_EQ(s->account_id, "a");
  EXPECT_EQ(s->quota_decision, QuotaDecision::kUnknown);
  pool.SetQuotaSettings(QuotaSettings());
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "a");
}

TEST(PoolQuota, QuotaComingBackEndsTheQuotaCooldown) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kUltra), Account("b", Tier::kPro)});
  pool.SetQuotaSettings(On());
  pool.UpdateQuota({Obs("a", "m", 0.0, kT0)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_EQ(s->account_id, "b");
  Outcome o;
  o.account_id = "a";
  o.model = "m";
  o.http_status = 429;
  o.retry_after = "7200";
  ASSERT_TRUE(pool.ReportOutcome(o).ok());
  clock.Advance(absl::Minutes(1));
  pool.UpdateQuota({Obs("a", "m", 0.9, clock.Now())});
  EXPECT_EQ(pool.Select(Req("m"))->account_id, "a");
}

TEST(PoolQuota, MonitorTierAndProjectUpdateTheAccount) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kUnknown)});
  QuotaObservation o = Obs("a", "", 0, kT0);
  o.tier = Tier::kUltra;
  o.project_id = "vivid-river-a1b2c";
  pool.UpdateQuota({o, Obs("ghost", "m", 1, kT0)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  EXPECT_EQ(s->tier, Tier::kUltra);
  EXPECT_EQ(s->project_id, "vivid-river-a1b2c");
}

TEST(QuotaHub, SnapshotFirstThenOnlyChanges) {
  QuotaHub hub;
  hub.Publish({Obs("a", "m", 0.5, kT0), Obs("b", "m", 0.6, kT0)});
  int wakes = 0;
  int64_t id = hub.Subscribe({}, [&] { ++wakes; });
  QuotaHub::Batch first = hub.Take(id);
  EXPECT_TRUE(first.snapshot);
  EXPECT_EQ(first.observations.size(), 2u);
  EXPECT_TRUE(hub.Take(id).observations.empty());
  hub.Publish({Obs("a", "m", 0.4, kT0 + absl::Seconds(1))});
  EXPECT_EQ(wakes, 1);
  QuotaHub::Batch next = hub.Take(id);
  EXPECT_FALSE(next.snapshot);
  ASSERT_EQ(next.observations.size(), 1u);
  EXPECT_DOUBLE_EQ(next.observations[0].remaining_fraction, 0.4);
}

TEST(QuotaHub, AStalledSubscriberHoldsOneEntryPerKeyAndGetsTheLatest) {
  QuotaHub hub;
  int64_t stalled = hub.Subscribe({}, nullptr);
  hub.Take(stalled);  // snapshot read, then it stops reading
  int64_t live = hub.Subscribe({}, nullptr);
  hub.Take(live);
  for (int i = 0; i < 100'000; ++i) {
    hub.Publish({Obs("acct-" + std::to_string(i % 50), "m", (i % 1000) / 1000.0, kT0 + absl::Milliseconds(i))});
    if (i % 10'000 == 0) {
      EXPECT_LE(hub.PendingFor(live), 50u);
      hub.Take(live);
    }
  }
  EXPECT_EQ(hub.PendingFor(stalled), 50u);
  EXPECT_EQ(hub.size(), 50u);
  QuotaHub::Batch late = hub.Take(stalled);
  ASSERT_EQ(late.observations.size(), 50u);
  for (const QuotaObservation& o : late.observations) EXPECT_GE(o.observed, kT0 + absl::Milliseconds(99'950));
}

TEST(QuotaHub, FilterAndUnsubscribe) {
  QuotaHub hub;
  int64_t id = hub.Subscribe({"a"}, nullptr);
  hub.Publish({Obs("a", "m", 0.5, kT0), Obs("b", "m", 0.6, kT0)});
  QuotaHub::Batch b = hub.Take(id);
  ASSERT_EQ(b.observations.size(), 1u);
  EXPECT_EQ(b.observations[0].account_id, "a");
  hub.Unsubscribe(id);
  EXPECT_EQ(hub.subscribers(), 0u);
}

TEST(CloudCodeParsers, LoadCodeAssistAndAvailableModels) {
  absl::StatusOr<CodeAssistInfo> info = ParseLoadCodeAssist(R"({"cloudaicompanionProject": "vivid-river-a1b2c",
    "currentTier": {"id": "free-tier", "name": "Gemini Code Assist for individuals"},
    "paidTier": {"id": "g1-ultra-tier", "name": "Google AI Ultra"},
    "allowedTiers": [{"id": "free-tier", "isDefault": true}]})");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->project_id, "vivid-river-a1b2c");
  EXPECT_EQ(info->tier, Tier::kUltra);
  absl::StatusOr<CodeAssistInfo> none = ParseLoadCodeAssist(R"({"currentTier": {"id": "free-tier"}})");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->project_id, "");  // never made up
  EXPECT_EQ(none->tier, Tier::kFree);
  EXPECT_FALSE(ParseLoadCodeAssist("nope").ok());

  absl::StatusOr<std::vector<ModelQuotaInfo>> models = ParseAvailableModels(R"({"models": {
   "gemini-3-pro-high": {"displayName": "Gemini 3 Pro", "quotaInfo": {"remainingFraction": 0.62, "resetTime": "2026-11-29T04:00:00Z"}},
   "claude-sonnet-4-6-thinking": {"quotaInfo": {"resetTime": "2026-11-29T01:12:30Z"}}},
   "deprecatedModelIds": {"gemini-2.5-pro": {"newModelId": "gemini-3-pro-high"}}})");
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 2u);
  EXPECT_EQ((*models)[0].model, "claude-sonnet-4-6-thinking");
  EXPECT_DOUBLE_EQ((*models)[0].remaining_fraction, 0.0);  // no remainingFraction: at 0
  EXPECT_DOUBLE_EQ((*models)[1].remaining_fraction, 0.62);
  EXPECT_EQ((*models)[1].reset_time, absl::FromUnixSeconds(1795924800));
}

}  // namespace
}  // namespace tokenbroker
