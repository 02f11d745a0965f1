// QuotaPoller against the fake upstream on loopback, on a fake clock; and MonitorService through a
// real in-process gRPC server with a subscriber that stops reading.
#include "lib/monitor/quota_poller.h"

#include <grpcpp/grpcpp.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/monitor/quota_hub.h"
#include "server/api/monitor_service.h"
#include "tests/fakes/fake_upstream.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using testing::AccountProfile;
using testing::Eventually;
using testing::MakeAccount;
using testing::FakeUpstream;
using testing::ScriptedReply;

class QuotaPollerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto up = FakeUpstream::Start({});
    ASSERT_TRUE(up.ok());
    upstream_ = *std::move(up);
    OAuthOptions o;
    o.token_url = upstream_->token_url();
    oauth_ = std::make_unique<OAuthClient>(o, http_);
    cloud_code_ = std::make_unique<CloudCodeClient>(std::vector<std::string>{upstream_->base_url()}, http_);
    TokenManagerOptions to;
    to.background_refresh = false;
    tokens_ = std::make_unique<TokenManager>(to, pool_, *oauth_, nullptr, clock_);
    tokens_->Start();
  }
  void TearDown() override { tokens_->Stop(); }

  std::unique_ptr<QuotaPoller> StartPoller(QuotaPollerOptions options) {
    auto p = std::make_unique<QuotaPoller>(options, pool_, *tokens_, *cloud_code_,
                                           [this](const std::vector<QuotaObservation>& o) { hub_.Publish(o); }, clock_);
    p->Start();
    return p;
  }

  FakeClock clock_{absl::Now()};
  AccountPool pool_{PoolOptions(), clock_};
  HttpClient http_;
  QuotaHub hub_;
  std::unique_ptr<FakeUpstream> upstream_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<CloudCodeClient> cloud_code_;
  std::unique_ptr<TokenManager> tokens_;
};

TEST_F(QuotaPollerTest, PollsEveryAccountOncePerIntervalWithBoundedConcurrency) {
  std::vector<AccountRecord> accounts;
  for (int i = 0; i < 6; ++i) {
    accounts.push_back(MakeAccount("a" + std::to_string(i)));
    upstream_->SetProfile("rt-a" + std::to_string(i),
                          AccountProfile{.project = "p" + std::to_string(i), .tier_id = "g1-pro-tier",
                                         .models_json = R"({"m":{"quotaInfo":{"remainingFraction":0.5}}})"});
  }
  pool_.Load(accounts);
  // Slow answers keep requests in flight long enough to see any overlap.
  upstream_->Script("/v1internal:fetchAvailableModels",
                    ScriptedReply{.status = 200, .body = R"({"models":{"m":{"quotaInfo":{"remainingFraction":0.5}}}})",
                                  .delay = absl::Milliseconds(40), .times = 0});
  QuotaPollerOptions o;
  o.interval = absl::Minutes(5);
  o.max_in_flight = 2;
  auto poller = StartPoller(o);
  const std::string path = "/v1internal:fetchAvailableModels";
  for (int round = 1; round <= 3; ++round) {
    ASSERT_TRUE(Eventually([&] { return poller->PollCount() == 6 * round; })) << "round " << round;
    for (int i = 0; i < 6; ++i) EXPECT_EQ(upstream_->CallsFor(path, "rt-a" + std::to_string(i)), round);
    clock_.Advance(o.interval * 1.1);  // past the longest jittered interval
  }
  EXPECT_LE(upstream_->MaxInFlight(path), 2);
  EXPECT_GE(upstream_->MaxInFlight(path), 1);
  // loadCodeAssist once per account (cached).
  EXPECT_EQ(upstream_->Calls("/v1internal:loadCodeAssist"), 6);
  int64_t sub = hub_.Subscribe({}, nullptr);
  QuotaHub::Batch b = hub_.Take(sub);
  EXPECT_EQ(b.observations.size(), 12u);  // per account: one account-level + one model
  for (const QuotaObservation& obs : b.observations) EXPECT_EQ(obs.tier, Tier::kPro);
}

TEST_F(QuotaPollerTest, RateLimitedQuotaApiBacksOffAndForbiddenIsReported) {
  pool_.Load({MakeAccount("a"), MakeAccount("b")});
  upstream_->SetProfile("rt-a", AccountProfile{.project = "pa"});
  upstream_->SetProfile("rt-b", AccountProfile{.project = "pb"});
  // b is forbidden (403 with and without a project); everything is rate-limited once.
  upstream_->Script("/v1internal:fetchAvailableModels",
                    ScriptedReply{.status = 403, .body = "{}", .times = 0, .match = "rt-b"});
  upstream_->Script("/v1internal:loadCodeAssist", ScriptedReply{.status = 429, .body = "{}", .times = 1});
  QuotaPollerOptions o;
  o.interval = absl::Minutes(5);
  o.max_in_flight = 1;
  o.rate_limit_backoff = absl::Seconds(30);
  auto poller = StartPoller(o);
  ASSERT_TRUE(Eventually([&] { return poller->PollCount() >= 1; }));
  // Paused: nothing more until the backoff passes on the clock.
  const int64_t calls = upstream_->Calls("/v1internal:loadCodeAssist");
  clock_.Advance(absl::Seconds(31));
  ASSERT_TRUE(Eventually([&] { return hub_.size() >= 2; }));
  EXPECT_GT(upstream_->Calls("/v1internal:loadCodeAssist"), calls);
  int64_t sub = hub_.Subscribe({"b"}, nullptr);
  QuotaHub::Batch b = hub_.Take(sub);
  ASSERT_FALSE(b.observations.empty());
  EXPECT_TRUE(b.observations[0].forbidden);
}

TEST_F(QuotaPollerTest, A429DefersOnlyThatAccountForTheDelayItAskedFor) {
  pool_.Load({MakeAccount("a"), MakeAccount("b")});
  upstream_->SetProfile("rt-a", AccountProfile{.project = "pa"});
  upstream_->SetProfile("rt-b", AccountProfile{.project = "pb"});
  upstream_->Script("/v1internal:fetchAvailableModels",
                    ScriptedReply{.status = 429,
                                  .body = R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[)"
                                          R"({"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"200s"}]}})",
                                  .times = 1,
                                  .match = "rt-a"});
  QuotaPollerOptions o;
  o.interval = absl::Seconds(60);
  o.jitter = 0;
  o.max_in_flight = 1;
  o.rate_limit_backoff = absl::Seconds(100);  // what a 429 without a delay would cost
  auto poller = StartPoller(o);
  const std::string path = "/v1internal:fetchAvailableModels";
  auto calls = [&](const char* rt) { return upstream_->CallsFor(path, rt); };
  ASSERT_TRUE(Eventually([&] { return poller->PollCount() == 2; }));
  ASSERT_EQ(calls("rt-a"), 1);
  ASSERT_EQ(calls("rt-b"), 1);
  // b keeps its schedule while a waits: no pause for the whole pool.
  clock_.Advance(absl::Seconds(61));
  ASSERT_TRUE(Eventually([&] { return calls("rt-b") == 2; }));
  EXPECT_EQ(calls("rt-a"), 1);
  // a waits the 200 s its answer asked for, not the 100 s default step.
  clock_.Advance(absl::Seconds(60));  // t = 121 s: b due again
  ASSERT_TRUE(Eventually([&] { return calls("rt-b") == 3; }));
  EXPECT_EQ(calls("rt-a"), 1);
  clock_.Advance(absl::Seconds(80));  // t = 201 s
  ASSERT_TRUE(Eventually([&] { return calls("rt-a") == 2; }));
}

TEST(MonitorService, AStalledReaderCostsOneEntryPerKeyAndOthersKeepStreaming) {
  QuotaHub hub;
  MonitorService service(hub);
  grpc::ServerBuilder builder;
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(port, 0);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = v1::QuotaMonitorService::NewStub(channel);

  // The stalled subscriber: opens the stream, never reads.
  grpc::ClientContext stalled_ctx;
  auto stalled = stub->WatchQuota(&stalled_ctx, v1::WatchQuotaRequest());
  grpc::ClientContext live_ctx;
  auto live = stub->WatchQuota(&live_ctx, v1::WatchQuotaRequest());
  v1::WatchQuotaResponse msg;
  ASSERT_TRUE(live->Read(&msg));
  EXPECT_TRUE(msg.snapshot());
  ASSERT_TRUE(Eventually([&] { return hub.subscribers() == 2; }));

  // Many large changes: far more than the stalled stream's flow-control window holds.
  const std::string big_model(2000, 'm');
  const absl::Time t0 = absl::Now();
  for (int i = 0; i < 3000; ++i) {
    QuotaObservation o;
    o.account_id = "acct-" + std::to_string(i % 40);
    o.model = big_model;
    o.remaining_fraction = (i % 100) / 100.0;
    o.observed = t0 + absl::Milliseconds(i);
    hub.Publish({o});
  }
  // The live reader sees the latest state of every key.
  std::map<std::string, absl::Time> latest;
  while (latest.size() < 40 || std::any_of(latest.begin(), latest.end(), [&](const auto& kv) {
           return kv.second < t0 + absl::Milliseconds(2960);
         })) {
    ASSERT_TRUE(live->Read(&msg));
    for (const auto& o : msg.observations()) {
      latest[o.account_id()] = absl::FromUnixSeconds(o.observed_time().seconds()) + absl::Nanoseconds(o.observed_time().nanos());
    }
  }
  EXPECT_EQ(hub.size(), 40u);
  // Whatever the stalled stream has not taken is at most one entry per key.
  EXPECT_LE(hub.MaxPending(), 40u);
  EXPECT_EQ(hub.subscribers(), 2u);
  stalled_ctx.TryCancel();
  live_ctx.TryCancel();
  stalled->Finish();
  live->Finish();
  server->Shutdown();
}

}  // namespace
}  // namespace tokenbroker
