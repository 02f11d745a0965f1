// RedisState and RedisConnection against a real redis-server on a free loopback port (started
// and killed by the test), and the pool's side of the shared state.
#include "lib/state/redis_state.h"

#include <signal.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "lib/selection/account_pool.h"
#include "lib/common/clock.h"
#include "tests/unit/redis_process.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::tokenbroker::testing::Eventually;
using ::tokenbroker::testing::MakeAccount;
using ::tokenbroker::testing::FreePort;
using ::tokenbroker::testing::RedisProcess;
using ::tokenbroker::testing::TempDir;

RedisStateOptions Options(const RedisAddress& address) {
  RedisStateOptions o;
  o.address = address;
  o.prefix = "t:";
  return o;
}

// A replica's pool behind a RedisState.
struct Replica {
  explicit Replica(const RedisAddress& address, const std::vector<std::string>& ids = {"a", "b", "c"})
      : pool(PoolOptions{}, Clock::Real()), state(Options(address)) {
    std::vector<AccountRecord> records;
    for (const std::string& id : ids) records.push_back(MakeAccount(id, Tier::kPro));
    pool.Load(records);
    pool.AttachSharedState(&state);
    state.Start(&pool);
  }
  ~Replica() {
    pool.AttachSharedState(nullptr);
    state.Stop();
  }
  AccountPool pool;
  RedisState state;
};

TEST(RedisUrlTest, ParsesAndNamesTheFieldOnBadInput) {
  absl::StatusOr<RedisAddress> a = ParseRedisUrl("redis://10.0.0.5:6380/2", "--state_backend");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->host, "10.0.0.5");
  EXPECT_EQ(a->port, 6380);
  EXPECT_EQ(a->db, 2);
  a = ParseRedisUrl("redis://cache", "--state_backend");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->port, 6379);
  for (const char* bad : {"http://x:1", "redis://", "redis://h:0", "redis://h:99999", "redis://h:1/16",
                          "redis://user:pw@h:1", "redis://h:x"}) {
    absl::StatusOr<RedisAddress> r = ParseRedisUrl(bad, "--state_backend");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
    EXPECT_EQ(r.status().message().rfind("--state_backend", 0), 0u) << r.status().message();
    EXPECT_NE(r.status().message().find("redis://host:port"), std::string::npos);
  }
}

TEST(RedisConnectionTest, UnreachableServerIsUnavailableQuickly) {
  const absl::Time start = absl::Now();
  auto c = RedisConnection::Connect(RedisAddress{"127.0.0.1", FreePort(), 0}, absl::Milliseconds(200));
  EXPECT_TRUE(absl::IsUnavailable(c.status())) << c.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST(RedisConnectionTest, PasswordIsSentWithAuthAndNeverEchoed) {
  RedisProcess redis({"--requirepass", "s3cret-pw"});
  RedisAddress address = redis.address();
  auto anonymous = RedisConnection::Connect(address, absl::Seconds(1));
  ASSERT_TRUE(anonymous.ok());  // connecting needs no password; commands do
  EXPECT_FALSE((*anonymous)->Command({"GET", "x"}).ok());
  address.password = "wrong-pw";
  auto wrong = RedisConnection::Connect(address, absl::Seconds(1));
  EXPECT_TRUE(absl::IsPermissionDenied(wrong.status())) << wrong.status();
  EXPECT_EQ(wrong.status().message().find("wrong-pw"), std::string::npos);
  address.password = "s3cret-pw";
  auto right = RedisConnection::Connect(address, absl::Seconds(1));
  ASSERT_TRUE(right.ok()) << right.status();
  EXPECT_TRUE((*right)->Command({"SET", "x", "1"}).ok());
}

TEST(RedisStateTest, SessionClaimFirstWinsAndMovesNeedTheCurrentBinding) {
  RedisProcess redis;
  RedisState s(Options(redis.address()));
  Replica other(redis.address());  // a listener is needed; this replica only listens
  s.Start(&other.pool);
  ASSERT_TRUE(s.WaitUntilUp(absl::Seconds(5)));
  EXPECT_EQ(s.ClaimSession("s1", "", "a"), "a");
  EXPECT_EQ(s.ClaimSession("s1", "", "b"), "a");   // another replica's first claim loses
  EXPECT_EQ(s.ClaimSession("s1", "c", "b"), "a");  // a move from a stale binding loses
  EXPECT_EQ(s.ClaimSession("s1", "a", "b"), "b");  // a move from the current binding wins
  auto conn = redis.Connect();
  auto ttl = conn->Command({"PTTL", "t:s:s1"});
  ASSERT_TRUE(ttl.ok());
  EXPECT_GT(ttl->integer, 0);
  EXPECT_LE(ttl->integer, absl::ToInt64Milliseconds(absl::Hours(1)));
  s.Stop();
}

TEST(RedisStateTest, RefreshLockIsExclusiveAndALateWriterCannotOverwriteANewerToken) {
  RedisProcess redis;
  Replica r1(redis.address()), r2(redis.address());
  ASSERT_TRUE(r1.state.WaitUntilUp(absl::Seconds(5)));
  ASSERT_TRUE(r2.state.WaitUntilUp(absl::Seconds(5)));
  const absl::Time now = absl::Now();
  absl::StatusOr<int64_t> f1 = r1.state.LockRefresh("a", now + absl::Minutes(5));
  ASSERT_TRUE(f1.ok());
  EXPECT_GT(*f1, 0);
  EXPECT_EQ(*r2.state.LockRefresh("a", now + absl::Minutes(5)), 0);  // held by r1
  // r1's lock lapses (it stalled); r2 takes a newer fence and stores first.
  ASSERT_TRUE(redis.Connect()->Command({"DEL", "t:lock:a"}).ok());
  absl::StatusOr<int64_t> f2 = r2.state.LockRefresh("a", now + absl::Minutes(5));
  ASSERT_TRUE(f2.ok());
  EXPECT_GT(*f2, *f1);
  ASSERT_TRUE(r2.state.StoreToken("a", SharedToken{"tok-new", now + absl::Hours(1), std::nullopt}, *f2));
  EXPECT_FALSE(r1.state.StoreToken("a", SharedToken{"tok-late", now + absl::Hours(1), std::nullopt}, *f1));
  std::optional<SharedToken> t = r1.state.FetchToken("a", now + absl::Minutes(5));
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->access_token, "tok-new");
  // A good token stored: the lock answers -1 (fetch it), and the other replica got it pushed.
  EXPECT_EQ(*r1.state.LockRefresh("a", now + absl::Minutes(5)), -1);
  EXPECT_TRUE(Eventually([&] { return r1.pool.GetCredentials("a")->access_token == "tok-new"; }));
}

TEST(RedisStateTest, OutcomesLeasesAndDisablesReachTheOtherReplica) {
  RedisProcess redis;
  Replica r1(redis.address()), r2(redis.address());
  ASSERT_TRUE(r1.state.WaitUntilUp(absl::Seconds(5)));
  ASSERT_TRUE(r2.state.WaitUntilUp(absl::Seconds(5)));
  // A lease issued by r1, reported to r2.
  SelectRequest req;
  req.model = "m";
  absl::StatusOr<Selection> sel = r1.pool.Select(req);
  ASSERT_TRUE(sel.ok());
  ASSERT_TRUE(Eventually([&] {
    return redis.Connect()->Command({"HEXISTS", "t:l:" + sel->lease_id.substr(2, 16), sel->lease_id})->integer == 1;
  }));
  Outcome o;
  o.lease_id = sel->lease_id;
  o.http_status = 429;
  o.retry_after = "120";
  absl::StatusOr<OutcomeResult> res = r2.pool.ReportOutcome(o);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->account_id, sel->account_id);
  EXPECT_EQ(res->model, "m");
  // r1 sees the cooldown and the lease end.
  auto cooling_on_r1 = [&] {
    for (const AccountView& v : r1.pool.List()) {
      if (v.account_id == sel->account_id) return !v.cooldowns.empty() && v.in_flight == 0;
    }
    return false;
  };
  EXPECT_TRUE(Eventually(cooling_on_r1));
  // A runtime disable on r2 reaches r1.
  r2.pool.Disable("c", "invalid_grant: revoked");
  r2.state.AccountDisabled("c", "invalid_grant: revoked");
  EXPECT_TRUE(Eventually([&] { return r1.pool.GetCredentials("c")->disabled; }));
}

TEST(RedisStateTest, LeasesIssuedOnOneReplicaCountAgainstTheQuotaEstimateOfTheOthers) {
  RedisProcess redis;
  Replica r1(redis.address(), {"a"}), r2(redis.address(), {"a"});
  ASSERT_TRUE(r1.state.WaitUntilUp(absl::Seconds(5)));
  ASSERT_TRUE(r2.state.WaitUntilUp(absl::Seconds(5)));
  QuotaSettings quota;
  quota.enabled = true;
  quota.call_cost_prior = 0.1;
  r1.pool.SetQuotaSettings(quota);
  r2.pool.SetQuotaSettings(quota);
  QuotaObservation o;
  o.account_id = "a";
  o.model = "gemini-3-pro-high";
  o.remaining_fraction = 1.0;
  o.observed = absl::Now();
  o.reset_time = o.observed + absl::Hours(1);
  r1.pool.UpdateQuota({o});
  r2.pool.UpdateQuota({o});
  SelectRequest req;
  req.model = "gemini-3-flash";  // same family, same bucket
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(r1.pool.Select(req).ok());
  // r2 issued nothing, yet sees the five leases: 1.0 − 5 × 0.1.
  req.model = "gemini-3-pro-high";
  auto estimate_on_r2 = [&] { return r2.pool.Explain(req).accounts[0].estimated_fraction.value_or(-1); };
  EXPECT_TRUE(Eventually([&] { return std::abs(estimate_on_r2() - 0.5) < 1e-9; })) << estimate_on_r2();
}

TEST(RedisStateTest, DownMeansFailFastAndResyncMergesBothWays) {
  RedisProcess redis;
  auto r1 = std::make_unique<Replica>(redis.address());
  ASSERT_TRUE(r1->state.WaitUntilUp(absl::Seconds(5)));
  redis.Kill();
  ASSERT_TRUE(Eventually([&] { return !r1->state.Up(); }));
  const absl::Time start = absl::Now();
  EXPECT_FALSE(r1->state.ClaimSession("s", "", "a").has_value());
  EXPECT_TRUE(absl::IsUnavailable(r1->state.LockRefresh("a", start).status()));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(50));
  // Selection goes on locally, session included.
  SelectRequest req;
  req.model = "m";
  req.session_id = "s-down";
  absl::StatusOr<Selection> sel = r1->pool.Select(req);
  ASSERT_TRUE(sel.ok()) << sel.status();
  Outcome o;
  o.account_id = "b";
  o.model = "m";
  o.http_status = 429;
  o.retry_after = "300";
  ASSERT_TRUE(r1->pool.ReportOutcome(o).ok());
  // Back up (empty): r1 uploads its session binding and cooldown; a new replica learns both.
  redis.Start();
  ASSERT_TRUE(Eventually([&] { return r1->state.Up(); }));
  EXPECT_GE(r1->state.stats().resyncs, 2);
  EXPECT_GT(r1->state.stats().writes_dropped + r1->state.stats().errors, 0);
  Replica r2(redis.address());
  ASSERT_TRUE(r2.state.WaitUntilUp(absl::Seconds(5)));
  req.session_id = "s-down";
  absl::StatusOr<Selection> again = r2.pool.Select(req);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->account_id, sel->account_id);
  bool b_cooling = false;
  for (const AccountView& v : r2.pool.List()) {
    if (v.account_id == "b") b_cooling = !v.cooldowns.empty();
  }
  EXPECT_TRUE(b_cooling);
}

TEST(RedisStateTest, MalformedStateAndEventsAreIgnored) {
  RedisProcess redis;
  auto conn = redis.Connect();
  // What another version or a stray writer could leave behind.
  ASSERT_TRUE(conn->Command({"SET", "t:c:a", "not json"}).ok());
  ASSERT_TRUE(conn->Command({"SET", "t:c:b", R"({"streak":"many","items":[{"u":"soon"}]})"}).ok());
  ASSERT_TRUE(conn->Command({"HSET", "t:t:a", "tok", "x", "exp", "never"}).ok());
  Replica r1(redis.address()), r2(redis.address());
  ASSERT_TRUE(r1.state.WaitUntilUp(absl::Seconds(5)));
  ASSERT_TRUE(r2.state.WaitUntilUp(absl::Seconds(5)));
  for (const char* event : {"", "[]", "{", R"({"r":7})", R"({"r":"x","k":"o","a":1})", R"({"r":"x","k":"s"})",
                            R"({"r":"x","k":"t","a":"a","tok":"t","exp":"later"})", R"({"r":"x","k":"zzz"})",
                            R"({"r":"x","k":"c","a":"a","c":{"streak":[]}})"}) {
    ASSERT_TRUE(conn->Command({"PUBLISH", "t:events", event}).ok());
  }
  // Still up, and a good event after the bad ones still arrives.
  r2.pool.Disable("c", "invalid_grant: revoked");
  r2.state.AccountDisabled("c", "invalid_grant: revoked");
  EXPECT_TRUE(Eventually([&] { return r1.pool.GetCredentials("c")->disabled; }));
  EXPECT_TRUE(r1.state.Up());
  EXPECT_FALSE(r1.pool.GetCredentials("a")->disabled);
}

TEST(RedisStateTest, AHungServerIsNoticedWithoutAnyRequestAndRejoinedAfter) {
  RedisProcess redis;
  Replica r(redis.address());
  ASSERT_TRUE(r.state.WaitUntilUp(absl::Seconds(5)));
  const int64_t resyncs = r.state.stats().resyncs;
  redis.Pause();
  const absl::Time paused = absl::Now();
  ASSERT_TRUE(Eventually([&] { return !r.state.Up(); }));
  EXPECT_LT(absl::Now() - paused, absl::Seconds(4));  // the unanswered PING, not a request, noticed it
  redis.Resume();
  ASSERT_TRUE(Eventually([&] { return r.state.Up(); }));
  EXPECT_GT(r.state.stats().resyncs, resyncs);
}

}  // namespace
}  // namespace tokenbroker
