// Issue 13: quota as Google counts it since 2026 — the model family map, the bucket rule (a table
// of cases, stale and out-of-order observations included), family cooldowns (family-wide 429s and
// caller-named quota groups) and suspended accounts, through AccountPool on a fake clock.
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/quota/family_map.h"
#include "lib/selection/account_pool.h"
#include "lib/selection/cooldowns.h"
#include "lib/tokens/account_store.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

const absl::Time kT0 = absl::FromUnixSeconds(1795914000);

SelectRequest Req(const std::string& model, const std::string& group = "") {
  SelectRequest r;
  r.model = model;
  r.quota_group = group;
  return r;
}

QuotaObservation Bucket(const std::string& account, const std::string& group, const std::string& bucket,
                        double fraction, absl::Time observed, absl::Time reset) {
  return testing::BucketObservation(account, group, bucket, fraction, observed, reset);
}

QuotaObservation ModelObs(const std::string& account, const std::string& model, double fraction, absl::Time observed,
                          QuotaSource source = QuotaSource::kAvailableModels) {
  QuotaObservation o;
  o.account_id = account;
  o.model = model;
  o.remaining_fraction = fraction;
  o.observed = observed;
  o.reset_time = observed + absl::Hours(5);
  o.source = source;
  return o;
}

const char kWeekly429[] = R"({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
  "message": "Individual quota reached for claude models. Resets in 108h48m29s.",
  "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "QUOTA_EXHAUSTED",
     "metadata": {"model": "claude-sonnet-4-6", "quotaResetDelay": "108h48m29s", "uiMessage": "true"}}]}})";
const char kModel429[] = R"({"error":{"code":429,"message":"You have exhausted your capacity on this model.",
  "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED"}]}})";
const char kTos403[] = R"({"error": {"code": 403, "status": "PERMISSION_DENIED",
  "message": "This service has been disabled in this account for violation of Terms of Service."}})";

// --- the family map ---

TEST(FamilyMap, DefaultsPutModelsInTheirQuotaFamilies) {
  const FamilyMap& m = *FamilyMap::Default();
  EXPECT_EQ(m.Of("gemini-3-pro-high"), "gemini");
  EXPECT_EQ(m.Of("gemini-3-flash"), "gemini");
  EXPECT_EQ(m.Of("claude-sonnet-4-6-thinking"), "3p");
  EXPECT_EQ(m.Of("Claude-Opus-4-6"), "3p");
  EXPECT_EQ(m.Of("gpt-oss-120b"), "3p");
  EXPECT_EQ(m.Of("anthropic/claude-haiku"), "3p");
  EXPECT_EQ(m.Of("gemini-3-pro-image"), "image");
  EXPECT_EQ(m.Of("imagen-4"), "image");
  EXPECT_EQ(m.Of("some-new-model"), "gemini");
  EXPECT_EQ(m.Of(""), "gemini");
  EXPECT_EQ(m.OfGroup("3p"), "3p");
  EXPECT_EQ(m.OfGroup("gemini"), "gemini");
  EXPECT_EQ(m.OfGroup("claude"), "3p");  // a group id read as a model name
}

TEST(FamilyMap, AnOperatorsFileGoesBeforeTheDefaultsAndLeavesTheRest) {
  absl::StatusOr<std::shared_ptr<const FamilyMap>> m = FamilyMap::Parse(R"(
# Flash models have their own quota on our plan
gemini-*-flash*   gemini-flash
claude-opus*      opus
)");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->Of("gemini-3-flash"), "gemini-flash");
  EXPECT_EQ((*m)->Of("GEMINI-3-FLASH-LITE"), "gemini-flash");
  EXPECT_EQ((*m)->Of("gemini-3-pro-high"), "gemini");
  EXPECT_EQ((*m)->Of("claude-opus-4-6"), "opus");
  EXPECT_EQ((*m)->Of("claude-sonnet-4-6"), "3p");
  EXPECT_EQ((*m)->OfGroup("opus"), "opus");
}

TEST(FamilyMap, BadLinesAreRefusedNamingTheLineAndField) {
  struct Case {
    std::string text;
    std::string error;
  } cases[] = {
      {"gemini*", "line 1: expected \"<pattern> <family>\" (two fields), got 1"},
      {"\n\ngemini* a b", "line 3: expected"},
      {"gem ini x", "line 1: expected"},
      {"gemini$ gemini", "line 1: pattern must be"},
      {"gemini* Gemini", "line 1: family must be"},
      {"gemini* " + std::string(65, 'a'), "line 1: family must be"},
      {std::string(129, 'a') + " x", "line 1: pattern must be"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::shared_ptr<const FamilyMap>> m = FamilyMap::Parse(c.text);
    ASSERT_FALSE(m.ok()) << c.text;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(m.status().message(), HasSubstr(c.error)) << c.text;
  }
  std::string many;
  for (int i = 0; i <= 256; ++i) many += "m" + std::to_string(i) + " f\n";
  EXPECT_THAT(FamilyMap::Parse(many).status().message(), HasSubstr("more than 256 rules"));
  EXPECT_EQ(FamilyMap::Load("/nonexistent/families").status().code(), absl::StatusCode::kNotFound);
}

TEST(FamilyMap, GlobIsLinearAndCaseInsensitive) {
  EXPECT_TRUE(GlobMatch("*", ""));
  EXPECT_TRUE(GlobMatch("a*b*c", "AxxBxxC"));
  EXPECT_FALSE(GlobMatch("a*b*c", "axxbxx"));
  EXPECT_TRUE(GlobMatch("*image*", "gemini-3-pro-IMAGE-preview"));
  EXPECT_FALSE(GlobMatch("claude*", "xclaude"));
  // A hostile pattern against a long name ends (one backtrack point, no exponential search).
  EXPECT_FALSE(GlobMatch("*a*a*a*a*a*a*a*a*b", std::string(128, 'a')));
}

// Of() remembers answers per thread (issue 15): two maps asked about the same model on one thread
// each answer by their own rules, a map made later never sees an older map's answers, and many
// made-up model names (callers choose them) keep giving the right answer past the memo's size.
TEST(FamilyMap, RememberedAnswersBelongToTheirMap) {
  absl::StatusOr<std::shared_ptr<const FamilyMap>> custom = FamilyMap::Parse("gemini-3-pro* premium\n");
  ASSERT_TRUE(custom.ok()) << custom.status();
  const FamilyMap& defaults = *FamilyMap::Default();
  for (int round = 0; round < 3; ++round) {
    EXPECT_EQ(defaults.Of("gemini-3-pro-high"), "gemini");
    EXPECT_EQ((*custom)->Of("gemini-3-pro-high"), "premium");
  }
  for (int i = 0; i < 1000; ++i) {
    const std::string model = (i % 2 ? "claude-made-up-" : "gemini-3-pro-made-up-") + std::to_string(i);
    ASSERT_EQ((*custom)->Of(model), i % 2 ? "3p" : "premium") << model;
    ASSERT_EQ(defaults.Of(model), i % 2 ? "3p" : "gemini") << model;
  }
  // Answers on another thread are its own.
  std::string other;
  std::thread([&] { other = std::string((*custom)->Of("gemini-3-pro-high")); }).join();
  EXPECT_EQ(other, "premium");
  // A long name is answered, not remembered.
  EXPECT_EQ(defaults.Of(std::string(300, 'x') + "claude"), "3p");
}

// --- the bucket rule, as a table ---

struct BucketCase {
  const char* name;
  std::vector<QuotaObservation> observations;  // applied in this order
  absl::Duration later;                        // then the clock moves on this far
  const char* model;
  bool exhausted;
};

TEST(QuotaBuckets, TableOfCases) {
  const absl::Time r5 = kT0 + absl::Hours(5), rw = kT0 + absl::Hours(100);
  const absl::Time t1 = kT0 + absl::Minutes(1), t2 = kT0 + absl::Minutes(2);
  const BucketCase cases[] = {
      {"weekly 0 wins over a positive 5-hour bucket",
       {Bucket("a", "gemini", "gemini-5h", 0.6, kT0, r5), Bucket("a", "gemini", "gemini-weekly", 0.0, kT0, rw)},
       absl::ZeroDuration(), "gemini-3-pro-high", true},
      {"the other family is untouched",
       {Bucket("a", "gemini", "gemini-5h", 0.6, kT0, r5), Bucket("a", "gemini", "gemini-weekly", 0.0, kT0, rw)},
       absl::ZeroDuration(), "claude-sonnet-4-6", false},
      {"a 5-hour bucket at 0 blocks too",
       {Bucket("a", "3p", "3p-5h", 0.01, kT0, r5), Bucket("a", "3p", "3p-weekly", 0.9, kT0, rw)},
       absl::ZeroDuration(), "gpt-oss-120b", true},
      {"both buckets positive", {Bucket("a", "gemini", "gemini-5h", 0.6, kT0, r5), Bucket("a", "gemini", "gemini-weekly", 0.5, kT0, rw)},
       absl::ZeroDuration(), "gemini-3-flash", false},
      {"a newer observation of the bucket moves it",
       {Bucket("a", "gemini", "gemini-weekly", 0.0, kT0, rw), Bucket("a", "gemini", "gemini-weekly", 0.7, t1, rw + absl::Hours(168))},
       absl::ZeroDuration(), "gemini-3-pro-high", false},
      {"an older observation arriving late does not",
       {Bucket("a", "gemini", "gemini-weekly", 0.0, t2, rw), Bucket("a", "gemini", "gemini-weekly", 0.7, t1, rw)},
       absl::ZeroDuration(), "gemini-3-pro-high", true},
      {"the 3p lie of fetchAvailableModels never clears a 3p bucket",
       {Bucket("a", "3p", "3p-weekly", 0.0, kT0, rw), ModelObs("a", "claude-sonnet-4-6", 1.0, t1)},
       absl::ZeroDuration(), "claude-sonnet-4-6", true},
      {"the weekly reset passed: the bucket is full again",
       {Bucket("a", "gemini", "gemini-weekly", 0.0, kT0, kT0 + absl::Minutes(10))},
       absl::Minutes(11), "gemini-3-pro-high", false},
      {"stale data (older than cache_ttl) reads as unknown, not exhausted",
       {Bucket("a", "gemini", "gemini-weekly", 0.0, kT0, rw)},
       absl::Minutes(16), "gemini-3-pro-high", false},
  };
  for (const BucketCase& c : cases) {
    FakeClock clock(kT0 + absl::Minutes(3));
    AccountPool pool(PoolOptions(), clock);
    pool.Load({testing::MakeAccount("a", Tier::kPro)});
    QuotaSettings on;
    on.enabled = true;
    pool.SetQuotaSettings(on);
    pool.UpdateQuota(c.observations);
    clock.Advance(c.later);
    Explanation e = pool.Explain(Req(c.model));
    ASSERT_EQ(e.accounts.size(), 1u);
    EXPECT_EQ(e.accounts[0].verdict == Verdict::kExhausted, c.exhausted) << c.name << ": " << e.accounts[0].detail;
  }
}

// --- family cooldowns ---

TEST(FamilyCooldowns, AWeekly429OnOneModelCoolsItsFamilyOnThatAccountOnly) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  // Quota validation is off (the default): the cooldown alone must do it.
  absl::StatusOr<Selection> s = pool.Select(Req("claude-sonnet-4-6"));
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(s->account_id, "a");
  Outcome o;
  o.lease_id = s->lease_id;
  o.http_status = 429;
  o.error_body = kWeekly429;
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scope, CooldownScope::kFamily);
  EXPECT_EQ(r->family, "3p");
  EXPECT_GE(r->until - kT0, absl::Hours(108));
  EXPECT_EQ(pool.Select(Req("claude-opus-4-6"))->account_id, "b");
  EXPECT_EQ(pool.Select(Req("gpt-oss-120b"))->account_id, "b");
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "a");
  Explanation e = pool.Explain(Req("claude-opus-4-6"));
  EXPECT_EQ(e.accounts.back().account_id, "a");
  EXPECT_EQ(e.accounts.back().verdict, Verdict::kCooldown);
  EXPECT_THAT(e.accounts.back().detail, HasSubstr("model family 3p cooling down until"));
  // ListAccounts shows it as the family's.
  std::vector<AccountView> list = pool.List();
  ASSERT_EQ(list[0].cooldowns.size(), 1u);
  EXPECT_TRUE(list[0].cooldowns[0].family);
  EXPECT_EQ(list[0].cooldowns[0].model, "3p");
  // An operator's reset of one model of the family lifts it.
  ResetRequest reset;
  reset.account_id = "a";
  reset.model = "claude-opus-4-6";
  EXPECT_TRUE(pool.Reset(reset)->cooldown_lifted);
  EXPECT_EQ(pool.Select(Req("claude-opus-4-6"))->account_id, "a");
}

TEST(FamilyCooldowns, AModelsOwn429CoolsTheModelOnly) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  absl::StatusOr<Selection> s = pool.Select(Req("claude-sonnet-4-6"));
  Outcome o;
  o.lease_id = s->lease_id;
  o.http_status = 429;
  o.error_body = kModel429;
  EXPECT_EQ(pool.ReportOutcome(o)->scope, CooldownScope::kModel);
  EXPECT_EQ(pool.Select(Req("claude-sonnet-4-6"))->account_id, "b");
  EXPECT_EQ(pool.Select(Req("claude-opus-4-6"))->account_id, "a");
}

TEST(FamilyCooldowns, AQuotaGroupIsHonouredOnTopOfTheMapNeverInsteadOfIt) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  // A quota 429 on a lease whose request named group "pro": the group cools on that account.
  absl::StatusOr<Selection> s = pool.Select(Req("gemini-3-pro-high", "pro"));
  ASSERT_EQ(s->account_id, "a");
  Outcome o;
  o.lease_id = s->lease_id;
  o.http_status = 429;
  o.error_body = kModel429;
  ASSERT_TRUE(pool.ReportOutcome(o).ok());
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-low", "pro"))->account_id, "b");
  // Without the group the other model is not blocked; the reported model is.
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-low"))->account_id, "a");
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "b");
  // A family cooldown cannot be escaped by naming another group.
  s = pool.Select(Req("claude-sonnet-4-6"));
  ASSERT_EQ(s->account_id, "a");
  o.lease_id = s->lease_id;
  o.error_body = kWeekly429;
  ASSERT_EQ(pool.ReportOutcome(o)->scope, CooldownScope::kFamily);
  EXPECT_EQ(pool.Select(Req("claude-opus-4-6", "anything-else"))->account_id, "b");
}

TEST(FamilyCooldowns, CallerNamedGroupsAreBoundedPerAccount) {
  Cooldowns c{CooldownPolicy()};
  UpstreamError e;
  e.kind = FailureKind::kQuotaExhausted;
  e.delay = absl::Hours(1);
  for (int i = 0; i < 1000; ++i) {
    const std::string group = "g" + std::to_string(i);
    c.Apply("a", "m", e, kT0 + absl::Seconds(i), "", FamilyRef{"gemini", group});
  }
  size_t families = 0;
  for (const CooldownView& v : c.List("a", kT0)) families += v.family ? 1 : 0;
  EXPECT_EQ(families, Cooldowns::kMaxFamiliesPerAccount);
}

TEST(FamilyCooldowns, ReplicasShareThemAsFamilyItems) {
  Cooldowns here{CooldownPolicy()}, there{CooldownPolicy()};
  UpstreamError e;
  e.kind = FailureKind::kQuotaExhausted;
  e.family_wide = true;
  e.delay = absl::Hours(100);
  here.Apply("a", "claude-sonnet-4-6", e, kT0, "", FamilyRef{"3p", ""});
  std::optional<CooldownState> state = here.Export("a");
  ASSERT_TRUE(state.has_value());
  there.Merge("a", *state);
  EXPECT_TRUE(there.Check("a", "claude-opus-4-6", kT0 + absl::Hours(1), FamilyRef{"3p", ""}).has_value());
  EXPECT_FALSE(there.Check("a", "claude-opus-4-6", kT0 + absl::Hours(1)).has_value());  // no family: a model named "3p" is not it
  EXPECT_FALSE(there.Check("a", "3p", kT0 + absl::Hours(1)).has_value());
}

// --- suspended accounts ---

TEST(Suspension, AReportedTermsOfService403BlocksTheAccountButNeverSuspendsIt) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  absl::StatusOr<Selection> s = pool.Select(Req("gemini-3-pro-high"));
  Outcome o;
  o.lease_id = s->lease_id;
  o.http_status = 403;
  o.error_body = kTos403;
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scope, CooldownScope::kAccount);
  EXPECT_THAT(r->reason, HasSubstr("suspended (Terms of Service) reported"));
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "b");
  EXPECT_FALSE(pool.List()[0].suspended);
  EXPECT_FALSE(pool.List()[0].disabled);
  clock.Advance(absl::Hours(1) + absl::Seconds(1));
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "a");  // the probe
}

TEST(Suspension, AConfirmedSuspensionIsNeverHandedOutUntilAnOperatorEnablesIt) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  EXPECT_TRUE(pool.Suspend("a", "This service has been disabled in this account for violation of Terms of Service."));
  EXPECT_FALSE(pool.Suspend("a", "again"));  // once
  for (int i = 0; i < 5; ++i) EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "b");
  Explanation e = pool.Explain(Req("gemini-3-pro-high"));
  EXPECT_EQ(e.accounts.back().verdict, Verdict::kSuspended);
  EXPECT_THAT(e.accounts.back().detail, HasSubstr("suspended by Google (Terms of Service): This service has been disabled"));
  // A reload of the files (which could not record it) keeps it.
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  EXPECT_TRUE(pool.List()[0].suspended);
  ResetRequest enable;
  enable.account_id = "a";
  enable.enable = true;
  EXPECT_TRUE(pool.Reset(enable)->enabled);
  EXPECT_FALSE(pool.List()[0].suspended);
  EXPECT_EQ(pool.Select(Req("gemini-3-pro-high"))->account_id, "a");
}

TEST(Suspension, ReplicasLearnItFromTheSharedDisable) {
  FakeClock clock(kT0);
  AccountPool pool(PoolOptions(), clock);
  pool.Load({testing::MakeAccount("a", Tier::kUltra), testing::MakeAccount("b", Tier::kFree)});
  pool.OnRemoteDisable("a", SuspendedReason("violation of Terms of Service"));
  pool.OnRemoteDisable("b", "invalid_grant");  // an ordinary disable stays one
  std::vector<AccountView> list = pool.List();
  EXPECT_TRUE(list[0].suspended);
  EXPECT_EQ(list[0].suspension_message, "violation of Terms of Service");
  EXPECT_FALSE(list[1].suspended);
  EXPECT_TRUE(list[1].disabled);
}

TEST(Suspension, TheAccountFileKeepsItAndAnEnableClearsIt) {
  testing::TempDir dir;
  const std::string path = dir.Join("a.json");
  testing::WriteText(path, R"({"email":"a@example.com","token":{"refresh_token":"rt-a"},"custom":1})");
  absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  AccountUpdate suspend;
  suspend.disabled_reason = SuspendedReason("violation of Terms of Service");
  suspend.suspended = true;
  ASSERT_TRUE((*store)->Update("a", suspend).ok());
  LoadResult loaded = (*store)->LoadAll();
  ASSERT_EQ(loaded.accounts.size(), 1u);
  EXPECT_TRUE(loaded.accounts[0].suspended);
  EXPECT_TRUE(loaded.accounts[0].disabled);
  EXPECT_EQ(loaded.accounts[0].suspension_message, "violation of Terms of Service");
  AccountUpdate enable;
  enable.enable = true;
  ASSERT_TRUE((*store)->Update("a", enable).ok());
  loaded = (*store)->LoadAll();
  EXPECT_FALSE(loaded.accounts[0].suspended);
  EXPECT_FALSE(loaded.accounts[0].disabled);
  // A file an operator wrote by hand: "suspended": true alone is enough.
  testing::WriteText(path, R"({"email":"a@example.com","token":{"refresh_token":"rt-a"},"suspended":true})");
  loaded = (*store)->LoadAll();
  EXPECT_TRUE(loaded.accounts[0].suspended);
  EXPECT_TRUE(loaded.accounts[0].disabled);
  testing::WriteText(path, R"({"email":"a@example.com","token":{"refresh_token":"rt-a"},"suspended":"yes"})");
  loaded = (*store)->LoadAll();
  ASSERT_EQ(loaded.problems.size(), 1u);
  EXPECT_THAT(loaded.problems[0].reason, HasSubstr("suspended"));
}

}  // namespace
}  // namespace tokenbroker
