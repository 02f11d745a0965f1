// TokenIssuer (the GetToken use case) with the real pool and token manager on a FakeClock, the
// fake upstream on loopback, and a real redis-server for the shared-state path. Waiting calls are
// moved by advancing the fake clock: no test waits on real time to check a duration.
#include "lib/broker/token_issuer.h"

#include <atomic>
#include <memory>
#include <optional>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/common/errors.h"
#include "lib/upstream/http_client.h"
#include "lib/upstream/oauth_client.h"
#include "absl/strings/str_cat.h"
#include "lib/state/redis_state.h"
#include "tests/fakes/fake_upstream.h"
#include "tests/unit/redis_process.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using ::tokenbroker::testing::Eventually;
using ::tokenbroker::testing::FakeUpstream;
using ::tokenbroker::testing::RedisProcess;
using ::tokenbroker::testing::ScriptedReply;

AccountRecord Account(const std::string& id, Tier tier) {
  AccountRecord r = testing::MakeAccount(id, tier);
  r.project_id = "proj-" + id;
  return r;
}

// The answer of one Issue, and the fake time and thread it came at.
class Answer {
 public:
  TokenIssuer::Done Done(const Clock& clock) {
    return [this, &clock](absl::StatusOr<Issued> issued) {
      absl::MutexLock lock(&mu_);
      result_ = std::move(issued);
      at_ = clock.Now();
      thread_ = std::this_thread::get_id();
    };
  }
  bool done() {
    absl::MutexLock lock(&mu_);
    return result_.has_value();
  }
  // Waits (polling, with a deadline) for the answer.
  absl::StatusOr<Issued> Get() {
    EXPECT_TRUE(Eventually([&] { return done(); }));
    absl::MutexLock lock(&mu_);
    return result_.value_or(absl::DeadlineExceededError("no answer"));
  }
  absl::Time at() {
    absl::MutexLock lock(&mu_);
    return at_;
  }
  std::thread::id thread() {
    absl::MutexLock lock(&mu_);
    return thread_;
  }

 private:
  absl::Mutex mu_;
  std::optional<absl::StatusOr<Issued>> result_ ABSL_GUARDED_BY(mu_);
  absl::Time at_ ABSL_GUARDED_BY(mu_);
  std::thread::id thread_ ABSL_GUARDED_BY(mu_);
};

IssueRequest Request(const std::string& model, absl::Duration max_wait = absl::ZeroDuration(),
                     const void* key = nullptr) {
  IssueRequest r;
  r.select.model = model;
  r.max_wait = max_wait;
  r.key = key;
  return r;
}

class TokenIssuerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto up = FakeUpstream::Start({});
    ASSERT_TRUE(up.ok());
    upstream_ = *std::move(up);
    OAuthOptions o;
    o.token_url = upstream_->token_url();
    o.max_attempts = 1;
    oauth_ = std::make_unique<OAuthClient>(o, http_);
    pool_.Load({Account("u1", Tier::kUltra), Account("p1", Tier::kPro), Account("f1", Tier::kFree)});
    TokenManagerOptions to;
    to.background_refresh = false;
    tokens_ = std::make_unique<TokenManager>(to, pool_, *oauth_, nullptr, clock_);
    tokens_->Start();
    issuer_ = std::make_unique<TokenIssuer>(TokenIssuerOptions{}, pool_, *tokens_, clock_);
  }
  void TearDown() override {
    issuer_->Shutdown();
    tokens_->Stop();
  }

  // A 429 with `retry_after` seconds on `model` for each account.
  void Cool(const std::string& model, const std::vector<std::pair<std::string, std::string>>& accounts) {
    for (const auto& [id, retry_after] : accounts) {
      Outcome o;
      o.account_id = id;
      o.model = model;
      o.http_status = 429;
      o.retry_after = retry_after;
      ASSERT_TRUE(pool_.ReportOutcome(o).ok());
    }
  }

  FakeClock clock_{absl::Now()};  // real time at start: the token manager's refresh give-up is in real time
  AccountPool pool_{PoolOptions(), clock_};
  HttpClient http_;
  std::unique_ptr<FakeUpstream> upstream_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<TokenManager> tokens_;
  std::unique_ptr<TokenIssuer> issuer_;
};

TEST_F(TokenIssuerTest, IssuesTheBestAccountsFreshTokenWithItsLease) {
  Answer answer;
  issuer_->Issue(Request("gemini-3-pro-high"), answer.Done(clock_));
  absl::StatusOr<Issued> issued = answer.Get();
  ASSERT_TRUE(issued.ok()) << issued.status();
  EXPECT_EQ(issued->selection.account_id, "u1");
  EXPECT_EQ(issued->selection.tier, Tier::kUltra);
  EXPECT_FALSE(issued->selection.lease_id.empty());
  EXPECT_THAT(issued->token.token, HasSubstr("ya29.fake-"));
  EXPECT_EQ(issued->token.expiry, clock_.Now() + absl::Seconds(3599));
}

TEST_F(TokenIssuerTest, WithoutSharedStateAHeldTokenIsIssuedOnTheCallersThread) {
  Answer first;
  issuer_->Issue(Request("m"), first.Done(clock_));
  ASSERT_TRUE(first.Get().ok());  // the refresh ran on the token manager's thread
  Answer second;
  issuer_->Issue(Request("m"), second.Done(clock_));
  EXPECT_TRUE(second.done());  // inline: the hot path has no hand-off
  EXPECT_EQ(second.thread(), std::this_thread::get_id());
}

TEST_F(TokenIssuerTest, AnAccountWhoseTokenCannotBeHadIsLeftOutAndTheNextTried) {
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 1, .match = "rt-u1"});
  Answer answer;
  issuer_->Issue(Request("m"), answer.Done(clock_));
  absl::StatusOr<Issued> issued = answer.Get();
  ASSERT_TRUE(issued.ok()) << issued.status();
  EXPECT_EQ(issued->selection.account_id, "p1");
  // u1's lease went back: nothing is in flight but p1's.
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 1);
}

TEST_F(TokenIssuerTest, NoTokenAnywhereIsUnavailableWithTheLastError) {
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 0});
  Answer answer;
  issuer_->Issue(Request("m"), answer.Done(clock_));
  absl::StatusOr<Issued> issued = answer.Get();
  EXPECT_TRUE(absl::IsUnavailable(issued.status())) << issued.status();
  EXPECT_THAT(issued.status().message(), HasSubstr("HTTP 503"));
}

TEST_F(TokenIssuerTest, ATokenFailureBehindCoolingAccountsIsNamedInTheResourceExhausted) {
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 0, .match = "rt-u1"});
  Cool("m", {{"p1", "90"}, {"f1", "90"}});
  Answer answer;
  issuer_->Issue(Request("m"), answer.Done(clock_));
  absl::StatusOr<Issued> issued = answer.Get();
  ASSERT_TRUE(absl::IsResourceExhausted(issued.status())) << issued.status();
  EXPECT_THAT(issued.status().message(), HasSubstr("tokens could not be had"));
  ASSERT_TRUE(RetryDelay(issued.status()).has_value());
  EXPECT_EQ(*RetryDelay(issued.status()), absl::Seconds(90));
}

TEST_F(TokenIssuerTest, MaxWaitShorterThanTheCooldownGivesTheErrorAtTheDeadline) {
  Cool("m", {{"u1", "600"}, {"p1", "600"}, {"f1", "600"}});
  const absl::Time start = clock_.Now();
  Answer answer;
  issuer_->Issue(Request("m", absl::Milliseconds(300), &answer), answer.Done(clock_));
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  EXPECT_FALSE(answer.done());
  clock_.Advance(absl::Milliseconds(299));
  clock_.Advance(absl::Milliseconds(1));
  absl::StatusOr<Issued> issued = answer.Get();
  EXPECT_TRUE(absl::IsResourceExhausted(issued.status())) << issued.status();
  EXPECT_EQ(answer.at(), start + absl::Milliseconds(300));  // at max_wait on the clock, not before
  EXPECT_EQ(issuer_->waiting(), 0u);
  issuer_->Forget(&answer);
}

TEST_F(TokenIssuerTest, MaxWaitServesAsSoonAsTheEarliestCooldownEnds) {
  Cool("m", {{"u1", "600"}, {"p1", "600"}, {"f1", "1"}});
  const absl::Time start = clock_.Now();
  Answer answer;
  issuer_->Issue(Request("m", absl::Seconds(8)), answer.Done(clock_));  // no key: the issuer picks one
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  clock_.Advance(absl::Seconds(1));
  absl::StatusOr<Issued> issued = answer.Get();
  ASSERT_TRUE(issued.ok()) << issued.status();
  EXPECT_EQ(issued->selection.account_id, "f1");
  EXPECT_EQ(answer.at(), start + absl::Seconds(1));
}

TEST_F(TokenIssuerTest, NotifyGivesAWaitingCallAFreshChance) {
  Cool("m", {{"u1", "600"}, {"p1", "600"}, {"f1", "600"}});
  Answer answer;
  issuer_->Issue(Request("m", absl::Seconds(30), &answer), answer.Done(clock_));
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  ASSERT_TRUE(pool_.Reset(ResetRequest{"p1", "m", false}).ok());
  issuer_->Notify();
  absl::StatusOr<Issued> issued = answer.Get();
  ASSERT_TRUE(issued.ok()) << issued.status();
  EXPECT_EQ(issued->selection.account_id, "p1");
  issuer_->Forget(&answer);
}

TEST_F(TokenIssuerTest, ACancelledWaiterIsAnsweredAtOnceAndTakesNoLease) {
  Cool("m", {{"u1", "600"}, {"p1", "600"}, {"f1", "600"}});
  Answer answer;
  issuer_->Issue(Request("m", absl::Seconds(600), &answer), answer.Done(clock_));
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  EXPECT_TRUE(issuer_->Cancel(&answer));
  EXPECT_TRUE(answer.done());
  EXPECT_TRUE(absl::IsCancelled(answer.Get().status()));
  EXPECT_EQ(issuer_->waiting(), 0u);
  ASSERT_TRUE(pool_.Reset(ResetRequest{"p1", "", false}).ok());
  issuer_->Notify();
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 0);
  issuer_->Forget(&answer);
}

TEST_F(TokenIssuerTest, ACallerThatWentAwayGetsCancelledAndNoLease) {
  Answer answer;
  IssueRequest request = Request("m");
  request.cancelled = [] { return true; };
  issuer_->Issue(std::move(request), answer.Done(clock_));
  EXPECT_TRUE(absl::IsCancelled(answer.Get().status()));
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 0);
}

TEST_F(TokenIssuerTest, ShutdownAnswersWaitingCalls) {
  Cool("m", {{"u1", "600"}, {"p1", "600"}, {"f1", "600"}});
  Answer answer;
  issuer_->Issue(Request("m", absl::Seconds(600), &answer), answer.Done(clock_));
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  issuer_->Shutdown();
  EXPECT_TRUE(answer.done());
  EXPECT_TRUE(absl::IsResourceExhausted(answer.Get().status()));
  EXPECT_EQ(answer.at(), clock_.Now());  // no wait for the clock
  issuer_->Forget(&answer);
}

// With a shared state backend, a selection that must claim a session fleet-wide (a Redis round
// trip) runs on the issuer's own threads, never on the caller's; one on a session already bound
// here needs no round trip and is answered the same.
TEST(TokenIssuerSharedStateTest, SelectionRunsOffTheCallersThread) {
  RedisProcess redis;
  auto up = FakeUpstream::Start({});
  ASSERT_TRUE(up.ok());
  HttpClient http;
  OAuthOptions o;
  o.token_url = (*up)->token_url();
  OAuthClient oauth(o, http);
  AccountPool pool(PoolOptions(), Clock::Real());
  pool.Load({Account("u1", Tier::kUltra), Account("p1", Tier::kPro)});
  RedisStateOptions ro;
  ro.address = redis.address();
  ro.prefix = "issuer:";
  RedisState state(ro);
  pool.AttachSharedState(&state);
  state.Start(&pool);
  ASSERT_TRUE(state.WaitUntilUp(absl::Seconds(10)));
  TokenManagerOptions to;
  to.background_refresh = false;
  TokenManager tokens(to, pool, oauth, nullptr, Clock::Real());
  tokens.AttachSharedState(&state);
  tokens.Start();
  TokenIssuerOptions options;
  options.selection_workers = 2;
  TokenIssuer issuer(options, pool, tokens, Clock::Real());
  for (int i = 0; i < 4; ++i) {
    Answer answer;
    IssueRequest request = Request("m");
    request.select.session_id = absl::StrCat("conversation-", i);  // new: claimed in Redis
    issuer.Issue(std::move(request), answer.Done(Clock::Real()));
    absl::StatusOr<Issued> issued = answer.Get();
    ASSERT_TRUE(issued.ok()) << issued.status();
    EXPECT_EQ(issued->selection.account_id, "u1");
    EXPECT_NE(answer.thread(), std::this_thread::get_id());
    pool.ReleaseLease(issued->selection.lease_id);
  }
  for (int i = 0; i < 3; ++i) {
    Answer answer;
    IssueRequest request = Request("m");
    request.select.session_id = "conversation-0";  // bound here: no round trip
    issuer.Issue(std::move(request), answer.Done(Clock::Real()));
    absl::StatusOr<Issued> issued = answer.Get();
    ASSERT_TRUE(issued.ok()) << issued.status();
    EXPECT_EQ(issued->selection.account_id, "u1");  // the session stays on its account
    pool.ReleaseLease(issued->selection.lease_id);
  }
  issuer.Shutdown();
  tokens.Stop();
  pool.AttachSharedState(nullptr);
  state.Stop();
}

}  // namespace
}  // namespace tokenbroker
