#include "lib/token_manager.h"

#include <atomic>
#include <thread>

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
  EXPECT_TRUE(Acquire(*tm, "a").ok());
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
