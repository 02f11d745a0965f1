// The simulator's fake Google quota (tests/fakes/fake_quota.h): what the load driver's numbers
// stand on. Time is a FakeClock; nothing sleeps.
#include "tests/fakes/fake_quota.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/upstream/http_client.h"
#include "lib/common/upstream_error.h"
#include "nlohmann/json.hpp"
#include "tests/fakes/fake_upstream.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using testing::AccountQuotaProfile;
using testing::FakeQuota;
using testing::FakeQuotaConfig;
using testing::ParseFakeQuotaConfig;
using Json = nlohmann::json;

constexpr char kGemini[] = "gemini-3-pro-high";
constexpr char kClaude[] = "claude-sonnet-4-6-thinking";

// Short window 10 s with 3 calls, long window 100 s with 5 calls, for every tier and family.
FakeQuotaConfig SmallConfig() {
  FakeQuotaConfig c;
  c.enabled = true;
  c.short_window = absl::Seconds(10);
  c.long_window = absl::Seconds(100);
  for (const char* tier : {"ULTRA", "PRO", "FREE"}) c.tier_budgets[tier] = {{"gemini", {3, 5}}, {"3p", {3, 5}}};
  return c;
}

const AccountQuotaProfile kUltra{"ULTRA", {}};

int Call(FakeQuota& quota, const std::string& model, const std::string& account = "rt-a") {
  return quota.Generate(account, kUltra, model)->status;
}

// remainingFraction and resetTime of `model` in fetchAvailableModels' "models" object.
std::pair<double, absl::Time> Reported(const FakeQuota& quota, const std::string& model) {
  Json models = Json::parse(*quota.AvailableModelsJson("rt-a", kUltra, "{}"));
  const Json& info = models.at(model).at("quotaInfo");
  absl::Time reset;
  std::string err;
  EXPECT_TRUE(absl::ParseTime(absl::RFC3339_full, info.at("resetTime").get<std::string>(), &reset, &err)) << err;
  return {info.at("remainingFraction").get<double>(), reset};
}

Json FamilyStats(const FakeQuota& quota, const std::string& family, const std::string& account = "rt-a") {
  return Json::parse(quota.StatsJson()).at("accounts").at(account).at("families").at(family);
}

TEST(FakeQuota, OffUntilConfigured) {
  FakeClock clock;
  FakeQuota quota(clock);
  EXPECT_FALSE(quota.Generate("rt-a", kUltra, kGemini).has_value());
  EXPECT_FALSE(quota.AvailableModelsJson("rt-a", kUltra, "{}").has_value());
  EXPECT_FALSE(quota.QuotaSummaryJson("rt-a", kUltra).has_value());
}

TEST(FakeQuota, FamiliesByDefaultRules) {
  FakeClock clock;
  FakeQuota quota(clock);
  EXPECT_EQ(quota.FamilyOf("claude-opus-4-5-thinking"), "3p");
  EXPECT_EQ(quota.FamilyOf("gpt-oss-120b-medium"), "3p");
  EXPECT_EQ(quota.FamilyOf("gemini-3-flash"), "gemini");
  EXPECT_EQ(quota.FamilyOf("anything-else"), "gemini");
}

TEST(FakeQuota, DrainsTo429AtExactlyTheBudgetAndThe429SpendsNothing) {
  FakeClock clock;
  FakeQuota quota(clock);
  quota.Configure(SmallConfig());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Call(quota, kGemini), 200) << i;
    clock.Advance(absl::Milliseconds(100));
  }
  EXPECT_EQ(Call(quota, kGemini), 429);
  EXPECT_EQ(Call(quota, "gemini-3-flash"), 429);  // the same family, the same windows
  Json stats = FamilyStats(quota, "gemini");
  EXPECT_EQ(stats["served"], 3);
  EXPECT_EQ(stats["refused"], 2);
  EXPECT_EQ(stats["windows"]["short"]["spent"], 3);
  EXPECT_EQ(stats["windows"]["long"]["spent"], 3);
  EXPECT_EQ(stats["windows"]["short"]["exhausted"].size(), 1u);
}

TEST(FakeQuota, The429ParsesAsAQuotaCooldownOfTheExactDelay) {
  FakeClock clock;
  FakeQuota quota(clock);
  quota.Configure(SmallConfig());
  for (int i = 0; i < 3; ++i) ASSERT_EQ(Call(quota, kGemini), 200);  // the window started now
  clock.Advance(absl::Milliseconds(1250));
  std::optional<FakeQuota::Reply> r = quota.Generate("rt-a", kUltra, kGemini);
  ASSERT_EQ(r->status, 429);
  EXPECT_THAT(r->body, HasSubstr("Your quota will reset after 8.75s."));
  Json body = Json::parse(r->body);
  EXPECT_EQ(body["error"]["status"], "RESOURCE_EXHAUSTED");
  EXPECT_EQ(body["error"]["details"][0]["metadata"]["quotaResetDelay"], "8.75s");
  EXPECT_EQ(body["error"]["details"][1]["retryDelay"], "8.75s");

  UpstreamError e = ParseUpstreamError(429, "", r->body, clock.Now());
  EXPECT_EQ(e.kind, FailureKind::kQuotaExhausted);
  EXPECT_EQ(e.reason, "QUOTA_EXHAUSTED");
  EXPECT_EQ(e.model, kGemini);
  ASSERT_TRUE(e.delay.has_value());
  EXPECT_EQ(*e.delay, absl::Milliseconds(8750));
}

TEST(FakeQuota, ResetsOnTimeAndCountsHowFullTheWindowWas) {
  FakeClock clock;
  FakeQuota quota(clock);
  quota.Configure(SmallConfig());
  for (int i = 0; i < 3; ++i) ASSERT_EQ(Call(quota, kGemini), 200);
  clock.Advance(absl::Seconds(10) - absl::Milliseconds(1));
  EXPECT_EQ(Call(quota, kGemini), 429);
  clock.Advance(absl::Milliseconds(1));
  EXPECT_EQ(Call(quota, kGemini), 200);
  Json shortw = FamilyStats(quota, "gemini")["windows"]["short"];
  EXPECT_EQ(shortw["completed"], 1);
  EXPECT_EQ(shortw["used_at_reset"], Json::array({1.0}));
  EXPECT_EQ(shortw["spent"], 1);
}

TEST(FakeQuota, AnUnusedBucketReadsFullUntilALengthFromNow) {
  FakeClock clock;
  FakeQuota quota(clock);
  quota.Configure(SmallConfig());
  auto [fraction, reset] = Reported(quota, kGemini);
  EXPECT_EQ(fraction, 1.0);
  EXPECT_EQ(reset, clock.Now() + absl::Seconds(10));
}

TEST(FakeQuota, TheQuotaApiLagsByTheConfiguredTime) {
  FakeClock clock;
  FakeQuota quota(clock);
  FakeQuotaConfig c = SmallConfig();
  c.lag = absl::Seconds(2);
  quota.Configure(c);
  const absl::Time start = clock.Now();
  ASSERT_EQ(Call(quota, kGemini), 200);
  clock.Advance(absl::Seconds(1));
  ASSERT_EQ(Call(quota, kGemini), 200);
  EXPECT_EQ(Reported(quota, kGemini).first, 1.0);  // as of 1 s before the first spend
  clock.Advance(absl::Seconds(1));
  auto [fraction, reset] = Reported(quota, kGemini);
  EXPECT_DOUBLE_EQ(fraction, 2.0 / 3.0);  // the first spend only
  EXPECT_EQ(reset, start + absl::Seconds(10));
  clock.Advance(absl::Seconds(1));
  EXPECT_DOUBLE_EQ(Reported(quota, kGemini).first, 1.0 / 3.0);
  // Past the reset the lagged view still shows the old window until the lag has passed too.
  ASSERT_EQ(Call(quota, kGemini), 200);
  clock.Set(start + absl::Seconds(11));
  EXPECT_EQ(Reported(quota, kGemini).first, 0.0);
  clock.Set(start + absl::Seconds(12));
  EXPECT_DOUBLE_EQ(Reported(quota, kGemini).first, 2.0 / 5.0);  // the short window is back; the long one shows
}

TEST(FakeQuota, FamiliesAreIsolated) {
  FakeClock clock;
  FakeQuota quota(clock);
  quota.Configure(SmallConfig());
  for (int i = 0; i < 3; ++i) ASSERT_EQ(Call(quota, kGemini), 200);
  EXPECT_EQ(Call(quota, kGemini), 429);
  EXPECT_EQ(Call(quota, kClaude), 200);
  EXPECT_EQ(Call(quota, kGemini, "rt-b"), 200);  // and accounts too
  EXPECT_EQ(Reported(quota, kGemini).first, 0.0);
  EXPECT_DOUBLE_EQ(Reported(quota, kClaude).first, 2.0 / 3.0);
}

TEST(FakeQuota, TheLongWindowBlocksWhileTheShortOneIsPositive) {
  FakeClock clock;
  FakeQuota quota(clock);
  quota.Configure(SmallConfig());
  const absl::Time start = clock.Now();
  for (int i = 0; i < 3; ++i) ASSERT_EQ(Call(quota, kClaude), 200);
  clock.Advance(absl::Seconds(10));
  for (int i = 0; i < 2; ++i) ASSERT_EQ(Call(quota, kClaude), 200);  // 5 of 5 in the long window
  clock.Advance(absl::Seconds(1));
  std::optional<FakeQuota::Reply> r = quota.Generate("rt-a", kUltra, kClaude);
  ASSERT_EQ(r->status, 429);
  EXPECT_THAT(r->body, HasSubstr("Individual quota reached for claude models. Resets in 1m29s."));
  UpstreamError e = ParseUpstreamError(429, "", r->body, clock.Now());
  EXPECT_EQ(e.kind, FailureKind::kQuotaExhausted);
  EXPECT_EQ(*e.delay, absl::Seconds(89));

  // The summary shows both windows; fetchAvailableModels the least of them, or the short one alone.
  Json summary = Json::parse(*quota.QuotaSummaryJson("rt-a", kUltra));
  Json groups = summary["groups"];
  ASSERT_EQ(groups.size(), 2u);
  const Json& p3 = groups[0]["groupId"] == "3p" ? groups[0] : groups[1];
  EXPECT_EQ(p3["buckets"][0]["bucketId"], "3p-10s");
  EXPECT_DOUBLE_EQ(p3["buckets"][0]["remainingFraction"].get<double>(), 1.0 / 3.0);
  EXPECT_EQ(p3["buckets"][1]["window"], "1m40s");
  EXPECT_EQ(p3["buckets"][1]["remainingFraction"], 0.0);
  auto [fraction, reset] = Reported(quota, kClaude);
  EXPECT_EQ(fraction, 0.0);
  EXPECT_EQ(reset, start + absl::Seconds(100));

  FakeQuotaConfig short_only = SmallConfig();
  short_only.min_over_windows = false;
  quota.Configure(short_only);
  EXPECT_EQ(Reported(quota, kClaude).first, 1.0);  // afresh, and the short window alone
}

TEST(FakeQuota, Lie3pReportsFullForThirdPartyModelsOnly) {
  FakeClock clock;
  FakeQuota quota(clock);
  FakeQuotaConfig c = SmallConfig();
  c.lie_3p = true;
  quota.Configure(c);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(Call(quota, kClaude), 200);
    ASSERT_EQ(Call(quota, kGemini), 200);
  }
  EXPECT_EQ(Call(quota, kClaude), 429);
  EXPECT_EQ(Reported(quota, kClaude).first, 1.0);
  EXPECT_EQ(Reported(quota, kGemini).first, 0.0);
}

TEST(FakeQuota, TierBudgetsAndProfileOverrides) {
  FakeClock clock;
  FakeQuota quota(clock);
  FakeQuotaConfig c = SmallConfig();
  c.tier_budgets["FREE"] = {{"gemini", {1, 1}}};
  quota.Configure(c);
  const AccountQuotaProfile free{"FREE", {}};
  EXPECT_EQ(quota.Generate("rt-f", free, kGemini)->status, 200);
  EXPECT_EQ(quota.Generate("rt-f", free, kGemini)->status, 429);
  EXPECT_EQ(quota.Generate("rt-f", free, kClaude)->status, 429);  // no 3p budget at all
  const AccountQuotaProfile rich{"FREE", {{"3p", {2, 2}}}};
  EXPECT_EQ(quota.Generate("rt-r", rich, kClaude)->status, 200);
  Json stats = FamilyStats(quota, "3p", "rt-r");
  EXPECT_EQ(stats["windows"]["short"]["budget"], 2);
}

TEST(ParseFakeQuotaConfig, FieldsAndErrors) {
  absl::StatusOr<FakeQuotaConfig> c = ParseFakeQuotaConfig(
      R"({"short_window_s": 2.5, "long_window_s": 7.5, "lag_ms": 250, "lie_3p": true,
          "budgets": {"PRO": {"gemini": {"short": 4, "long": 9}}}})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->enabled);
  EXPECT_EQ(c->short_window, absl::Milliseconds(2500));
  EXPECT_EQ(c->long_window, absl::Milliseconds(7500));
  EXPECT_EQ(c->lag, absl::Milliseconds(250));
  EXPECT_TRUE(c->lie_3p);
  EXPECT_TRUE(c->min_over_windows);
  EXPECT_EQ(c->tier_budgets["PRO"]["gemini"].long_window, 9);
  EXPECT_EQ(c->tier_budgets["ULTRA"]["gemini"].short_window, 20);  // defaults kept
  EXPECT_FALSE(ParseFakeQuotaConfig(R"({"enabled": false})")->enabled);

  for (const auto& [body, field] : std::vector<std::pair<const char*, const char*>>{
           {R"({"short_window_s": 0})", "short_window_s"},
           {R"({"lag_ms": "1s"})", "lag_ms"},
           {R"({"budgets": {"PRO": {"gemini": {"short": -1, "long": 2}}}})", "budgets.PRO.gemini.short"},
           {R"({"budgets": {"PRO": {"gemini": {"short": 1}}}})", "budgets.PRO.gemini.long"},
           {R"({"family_rules": [{"contains": "x"}]})", "family_rules"},
           {R"({"lie_3p": 1})", "lie_3p"},
           {"[]", "JSON object"}}) {
    absl::StatusOr<FakeQuotaConfig> bad = ParseFakeQuotaConfig(body);
    ASSERT_FALSE(bad.ok()) << body;
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(bad.status().message(), HasSubstr(field)) << body;
  }
}

// The same over HTTP, as the simulator drives the fake_upstream process.
TEST(FakeUpstreamQuota, ConfiguredOverHttpAndAnsweredPerBearerToken) {
  FakeClock clock;
  testing::FakeUpstream::Options options;
  options.clock = &clock;
  auto up = testing::FakeUpstream::Start(options);
  ASSERT_TRUE(up.ok());
  HttpClient http;
  auto post = [&](const std::string& path, const std::string& body, const std::string& token = "") {
    HttpRequest req;
    req.url = (*up)->base_url() + path;
    req.body = body;
    if (!token.empty()) req.headers = {{"Authorization", "Bearer " + token}};
    absl::StatusOr<HttpResponse> resp = http.Post(req);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? *resp : HttpResponse{};
  };
  const std::string generate = R"({"model":"gemini-3-flash","project":"p","request":{"contents":[]}})";

  HttpRequest token_req;
  token_req.url = (*up)->token_url();
  token_req.content_type = "application/x-www-form-urlencoded";
  token_req.body = "grant_type=refresh_token&refresh_token=rt-pro";
  std::string token = Json::parse(http.Post(token_req)->body)["access_token"];

  EXPECT_EQ(post("/v1internal:generateContent", generate, token).status, 200);  // off: always 200
  EXPECT_EQ(post("/__fake/profile", R"({"refresh_token":"rt-pro","project":"p","tier":"g1-pro-tier",
                                        "budgets":{"gemini":{"short":2,"long":9}}})").status, 200);
  EXPECT_EQ(post("/__fake/quota", R"({"short_window_s":5,"long_window_s":50,"budgets":{"x":[]}})").status, 400);
  EXPECT_EQ(post("/__fake/quota", R"({"short_window_s":5,"long_window_s":50})").status, 200);
  EXPECT_EQ(post("/v1internal:generateContent", R"({"request":{}})", token).status, 400);
  EXPECT_EQ(post("/v1internal:generateContent", generate, token).status, 200);
  EXPECT_EQ(post("/v1internal:generateContent", generate, token).status, 200);
  HttpResponse refused = post("/v1internal:generateContent", generate, token);
  EXPECT_EQ(refused.status, 429);
  EXPECT_EQ(ParseUpstreamError(429, "", refused.body, clock.Now()).delay, absl::Seconds(5));
  EXPECT_THAT(post("/v1internal:fetchAvailableModels", "{}", token).body,
              HasSubstr(R"("gemini-3-flash":{"displayName":"gemini-3-flash","quotaInfo":{"remainingFraction":0.0)"));
  EXPECT_THAT(post("/v1internal:retrieveUserQuotaSummary", R"({"project":"p"})", token).body,
              HasSubstr(R"("bucketId":"gemini-5s")"));

  Json stats = Json::parse((*up)->QuotaStatsJson());
  const Json& gemini = stats["accounts"]["rt-pro"]["families"]["gemini"];
  EXPECT_EQ(stats["accounts"]["rt-pro"]["tier"], "PRO");
  EXPECT_EQ(gemini["served"], 2);
  EXPECT_EQ(gemini["refused"], 1);
  EXPECT_EQ(gemini["windows"]["short"]["budget"], 2);
  EXPECT_EQ(stats["totals"]["refused"], 1);
  clock.Advance(absl::Seconds(5));
  EXPECT_EQ(post("/v1internal:generateContent", generate, token).status, 200);
}

}  // namespace
}  // namespace tokenbroker
