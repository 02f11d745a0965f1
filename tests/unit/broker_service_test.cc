// BrokerService through a real in-process gRPC server, with the real pool, token manager and the
// fake upstream on loopback, all on a fake clock (waiting calls move when the test advances it).
#include "server/api/broker_service.h"

#include <grpcpp/grpcpp.h>

#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "gtest/gtest.h"
#include "tests/fakes/fake_upstream.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using testing::FakeUpstream;
using testing::ScriptedReply;

AccountRecord Account(const std::string& id, Tier tier) {
  AccountRecord r;
  r.id = id;
  r.email = id + "@example.com";
  r.refresh_token = "rt-" + id;
  r.project_id = "proj-" + id;
  r.tier = tier;
  return r;
}

class BrokerServiceTest : public ::testing::Test {
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
    to.background_refresh = false;  // tokens are fetched only when a test asks
    tokens_ = std::make_unique<TokenManager>(to, pool_, *oauth_, nullptr, clock_);
    tokens_->Start();
    service_ = std::make_unique<BrokerService>(pool_, *tokens_, nullptr, clock_);
    grpc::ServerBuilder builder;
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    stub_ = v1::TokenBrokerService::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    server_->Shutdown();
    tokens_->Stop();
  }

  // Hands out a token of each of the three accounts for `model` and reports a 429 for each, with
  // the given Retry-After values in the order the accounts were handed out.
  void CoolAll(const std::string& model, const std::vector<std::string>& retry_afters);

  grpc::Status GetToken(const v1::GetTokenRequest& req, v1::GetTokenResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub_->GetToken(&ctx, req, resp);
  }

  // Starts at real time: the token manager's refresh give-up and token expiries stay plausible.
  FakeClock clock_{absl::Now()};
  AccountPool pool_{PoolOptions(), clock_};
  HttpClient http_;
  std::unique_ptr<FakeUpstream> upstream_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<TokenManager> tokens_;
  std::unique_ptr<BrokerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::TokenBrokerService::Stub> stub_;
};

TEST_F(BrokerServiceTest, GetTokenReturnsTheBestAccountsFreshToken) {
  v1::GetTokenRequest req;
  req.set_model("gemini-3-pro-high");
  v1::GetTokenResponse resp;
  grpc::Status s = GetToken(req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.account_id(), "u1");
  EXPECT_EQ(resp.email(), "u1@example.com");
  EXPECT_EQ(resp.project_id(), "proj-u1");
  EXPECT_EQ(resp.tier(), v1::TIER_ULTRA);
  EXPECT_THAT(resp.access_token(), HasSubstr("ya29.fake-"));
  EXPECT_GT(resp.expire_time().seconds(), absl::ToUnixSeconds(absl::Now() + absl::Minutes(50)));
}

TEST_F(BrokerServiceTest, InvalidFieldsGetInvalidArgumentWithBadRequest) {
  struct Case {
    std::string model, session, field;
  } cases[] = {
      {"", "", "model"},
      {"gemini pro", "", "model"},
      {"m", std::string(10 * 1024, 's'), "session_id"},
  };
  for (const Case& c : cases) {
    v1::GetTokenRequest req;
    req.set_model(c.model);
    req.set_session_id(c.session);
    v1::GetTokenResponse resp;
    grpc::Status s = GetToken(req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_THAT(s.error_message(), HasSubstr(c.field));
    google::rpc::Status rich;
    ASSERT_TRUE(rich.ParseFromString(s.error_details()));
    ASSERT_EQ(rich.details_size(), 1);
    google::rpc::BadRequest bad;
    ASSERT_TRUE(rich.details(0).UnpackTo(&bad));
    ASSERT_EQ(bad.field_violations_size(), 1);
    EXPECT_EQ(bad.field_violations(0).field(), c.field);
  }
  EXPECT_EQ(upstream_->Calls("/token"), 0);
}

TEST_F(BrokerServiceTest, RefreshFailureFallsBackToTheNextAccount) {
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 1, .match = "rt-u1"});
  v1::GetTokenRequest req;
  req.set_model("m");
  v1::GetTokenResponse resp;
  grpc::Status s = GetToken(req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.account_id(), "p1");
}

TEST_F(BrokerServiceTest, NoTokenAnywhereIsUnavailable) {
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 0});
  v1::GetTokenRequest req;
  req.set_model("m");
  v1::GetTokenResponse resp;
  grpc::Status s = GetToken(req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(s.error_message(), HasSubstr("HTTP 503"));
}

TEST_F(BrokerServiceTest, ListAccountsCarriesNoSecrets) {
  v1::GetTokenRequest req;
  req.set_model("m");
  v1::GetTokenResponse token;
  ASSERT_TRUE(GetToken(req, &token).ok());
  grpc::ClientContext ctx;
  v1::ListAccountsResponse resp;
  ASSERT_TRUE(stub_->ListAccounts(&ctx, v1::ListAccountsRequest(), &resp).ok());
  ASSERT_EQ(resp.accounts_size(), 3);
  std::string dump = resp.DebugString();
  EXPECT_THAT(dump, ::testing::Not(HasSubstr(token.access_token())));
  EXPECT_THAT(dump, ::testing::Not(HasSubstr("rt-")));
  EXPECT_EQ(resp.accounts(0).account_id(), "f1");
  EXPECT_EQ(resp.accounts(0).state(), v1::ACCOUNT_STATE_ENABLED);
}

TEST_F(BrokerServiceTest, ExplainSelectionRanksByTier) {
  grpc::ClientContext ctx;
  v1::ExplainSelectionRequest req;
  req.set_model("m");
  v1::ExplainSelectionResponse resp;
  ASSERT_TRUE(stub_->ExplainSelection(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.chosen_account_id(), "u1");
  ASSERT_EQ(resp.accounts_size(), 3);
  EXPECT_EQ(resp.accounts(0).verdict(), v1::VERDICT_CHOSEN);
  EXPECT_EQ(resp.accounts(1).account_id(), "p1");
  EXPECT_EQ(resp.accounts(1).verdict(), v1::VERDICT_RANKED_LOWER);
  EXPECT_THAT(resp.accounts(1).detail(), HasSubstr("lower tier"));
  EXPECT_EQ(resp.accounts(2).account_id(), "f1");
}

// Reports `status` for a token just handed out for `model`.
v1::ReportOutcomeResponse ReportFor(v1::TokenBrokerService::Stub& stub, const std::string& lease, int status,
                                    const std::string& retry_after) {
  grpc::ClientContext ctx;
  v1::ReportOutcomeRequest req;
  req.set_lease_id(lease);
  req.set_http_status(status);
  req.set_retry_after(retry_after);
  v1::ReportOutcomeResponse resp;
  grpc::Status s = stub.ReportOutcome(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return resp;
}

void BrokerServiceTest::CoolAll(const std::string& model, const std::vector<std::string>& retry_afters) {
  for (const std::string& retry_after : retry_afters) {
    v1::GetTokenRequest req;
    req.set_model(model);
    v1::GetTokenResponse resp;
    ASSERT_TRUE(GetToken(req, &resp).ok());
    ReportFor(*stub_, resp.lease_id(), 429, retry_after);
  }
}

TEST_F(BrokerServiceTest, AllCoolingGivesResourceExhaustedWithRetryInfoAndQuotaFailure) {
  for (int i = 0; i < 3; ++i) {
    v1::GetTokenRequest req;
    req.set_model("m");
    v1::GetTokenResponse resp;
    ASSERT_TRUE(GetToken(req, &resp).ok());
    ASSERT_FALSE(resp.lease_id().empty());
    v1::ReportOutcomeResponse r = ReportFor(*stub_, resp.lease_id(), 429, i == 1 ? "40" : "600");
    EXPECT_EQ(r.scope(), v1::COOLDOWN_SCOPE_MODEL);
    EXPECT_EQ(r.model(), "m");
  }
  v1::GetTokenRequest req;
  req.set_model("m");
  v1::GetTokenResponse resp;
  grpc::Status s = GetToken(req, &resp);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  google::rpc::Status rich;
  ASSERT_TRUE(rich.ParseFromString(s.error_details()));
  google::rpc::RetryInfo retry;
  google::rpc::QuotaFailure failure;
  for (const auto& any : rich.details()) {
    if (any.Is<google::rpc::RetryInfo>()) any.UnpackTo(&retry);
    if (any.Is<google::rpc::QuotaFailure>()) any.UnpackTo(&failure);
  }
  EXPECT_GT(retry.retry_delay().seconds(), 38);
  EXPECT_LE(retry.retry_delay().seconds(), 40);
  ASSERT_EQ(failure.violations_size(), 1);
  EXPECT_EQ(failure.violations(0).subject(), "model:m");
  // Another model is still served.
  req.set_model("n");
  EXPECT_TRUE(GetToken(req, &resp).ok());
}

TEST_F(BrokerServiceTest, MaxWaitServesAsSoonAsAnAccountFrees) {
  CoolAll("m", {"600", "600", "1"});
  v1::GetTokenRequest req;
  req.set_model("m");
  req.mutable_max_wait()->set_seconds(8);
  v1::GetTokenResponse resp;
  const absl::Time start = absl::Now();
  grpc::Status s;
  std::thread waiter([&] { s = GetToken(req, &resp); });
  // Once the call waits, the one-second cooldown ends on the clock.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (service_->WaitingCalls() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_EQ(service_->WaitingCalls(), 1u);
  clock_.Advance(absl::Seconds(1));
  waiter.join();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.account_id(), "f1");  // the one whose cooldown was 1 s
  EXPECT_LT(absl::Now() - start, absl::Seconds(6));
}

TEST_F(BrokerServiceTest, MaxWaitShorterThanTheCooldownGivesTheErrorAtTheDeadline) {
  CoolAll("m", {"600", "600", "600"});
  v1::GetTokenRequest req;
  req.set_model("m");
  req.mutable_max_wait()->set_nanos(300'000'000);
  v1::GetTokenResponse resp;
  grpc::Status s;
  std::thread waiter([&] { s = GetToken(req, &resp); });
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (service_->WaitingCalls() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_EQ(service_->WaitingCalls(), 1u);
  // Short of max_wait on the clock the call still waits; at max_wait it gets the error. (The exact
  // instant is checked in token_issuer_test.)
  clock_.Advance(absl::Milliseconds(290));
  EXPECT_EQ(service_->WaitingCalls(), 1u);
  clock_.Advance(absl::Milliseconds(10));
  waiter.join();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(service_->WaitingCalls(), 0u);
}

TEST_F(BrokerServiceTest, AnOperatorsResetWakesAWaitingCall) {
  CoolAll("m", {"600", "600", "600"});
  absl::Time start = absl::Now();
  std::string got;
  std::thread waiter([&] {
    v1::GetTokenRequest req;
    req.set_model("m");
    req.mutable_max_wait()->set_seconds(30);
    v1::GetTokenResponse resp;
    grpc::Status s = GetToken(req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    got = resp.account_id();
  });
  // Poll (with a deadline) until the call is parked, then lift p1's cooldown on m. (A success
  // report would not: it never ends a live cooldown.)
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (service_->WaitingCalls() == 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_EQ(service_->WaitingCalls(), 1u);
  grpc::ClientContext ctx;
  v1::ResetAccountRequest reset;
  reset.set_account_id("p1");
  reset.set_model("m");
  v1::ResetAccountResponse resp;
  ASSERT_TRUE(stub_->ResetAccount(&ctx, reset, &resp).ok());
  EXPECT_TRUE(resp.cooldown_lifted());
  waiter.join();
  EXPECT_EQ(got, "p1");
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(service_->WaitingCalls(), 0u);
}

// Issue 11 item 12: a waiting call its client abandons leaves the queue at once and takes no lease.
TEST_F(BrokerServiceTest, AnAbandonedWaiterLeavesTheQueueAtOnceAndTakesNoLease) {
  CoolAll("m", {"600", "600", "600"});
  for (int i = 0; i < 20; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
    v1::GetTokenRequest req;
    req.set_model("m");
    req.mutable_max_wait()->set_seconds(600);
    v1::GetTokenResponse resp;
    EXPECT_EQ(stub_->GetToken(&ctx, req, &resp).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  while (service_->WaitingCalls() > 0 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  EXPECT_EQ(service_->WaitingCalls(), 0u);
  // The account frees: nobody takes a lease for the callers that went away.
  grpc::ClientContext ctx;
  v1::ResetAccountRequest reset;
  reset.set_account_id("p1");
  v1::ResetAccountResponse resp;
  ASSERT_TRUE(stub_->ResetAccount(&ctx, reset, &resp).ok());
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 0);
}

// Issue 11 item 13: the account whose token fails is skipped and the others are cooling: that is
// RESOURCE_EXHAUSTED with the time until one frees, not UNAVAILABLE.
TEST_F(BrokerServiceTest, ATokenFailureWhileOthersCoolGivesResourceExhaustedWithRetryInfo) {
  upstream_->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 0, .match = "rt-u1"});
  for (const char* account : {"p1", "f1"}) {
    grpc::ClientContext ctx;
    v1::ReportOutcomeRequest r;
    r.set_account_id(account);
    r.set_model("m");
    r.set_http_status(429);
    r.set_retry_after("90");
    v1::ReportOutcomeResponse resp;
    ASSERT_TRUE(stub_->ReportOutcome(&ctx, r, &resp).ok());
  }
  v1::GetTokenRequest req;
  req.set_model("m");
  v1::GetTokenResponse resp;
  grpc::Status s = GetToken(req, &resp);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("tokens could not be had"));
  google::rpc::Status rich;
  ASSERT_TRUE(rich.ParseFromString(s.error_details()));
  google::rpc::RetryInfo retry;
  for (const auto& any : rich.details()) {
    if (any.Is<google::rpc::RetryInfo>()) any.UnpackTo(&retry);
  }
  EXPECT_GE(retry.retry_delay().seconds(), 88);
}

// Issue 11 item 6: however much state callers give the accounts, a ListAccounts page stays within
// the message limit, and the pages together hold every account once.
TEST_F(BrokerServiceTest, ListAccountsPages) {
  std::vector<AccountRecord> many;
  for (int i = 0; i < 300; ++i) many.push_back(Account(absl::StrCat("acct-", 1000 + i), Tier::kPro));
  pool_.Load(many);
  for (int i = 0; i < 300; ++i) {
    for (int m = 0; m < 64; ++m) {
      Outcome o;
      o.account_id = absl::StrCat("acct-", 1000 + i);
      o.model = absl::StrCat("model-", m);
      o.http_status = 429;
      o.retry_after = "3600";
      o.error_body = std::string(2000, 'x');
      ASSERT_TRUE(pool_.ReportOutcome(o).ok());
    }
  }
  std::set<std::string> seen;
  v1::ListAccountsRequest req;
  int pages = 0;
  do {
    grpc::ClientContext ctx;
    v1::ListAccountsResponse page;
    ASSERT_TRUE(stub_->ListAccounts(&ctx, req, &page).ok());
    EXPECT_LT(page.ByteSizeLong(), 2u << 20);
    for (const auto& a : page.accounts()) EXPECT_TRUE(seen.insert(a.account_id()).second);
    req.set_page_token(page.next_page_token());
    ++pages;
  } while (!req.page_token().empty());
  EXPECT_EQ(seen.size(), 300u);
  EXPECT_GT(pages, 1);
  req.set_page_token("");
  req.set_page_size(7);
  grpc::ClientContext ctx;
  v1::ListAccountsResponse page;
  ASSERT_TRUE(stub_->ListAccounts(&ctx, req, &page).ok());
  EXPECT_EQ(page.accounts_size(), 7);
  EXPECT_EQ(page.next_page_token(), "acct-1006");
}

TEST_F(BrokerServiceTest, ReportOutcomeValidatesItsFields) {
  struct Case {
    v1::ReportOutcomeRequest req;
    std::string field;
  };
  std::vector<Case> cases(5);
  cases[0].field = "lease_id";
  cases[0].req.set_http_status(200);
  cases[1].req.set_account_id("u1");
  cases[1].req.set_model("m");
  cases[1].req.set_http_status(42);
  cases[1].field = "http_status";
  cases[2].req.set_account_id("u1");
  cases[2].req.set_model("bad model");
  cases[2].req.set_http_status(429);
  cases[2].field = "model";
  cases[3].req.set_account_id("u1");
  cases[3].req.set_model("m");
  cases[3].req.set_http_status(429);
  cases[3].req.set_error_body(std::string(70000, 'x'));
  cases[3].field = "error_body";
  cases[4].req.set_account_id("u1");
  cases[4].req.set_http_status(429);
  cases[4].field = "model";
  for (const Case& c : cases) {
    grpc::ClientContext ctx;
    v1::ReportOutcomeResponse resp;
    grpc::Status s = stub_->ReportOutcome(&ctx, c.req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.field;
    EXPECT_THAT(s.error_message(), HasSubstr(c.field));
  }
  grpc::ClientContext ctx;
  v1::ReportOutcomeRequest unknown;
  unknown.set_lease_id("l-0000");
  unknown.set_http_status(200);
  v1::ReportOutcomeResponse resp;
  EXPECT_EQ(stub_->ReportOutcome(&ctx, unknown, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(BrokerServiceTest, SetQuotaManagerValidatesAndAnswersTheEffectiveSettings) {
  {
    grpc::ClientContext ctx;
    v1::SetQuotaManagerRequest req;
    req.set_enabled(true);
    req.set_low_threshold(0.02);  // below the default exhausted threshold 0.05
    v1::SetQuotaManagerResponse resp;
    grpc::Status s = stub_->SetQuotaManager(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("exhausted_threshold"));
  }
  grpc::ClientContext ctx;
  v1::SetQuotaManagerRequest req;
  req.set_enabled(true);
  req.mutable_cache_ttl()->set_seconds(60);
  req.set_low_threshold(0.2);
  v1::SetQuotaManagerResponse resp;
  ASSERT_TRUE(stub_->SetQuotaManager(&ctx, req, &resp).ok());
  EXPECT_TRUE(resp.enabled());
  EXPECT_EQ(resp.cache_ttl().seconds(), 60);
  EXPECT_DOUBLE_EQ(resp.low_threshold(), 0.2);
  EXPECT_DOUBLE_EQ(resp.exhausted_threshold(), 0.05);
  EXPECT_TRUE(pool_.quota_settings().enabled);
}

}  // namespace
}  // namespace tokenbroker
