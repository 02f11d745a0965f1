#include "lib/tokens/token_manager.h"

#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/fakes/fake_upstream.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using testing::AccountJson;
using testing::Eventually;
using testing::FakeUpstream;
using testing::ReadText;
using testing::ScriptedReply;
using testing::TempDir;
using testing::WriteText;

class TokenManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto up = FakeUpstream::Start({});
    ASSERT_TRUE(up.ok());
    upstream_ = *std::move(up);
    OAuthOptions o;
    o.token_url = upstream_->token_url();
    o.client_id = "client";
    o.max_attempts = 1;
    oauth_ = std::make_unique<OAuthClient>(o, http_);
    auto store = AccountStore::Open(dir_.path());
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
  }

  void AddAccount(const std::string& id, const std::string& tier, const std::string& extra = "") {
    WriteText(dir_.Join(id + ".json"), AccountJson(id + "@example.com", "rt-" + id, tier, extra));
  }

  std::unique_ptr<TokenManager> Start(TokenManagerOptions options = {}) {
    LoadResult r = store_->LoadAll();
    EXPECT_TRUE(r.problems.empty());
    pool_.Load(r.accounts);
    auto tm = std::make_unique<TokenManager>(options, pool_, *oauth_, store_.get(), clock_);
    tm->Start();
    return tm;
  }

  // Acquires synchronously, for tests.
  absl::StatusOr<AccessToken> Acquire(TokenManager& tm, const std::string& id) {
    absl::Notification done;
    absl::StatusOr<AccessToken> result;
    tm.Acquire(id, [&](absl::StatusOr<AccessToken> t) {
      result = std::move(t);
      done.Notify();
    });
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
    return result;
  }

  TempDir dir_;
  FakeClock clock_{absl::Now()};
  AccountPool pool_{PoolOptions(), clock_};
  HttpClient http_;
  std::unique_ptr<FakeUpstream> upstream_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<AccountStore> store_;
};

TEST_F(TokenManagerTest, RefreshesAMissingTokenAndWritesItBack) {
  AddAccount("a", "PRO");
  TokenManagerOptions o;
  o.background_refresh = false;  // only on-demand refreshes in this test
  auto tm = Start(o);
  absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(t->token, HasSubstr("ya29.fake-"));
  EXPECT_EQ(t->expiry, clock_.Now() + absl::Seconds(3599));
  nlohmann::json file = nlohmann::json::parse(ReadText(dir_.Join("a.json")));
  EXPECT_EQ(file["token"]["access_token"], t->token);
  EXPECT_EQ(file["token"]["expiry_timestamp"], absl::ToUnixSeconds(t->expiry));
  // A fresh token is served without another call.
  absl::StatusOr<AccessToken> again = Acquire(*tm, "a");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->token, t->token);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 1);
}

TEST_F(TokenManagerTest, ConcurrentAcquiresShareOneRefresh) {
  AddAccount("a", "PRO");
  // A slow token endpoint keeps the refresh in flight while every caller arrives.
  upstream_->Script("/token", ScriptedReply{.status = 200,
                                            .body = R"({"access_token":"ya29.slow","expires_in":3599})",
                                            .delay = absl::Milliseconds(300),
                                            .times = 1});
  TokenManagerOptions o;
  o.background_refresh = false;
  o.workers = 4;
  auto tm = Start(o);
  std::atomic<int> ok{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 40; ++i) {
    callers.emplace_back([&] {
      absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
      if (t.ok() && t->token == "ya29.slow") ++ok;
    });
  }
  for (auto& c : callers) c.join();
  EXPECT_EQ(ok.load(), 40);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 1);
}

TEST_F(TokenManagerTest, TokenCloseToExpiryIsRefreshedBeforeItIsHandedOut) {
  AddAccount("a", "PRO");
  TokenManagerOptions o;
  o.background_refresh = false;
  o.min_token_ttl = absl::Minutes(5);
  auto tm = Start(o);
  absl::StatusOr<AccessToken> first = Acquire(*tm, "a");
  ASSERT_TRUE(first.ok());
  clock_.Advance(absl::Seconds(3599) - absl::Minutes(4));  // 4 minutes left < min_token_ttl
  absl::StatusOr<AccessToken> second = Acquire(*tm, "a");
  ASSERT_TRUE(second.ok());
  EXPECT_NE(second->token, first->token);
  EXPECT_GE(second->expiry - clock_.Now(), o.min_token_ttl);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 2);
}

TEST_F(TokenManagerTest, MinTokenTtlWinsOverAShorterRefreshAheadWindow) {
  AddAccount("a", "PRO");
  TokenManagerOptions o;
  o.background_refresh = false;
  o.min_token_ttl = absl::Minutes(5);
  o.refresh_ahead = absl::Minutes(1);
  auto tm = Start(o);
  pool_.SetToken("a", "ya29.two-minutes-left", clock_.Now() + absl::Minutes(2), std::nullopt);
  absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
  ASSERT_TRUE(t.ok());
  EXPECT_NE(t->token, "ya29.two-minutes-left");
  EXPECT_GE(t->expiry - clock_.Now(), o.min_token_ttl);
}

TEST_F(TokenManagerTest, BackgroundRefresherRenewsAheadOfExpiry) {
  AddAccount("a", "PRO");
  AddAccount("b", "FREE");
  TokenManagerOptions o;
  o.scan_interval = absl::Milliseconds(20);
  o.refresh_ahead = absl::Minutes(15);
  auto tm = Start(o);
  // Both accounts start with no token: the background loop fetches them with no request waiting.
  ASSERT_TRUE(Eventually([&] { return upstream_->TokenCallsFor("rt-a") == 1 && upstream_->TokenCallsFor("rt-b") == 1; }));
  // Nothing more while the tokens are far from expiry.
  clock_.Advance(absl::Minutes(30));
  const int64_t scans = tm->ScanCount();
  ASSERT_TRUE(Eventually([&] { return tm->ScanCount() >= scans + 3; }));
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 1);
  // Within refresh_ahead of expiry: renewed in the background.
  clock_.Advance(absl::Minutes(20));
  ASSERT_TRUE(Eventually([&] { return upstream_->TokenCallsFor("rt-a") == 2 && upstream_->TokenCallsFor("rt-b") == 2; }));
  // The fake counts a call when it arrives; the manager counts it once it is applied.
  EXPECT_TRUE(Eventually([&] { return tm->RefreshCounts()["ok"] == 4; }));
}

TEST_F(TokenManagerTest, InvalidGrantDisablesTheAccountPersistently) {
  AddAccount("dead", "ULTRA", R"(,"custom":{"keep":true},"proxy_disabled":false)");
  std::string before = ReadText(dir_.Join("dead.json"));
  upstream_->Script("/token", ScriptedReply{.status = 400,
                                            .body = R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})",
                                            .times = 0,
                                            .match = "rt-dead"});
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  absl::StatusOr<AccessToken> t = Acquire(*tm, "dead");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(t.status().message(), HasSubstr("invalid_grant"));
  EXPECT_TRUE(pool_.GetCredentials("dead")->disabled);
  // Asking again does not call the token endpoint again.
  EXPECT_EQ(Acquire(*tm, "dead").status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-dead"), 1);

  nlohmann::json old_doc = nlohmann::json::parse(before);
  nlohmann::json doc = nlohmann::json::parse(ReadText(dir_.Join("dead.json")));
  EXPECT_EQ(doc["disabled"], true);
  EXPECT_THAT(doc["disabled_reason"].get<std::string>(), HasSubstr("invalid_grant"));
  for (auto& [key, value] : old_doc.items()) {
    if (key != "disabled") {
      EXPECT_EQ(doc[key], value) << key;
    }
  }
  // A new process reading the folder sees it disabled.
  LoadResult reloaded = store_->LoadAll();
  ASSERT_EQ(reloaded.accounts.size(), 1u);
  EXPECT_TRUE(reloaded.accounts[0].disabled);
}

TEST_F(TokenManagerTest, FailedRefreshReportsUnavailableAndKeepsTheAccount) {
  AddAccount("a", "PRO");
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 1});
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  EXPECT_EQ(Acquire(*tm, "a").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(pool_.GetCredentials("a")->disabled);
  clock_.Advance(o.failure_backoff);  // its back-off ends
  EXPECT_TRUE(Acquire(*tm, "a").ok());
}

// Issue 11 item 10: after a failed refresh the account is remembered as failing: Acquire fails at
// once (no call to the token endpoint) until the back-off ends, which doubles per failure.
TEST_F(TokenManagerTest, AFailingAccountIsRememberedUntilItsBackoffEnds) {
  AddAccount("a", "PRO");
  upstream_->Script("/token", ScriptedReply{.status = 500, .body = "{}", .times = 2});
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  EXPECT_EQ(Acquire(*tm, "a").status().code(), absl::StatusCode::kUnavailable);
  for (int i = 0; i < 15; ++i) {
    const absl::Time start = absl::Now();
    absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(t.status().message(), HasSubstr("next try in"));
    EXPECT_LT(absl::Now() - start, absl::Milliseconds(100));
  }
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 1);
  auto trouble = tm->Troubled();
  ASSERT_TRUE(trouble.contains("a"));
  EXPECT_EQ(trouble["a"].trouble, TokenTrouble::kFailing);
  EXPECT_EQ(trouble["a"].until, clock_.Now() + o.failure_backoff);
  clock_.Advance(o.failure_backoff);
  EXPECT_EQ(Acquire(*tm, "a").status().code(), absl::StatusCode::kUnavailable);  // the second failure
  EXPECT_EQ(tm->Troubled()["a"].until, clock_.Now() + 2 * o.failure_backoff);
  clock_.Advance(2 * o.failure_backoff);
  ASSERT_TRUE(Acquire(*tm, "a").ok());
  EXPECT_TRUE(tm->Troubled().empty());
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 3);
}

// Issue 11 item 9: a caller waits for a slow refresh only until its give-up time; the refresh goes
// on, and the account is reported slow until it ends.
TEST_F(TokenManagerTest, ASlowRefreshGivesUpAtTheCallersBudgetAndGoesOn) {
  AddAccount("a", "PRO");
  upstream_->Script("/token", ScriptedReply{.status = 200,
                                            .body = R"({"access_token":"ya29.late","expires_in":3599})",
                                            .delay = absl::Milliseconds(1500),
                                            .times = 1});
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  absl::Notification done;
  absl::StatusOr<AccessToken> result;
  tm->Acquire("a", clock_.Now() + absl::Milliseconds(200), [&](absl::StatusOr<AccessToken> t) {
    result = std::move(t);
    done.Notify();
  });
  // Not before the caller's give-up time on the manager's clock...
  clock_.Advance(absl::Milliseconds(199));
  EXPECT_FALSE(done.WaitForNotificationWithTimeout(absl::Milliseconds(50)));
  // ...and at it, while the refresh (1.5 s upstream) is still running.
  clock_.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(pool_.GetCredentials("a")->access_token, "ya29.late");
  EXPECT_EQ(tm->Troubled()["a"].trouble, TokenTrouble::kSlow);
  ASSERT_TRUE(Eventually([&] { return pool_.GetCredentials("a")->access_token == "ya29.late"; }));
  EXPECT_TRUE(Eventually([&] { return tm->Troubled().empty(); }));
}

// Issue 11 item 11: a refresh that gives a token shorter-lived than min_token_ttl is not repeated
// on every call; the token says it is short, and the account is listed as such.
TEST_F(TokenManagerTest, AShortLivedTokenIsMarkedAndNotRefreshedOnEveryCall) {
  AddAccount("a", "PRO");
  upstream_->SetExpiresIn(120);
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->below_min_ttl);
  EXPECT_EQ(t->expiry, clock_.Now() + absl::Seconds(120));
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(Acquire(*tm, "a")->below_min_ttl);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 1);
  EXPECT_EQ(tm->Troubled()["a"].trouble, TokenTrouble::kShortLived);
  upstream_->SetExpiresIn(3599);
  clock_.Advance(o.short_token_retry);
  t = Acquire(*tm, "a");
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->below_min_ttl);
  EXPECT_TRUE(tm->Troubled().empty());
}

TEST_F(TokenManagerTest, AnAbsurdExpiresInIsAFailedRefresh) {
  AddAccount("a", "PRO");
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  for (const char* expires_in : {"0", "-5", "1e300", "\"soon\""}) {
    upstream_->Script("/token", ScriptedReply{.status = 200,
                                              .body = absl::StrCat(R"({"access_token":"ya29.bad","expires_in":)", expires_in, "}"),
                                              .times = 1});
    absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnavailable) << expires_in;
    EXPECT_TRUE(pool_.GetCredentials("a")->access_token.empty()) << expires_in;
    clock_.Advance(o.max_failure_backoff);
  }
  EXPECT_EQ(tm->RefreshCounts()["error"], 4);
}

TEST_F(TokenManagerTest, UnwritableFileKeepsTheTokenInMemory) {
  AddAccount("a", "PRO");
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = std::make_unique<TokenManager>(o, pool_, *oauth_, store_.get(), clock_);
  pool_.Load(store_->LoadAll().accounts);
  std::filesystem::remove(dir_.Join("a.json"));  // the write-back will fail with NOT_FOUND
  tm->Start();
  absl::StatusOr<AccessToken> t = Acquire(*tm, "a");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(Acquire(*tm, "a")->token, t->token);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 1);
}

TEST_F(TokenManagerTest, StoppedManagerAnswersUnavailable) {
  AddAccount("a", "PRO");
  // No background refresh: it could fetch a token before Stop(), and a stopped manager still
  // hands out a cached token that is good; what it must not do is start a refresh.
  TokenManagerOptions o;
  o.background_refresh = false;
  auto tm = Start(o);
  tm->Stop();
  EXPECT_EQ(Acquire(*tm, "a").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(upstream_->TokenCallsFor("rt-a"), 0);
}

}  // namespace
}  // namespace tokenbroker
