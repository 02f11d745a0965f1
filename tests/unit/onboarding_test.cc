// Onboarding (onboardUser and its long-running operation) and per-model quota (retrieveUserQuota):
// the parsers on tables of bodies; CloudCodeClient, Onboarding and QuotaPoller against the fake
// upstream on loopback, on a fake clock.
#include <mutex>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "lib/monitor/onboarding.h"
#include "lib/monitor/quota_poller.h"
#include "lib/tokens/account_store.h"
#include "nlohmann/json.hpp"
#include "tests/fakes/fake_upstream.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using testing::AccountProfile;
using testing::Eventually;
using testing::FakeUpstream;
using testing::MakeAccount;
using testing::ScriptedReply;
using ::testing::HasSubstr;

TEST(OnboardParsers, OperationPendingDoneAndFailed) {
  absl::StatusOr<OnboardOperation> pending = ParseOnboardOperation(R"({"name":"operations/abc-1","done":false})");
  ASSERT_TRUE(pending.ok()) << pending.status();
  EXPECT_EQ(pending->name, "operations/abc-1");
  EXPECT_FALSE(pending->done);

  absl::StatusOr<OnboardOperation> done = ParseOnboardOperation(
      R"({"name":"operations/abc-1","done":true,"response":{"cloudaicompanionProject":{"id":"vivid-river-a1b2c","name":"x"}}})");
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_TRUE(done->done);
  EXPECT_EQ(done->project_id, "vivid-river-a1b2c");
  // The project as a bare string, as loadCodeAssist sometimes writes it.
  done = ParseOnboardOperation(R"({"done":true,"response":{"cloudaicompanionProject":"p-2"}})");
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->project_id, "p-2");

  absl::StatusOr<OnboardOperation> failed =
      ParseOnboardOperation("{\"name\":\"operations/x\",\"error\":{\"code\":9,\"message\":\"no\\u001b[2J tier ya29.secret\"}}");
  ASSERT_TRUE(failed.ok());
  EXPECT_TRUE(failed->done);
  EXPECT_THAT(failed->error, HasSubstr("9 no"));
  EXPECT_EQ(failed->error.find('\x1b'), std::string::npos);  // escaped
  EXPECT_THAT(failed->error, ::testing::Not(HasSubstr("ya29.secret")));

  for (const char* bad : {"[]", "not json", R"({"done":false})",                // pending without a name
                          R"({"done":true,"response":{}})",                        // done without a project
                          R"({"name":"../../token","done":false})",               // not a safe path
                          R"({"name":"operations/a?b=c","done":false})",
                          R"({"done":true,"response":{"cloudaicompanionProject":{"id":"a b/c"}}})"}) {
    EXPECT_FALSE(ParseOnboardOperation(bad).ok()) << bad;
  }
}

TEST(OnboardParsers, LoadCodeAssistNamesTheDefaultAllowedTier) {
  absl::StatusOr<CodeAssistInfo> info = ParseLoadCodeAssist(
      R"({"allowedTiers":[{"id":"legacy-tier"},{"id":"free-tier","isDefault":true}],"currentTier":{"id":"free-tier"}})");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->project_id.empty());
  EXPECT_EQ(info->default_tier_id, "free-tier");
  info = ParseLoadCodeAssist(R"({"allowedTiers":[{"id":"standard-tier"}]})");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->default_tier_id, "standard-tier");  // none marked default: the first
  info = ParseLoadCodeAssist(R"({})");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->default_tier_id.empty());
  EXPECT_TRUE(info->ineligible.empty());
  // No tier allowed: why, from ineligibleTiers[] (escaped, never a token).
  info = ParseLoadCodeAssist(R"({"allowedTiers":[],"ineligibleTiers":[{"tierId":"free-tier",
    "reasonCode":"INELIGIBLE_ACCOUNT","reasonMessage":"Not available\n ya29.a0secretsecretsecret"}]})");
  ASSERT_TRUE(info.ok());
  EXPECT_THAT(info->ineligible, HasSubstr("free-tier: INELIGIBLE_ACCOUNT: Not available\\n"));
  EXPECT_EQ(info->ineligible.find("ya29.a0secret"), std::string::npos);
  // An allowed tier wins: ineligibility of another tier says nothing.
  info = ParseLoadCodeAssist(R"({"allowedTiers":[{"id":"free-tier"}],"ineligibleTiers":[{"tierId":"standard-tier"}]})");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->ineligible.empty());
}

TEST(OnboardParsers, UserQuotaPerModelTakesTheScarcestTokenType) {
  absl::StatusOr<std::vector<ModelQuotaInfo>> models = ParseUserQuota(R"({"buckets":[
      {"modelId":"gemini-3-pro-high","tokenType":"REQUESTS","remainingFraction":0.4,"resetTime":"2026-12-01T21:00:00Z"},
      {"modelId":"gemini-3-pro-high","tokenType":"INPUT_TOKENS","remainingFraction":0.7},
      {"modelId":"claude-sonnet-4-6","tokenType":"REQUESTS"},
      {"tokenType":"REQUESTS","remainingFraction":0.9},
      {"modelId":"gemini-3-flash","remainingFraction":7}]})");
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->size(), 3u);
  EXPECT_EQ((*models)[0].model, "claude-sonnet-4-6");
  EXPECT_EQ((*models)[0].remaining_fraction, 0);  // no fraction: at 0
  EXPECT_EQ((*models)[1].model, "gemini-3-flash");
  EXPECT_EQ((*models)[1].remaining_fraction, 1);  // clamped
  EXPECT_EQ((*models)[2].model, "gemini-3-pro-high");
  EXPECT_DOUBLE_EQ((*models)[2].remaining_fraction, 0.4);
  ASSERT_TRUE((*models)[2].reset_time.has_value());
  EXPECT_TRUE(ParseUserQuota(R"({})")->empty());
  EXPECT_FALSE(ParseUserQuota(R"({"buckets":{}})").ok());
  EXPECT_FALSE(ParseUserQuota("[1]").ok());
  // Bounded: a hostile answer naming many models keeps 64.
  std::string many = R"({"buckets":[)";
  for (int i = 0; i < 500; ++i) many += (i ? "," : "") + std::string(R"({"modelId":"m)") + std::to_string(i) + R"("})";
  EXPECT_EQ(ParseUserQuota(many + "]}")->size(), 64u);
}

class OnboardingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto up = FakeUpstream::Start({});
    ASSERT_TRUE(up.ok());
    upstream_ = *std::move(up);
    OAuthOptions o;
    o.token_url = upstream_->token_url();
    oauth_ = std::make_unique<OAuthClient>(o, http_);
    cloud_code_ = std::make_unique<CloudCodeClient>(std::vector<std::string>{upstream_->base_url()}, http_,
                                                    absl::Seconds(15), clock_);
    TokenManagerOptions to;
    to.background_refresh = false;
    tokens_ = std::make_unique<TokenManager>(to, pool_, *oauth_, nullptr, clock_);
    tokens_->Start();
  }
  void TearDown() override { tokens_->Stop(); }

  std::unique_ptr<QuotaPoller> StartPoller(QuotaPollerOptions options) {
    options.on_onboarded = [this](const std::string& id, const std::string& project) {
      std::lock_guard<std::mutex> lock(onboarded_mu_);
      onboarded_.emplace_back(id, project);
    };
    auto p = std::make_unique<QuotaPoller>(options, pool_, *tokens_, *cloud_code_,
                                           [this](const std::vector<QuotaObservation>& o) {
                                             pool_.UpdateQuota(o);
                                             std::lock_guard<std::mutex> lock(onboarded_mu_);
                                             for (const QuotaObservation& x : o) seen_.push_back(x);
                                           },
                                           clock_);
    p->Start();
    return p;
  }
  std::string Token(const std::string& id) {
    absl::Notification done;
    std::string token;
    tokens_->Acquire(id, [&](absl::StatusOr<AccessToken> t) {
      if (t.ok()) token = t->token;
      done.Notify();
    });
    done.WaitForNotification();
    return token;
  }
  AccountView View(const std::string& id) {
    for (AccountView& v : pool_.List()) {
      if (v.account_id == id) return v;
    }
    return {};
  }
  std::vector<QuotaObservation> Seen() {
    std::lock_guard<std::mutex> lock(onboarded_mu_);
    return seen_;
  }

  FakeClock clock_{absl::Now()};
  AccountPool pool_{PoolOptions(), clock_};
  HttpClient http_;
  std::unique_ptr<FakeUpstream> upstream_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<CloudCodeClient> cloud_code_;
  std::unique_ptr<TokenManager> tokens_;
  std::mutex onboarded_mu_;
  std::vector<std::pair<std::string, std::string>> onboarded_;
  std::vector<QuotaObservation> seen_;
};

TEST_F(OnboardingTest, ClientStartsOnboardingAndPollsItsOperation) {
  pool_.Load({MakeAccount("a")});
  upstream_->SetProfile("rt-a", AccountProfile{.onboard_project = "proj-new", .onboard_polls = 2});
  const std::string token = Token("a");
  absl::StatusOr<OnboardOperation> op = cloud_code_->OnboardUser(token, "free-tier", absl::Seconds(5));
  ASSERT_TRUE(op.ok()) << op.status();
  ASSERT_FALSE(op->done);
  op = cloud_code_->GetOperation(token, op->name, absl::Seconds(5));
  ASSERT_TRUE(op.ok()) << op.status();
  EXPECT_FALSE(op->done);
  op = cloud_code_->GetOperation(token, op->name, absl::Seconds(5));
  ASSERT_TRUE(op.ok()) << op.status();
  EXPECT_TRUE(op->done);
  EXPECT_EQ(op->project_id, "proj-new");
  EXPECT_EQ(upstream_->Calls("/v1internal/operations"), 2);
  // From now on loadCodeAssist names it.
  EXPECT_EQ(cloud_code_->LoadCodeAssist(token)->project_id, "proj-new");
  // A name that is not a safe path is never sent.
  EXPECT_TRUE(absl::IsInvalidArgument(cloud_code_->GetOperation(token, "../token", absl::Seconds(1)).status()));
}

TEST_F(OnboardingTest, PollerOnboardsAnAccountWithoutProjectThenServesIt) {
  pool_.Load({MakeAccount("a")});
  upstream_->SetProfile("rt-a", AccountProfile{.onboard_project = "proj-new", .onboard_polls = 3});
  QuotaPollerOptions o;
  o.interval = absl::Minutes(5);
  o.onboarding.first_check = absl::Seconds(2);
  o.onboarding.max_check = absl::Seconds(4);
  auto poller = StartPoller(o);
  // onboardUser answered a running operation: the pool knows why the account is not served.
  ASSERT_TRUE(Eventually([&] { return !View("a").no_project_reason.empty(); }));
  EXPECT_THAT(View("a").no_project_reason, HasSubstr("onboarding in progress"));
  EXPECT_FALSE(pool_.Select(SelectRequest{.model = "m"}).ok());
  // Nothing but why: no quota is read for an account that cannot be served.
  EXPECT_EQ(upstream_->Calls("/v1internal:fetchAvailableModels"), 0);
  // Polls of the operation follow the back-off on the clock: 2 s, then 4 s, then 4 s. The poller
  // schedules each next step when it has handled the last, which may be after the test moved the
  // clock on: the clock moves a second at a time, and the gaps are checked as bounds.
  EXPECT_EQ(upstream_->Calls("/v1internal/operations"), 0);
  clock_.Advance(absl::Seconds(2));
  ASSERT_TRUE(Eventually([&] { return upstream_->Calls("/v1internal/operations") == 1; }));
  auto seconds_until = [&](auto done) {
    int seconds = 0;
    while (!done() && seconds < 15) {
      clock_.Advance(absl::Seconds(1));
      ++seconds;
      Eventually(done, absl::Milliseconds(300));
    }
    return seconds;
  };
  const int second_poll = seconds_until([&] { return upstream_->Calls("/v1internal/operations") == 2; });
  EXPECT_GE(second_poll, 4);
  EXPECT_LE(second_poll, 8);
  const int third_poll = seconds_until([&] { return View("a").project_id == "proj-new"; });
  EXPECT_GE(third_poll, 4);
  ASSERT_EQ(View("a").project_id, "proj-new");
  EXPECT_TRUE(View("a").no_project_reason.empty());
  EXPECT_EQ(upstream_->Calls("/v1internal:onboardUser"), 1);
  absl::StatusOr<Selection> sel = pool_.Select(SelectRequest{.model = "m"});
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ(sel->project_id, "proj-new");
  {
    std::lock_guard<std::mutex> lock(onboarded_mu_);
    ASSERT_EQ(onboarded_.size(), 1u);
    EXPECT_EQ(onboarded_[0], std::make_pair(std::string("a"), std::string("proj-new")));
  }
  // Quota is read with the project from then on.
  ASSERT_TRUE(Eventually([&] { return upstream_->Calls("/v1internal:fetchAvailableModels") == 1; }));
  EXPECT_EQ(poller->OnboardingAccounts(), 0u);
}

TEST_F(OnboardingTest, AFailedOnboardingBacksOffAndNeverMakesUpAProject) {
  pool_.Load({MakeAccount("a")});
  upstream_->SetProfile("rt-a", AccountProfile{.onboard_polls = 1, .onboard_error = "Precondition failed: no tier"});
  QuotaPollerOptions o;
  o.interval = absl::Seconds(30);
  o.jitter = 0;
  o.onboarding.first_check = absl::Seconds(1);
  o.onboarding.retry = absl::Minutes(10);
  auto poller = StartPoller(o);
  ASSERT_TRUE(Eventually([&] { return upstream_->Calls("/v1internal:onboardUser") == 1; }));
  // The poller schedules the operation's poll when it has handled onboardUser's answer, which may
  // come after the clock moved: move it a second at a time until the failure is known.
  for (int i = 0; i < 10 && !absl::StrContains(View("a").no_project_reason, "onboarding failed"); ++i) {
    clock_.Advance(absl::Seconds(1));
    Eventually([&] { return absl::StrContains(View("a").no_project_reason, "onboarding failed"); },
               absl::Milliseconds(500));
  }
  ASSERT_TRUE(absl::StrContains(View("a").no_project_reason, "onboarding failed"));
  EXPECT_THAT(View("a").no_project_reason, HasSubstr("no tier"));
  EXPECT_THAT(View("a").no_project_reason, HasSubstr("next attempt at"));
  EXPECT_TRUE(View("a").project_id.empty());
  absl::StatusOr<Selection> sel = pool_.Select(SelectRequest{.model = "m"});
  ASSERT_FALSE(sel.ok());
  Explanation ex = pool_.Explain(SelectRequest{.model = "m"});
  ASSERT_EQ(ex.accounts.size(), 1u);
  EXPECT_EQ(ex.accounts[0].verdict, Verdict::kCooldown);
  EXPECT_THAT(ex.accounts[0].detail, HasSubstr("no Cloud Code project: onboarding failed"));
  // Polls go on every interval, but onboardUser waits out its back-off.
  for (int i = 0; i < 5; ++i) {
    const int64_t polls = poller->PollCount();
    clock_.Advance(absl::Seconds(31));
    ASSERT_TRUE(Eventually([&] { return poller->PollCount() > polls; }));
  }
  EXPECT_EQ(upstream_->Calls("/v1internal:onboardUser"), 1);
  clock_.Advance(absl::Minutes(10));
  ASSERT_TRUE(Eventually([&] { return upstream_->Calls("/v1internal:onboardUser") == 2; }));
  EXPECT_EQ(poller->OnboardingAttempts(), 2);
  std::lock_guard<std::mutex> lock(onboarded_mu_);
  EXPECT_TRUE(onboarded_.empty());
}

TEST_F(OnboardingTest, ATierIneligibleAccountIsNeverOnboardedNorServedAndSaysWhy) {
  pool_.Load({MakeAccount("a"), MakeAccount("b")});
  upstream_->SetProfile("rt-a", AccountProfile{.ineligible_reason = "Not available in your country"});
  upstream_->SetProfile("rt-b", AccountProfile{.project = "proj-b"});
  QuotaPollerOptions o;
  o.interval = absl::Seconds(30);
  o.jitter = 0;
  auto poller = StartPoller(o);
  ASSERT_NE(poller, nullptr);
  ASSERT_TRUE(Eventually([&] { return !View("a").no_project_reason.empty(); }));
  EXPECT_THAT(View("a").no_project_reason,
              HasSubstr("tier-ineligible (free-tier: INELIGIBLE_ACCOUNT: Not available in your country)"));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(pool_.Select(SelectRequest{.model = "m"})->account_id, "b");
  // Every poll asks again (the account may become eligible), never onboardUser.
  for (int i = 0; i < 3; ++i) {
    const int64_t asked = upstream_->CallsFor("/v1internal:loadCodeAssist", "rt-a");
    clock_.Advance(absl::Seconds(31));
    ASSERT_TRUE(Eventually([&] { return upstream_->CallsFor("/v1internal:loadCodeAssist", "rt-a") > asked; }));
  }
  EXPECT_EQ(upstream_->Calls("/v1internal:onboardUser"), 0);
  EXPECT_THAT(View("a").no_project_reason, HasSubstr("tier-ineligible"));
}

TEST_F(OnboardingTest, AHangingOnboardUserFailsWithinTheTimeout) {
  pool_.Load({MakeAccount("a")});
  upstream_->Script("/v1internal:onboardUser",
                    ScriptedReply{.status = 200, .body = R"({"name":"operations/x","done":false})",
                                  .delay = absl::Seconds(3), .times = 1});
  QuotaPollerOptions o;
  o.onboarding.timeout = absl::Milliseconds(300);
  o.onboarding.first_check = absl::Milliseconds(100);
  o.onboarding.max_check = absl::Milliseconds(300);
  const absl::Time started = absl::Now();
  auto poller = StartPoller(o);
  ASSERT_TRUE(Eventually([&] { return absl::StrContains(View("a").no_project_reason, "onboarding failed"); }));
  EXPECT_LT(absl::Now() - started, absl::Seconds(3));  // the request's own timeout, not the upstream's delay
  EXPECT_THAT(View("a").no_project_reason, HasSubstr("not done within --onboard_timeout 300ms"));
  EXPECT_TRUE(View("a").project_id.empty());
}

TEST_F(OnboardingTest, AnOperationThatNeverFinishesFailsAtTheDeadlineOnTheClock) {
  pool_.Load({MakeAccount("a")});
  upstream_->SetProfile("rt-a", AccountProfile{.onboard_polls = 1000});
  QuotaPollerOptions o;
  o.onboarding.timeout = absl::Seconds(30);
  o.onboarding.first_check = absl::Seconds(5);
  o.onboarding.max_check = absl::Seconds(10);
  auto poller = StartPoller(o);
  ASSERT_TRUE(Eventually([&] { return absl::StrContains(View("a").no_project_reason, "in progress"); }));
  for (int i = 0; i < 8 && !absl::StrContains(View("a").no_project_reason, "failed"); ++i) {
    const int64_t polls = upstream_->Calls("/v1internal/operations");
    clock_.Advance(absl::Seconds(10));
    Eventually([&] { return upstream_->Calls("/v1internal/operations") > polls; }, absl::Seconds(2));
  }
  EXPECT_THAT(View("a").no_project_reason, HasSubstr("not done within --onboard_timeout 30s"));
  EXPECT_LE(upstream_->Calls("/v1internal/operations"), 5);  // 5 s, 10 s, 10 s: the deadline ends it
}

TEST_F(OnboardingTest, AProjectInTheAccountFileIsKeptWithoutOnboarding) {
  AccountRecord a = MakeAccount("a");
  a.project_id = "file-project";
  pool_.Load({a});
  auto poller = StartPoller(QuotaPollerOptions());
  ASSERT_TRUE(Eventually([&] { return upstream_->Calls("/v1internal:fetchAvailableModels") == 1; }));
  EXPECT_EQ(upstream_->Calls("/v1internal:onboardUser"), 0);
  EXPECT_EQ(View("a").project_id, "file-project");
  EXPECT_TRUE(pool_.Select(SelectRequest{.model = "m"}).ok());
}

TEST_F(OnboardingTest, PerModelQuotaWhenTheSummaryIsNotOffered) {
  pool_.Load({MakeAccount("a")});
  upstream_->SetProfile(
      "rt-a", AccountProfile{.project = "p", .quota_summary = false,
                             .user_quota_json = R"([{"modelId":"gemini-3-pro-high","tokenType":"REQUESTS",)"
                                                R"("remainingFraction":0.25,"resetTime":"2030-01-01T00:00:00Z"}])"});
  QuotaPollerOptions o;
  o.jitter = 0;
  o.interval = absl::Seconds(60);
  auto poller = StartPoller(o);
  auto from_user_quota = [&] {
    std::vector<QuotaObservation> out;
    for (const QuotaObservation& x : Seen()) {
      if (x.source == QuotaSource::kUserQuota) out.push_back(x);
    }
    return out;
  };
  ASSERT_TRUE(Eventually([&] { return !from_user_quota().empty(); }));
  EXPECT_EQ(from_user_quota()[0].model, "gemini-3-pro-high");
  EXPECT_DOUBLE_EQ(from_user_quota()[0].remaining_fraction, 0.25);
  EXPECT_EQ(from_user_quota()[0].project_id, "p");
  // The summary's 404 is remembered: the next poll asks retrieveUserQuota only.
  clock_.Advance(absl::Seconds(61));
  ASSERT_TRUE(Eventually([&] { return upstream_->Calls("/v1internal:retrieveUserQuota") == 2; }));
  EXPECT_EQ(upstream_->Calls("/v1internal:retrieveUserQuotaSummary"), 1);
}

TEST(OnboardingStore, TheProjectFoundIsWrittenIntoTheFileKeepingTheRest) {
  testing::TempDir dir;
  const std::string original =
      R"({"id":"a","email":"a@example.com","custom":{"keep":1},)"
      R"("token":{"refresh_token":"1//rt-a","access_token":"","expiry_timestamp":0,"token_type":"Bearer"}})";
  testing::WriteText(dir.Join("a.json"), original);
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  AccountUpdate update;
  update.project_id = "proj-new";
  ASSERT_TRUE((*store)->Update("a", update).ok());
  nlohmann::json after = nlohmann::json::parse(testing::ReadText(dir.Join("a.json")));
  EXPECT_EQ(after["token"]["project_id"], "proj-new");
  EXPECT_EQ(after["token"]["refresh_token"], "1//rt-a");
  EXPECT_EQ(after["custom"]["keep"], 1);
  LoadResult loaded = (*store)->LoadAll();
  ASSERT_EQ(loaded.accounts.size(), 1u);
  EXPECT_EQ(loaded.accounts[0].project_id, "proj-new");
}

}  // namespace
}  // namespace tokenbroker
