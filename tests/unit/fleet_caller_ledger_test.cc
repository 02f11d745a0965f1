// Caller budgets across the fleet (issue 16.2): CallerAdmission over FleetCallerLedger, one per
// replica, on one real redis-server (started and killed by the test), on a fake clock shared by
// the replicas.
#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "lib/broker/caller_admission.h"
#include "lib/broker/fleet_caller_ledger.h"
#include "lib/common/clock.h"
#include "lib/common/errors.h"
#include "lib/selection/account_pool.h"
#include "lib/state/redis_state.h"
#include "tests/unit/redis_process.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::tokenbroker::testing::Eventually;
using ::tokenbroker::testing::RedisProcess;

constexpr absl::Duration kLeaseTimeout = absl::Minutes(10);

RedisStateOptions Options(const RedisAddress& address, const Clock& clock, absl::Duration command_timeout) {
  RedisStateOptions o;
  o.address = address;
  o.prefix = "cl:";
  o.lease_ttl = kLeaseTimeout;
  o.clock = &clock;
  o.command_timeout = command_timeout;
  // The hung-server PING runs on this clock too: the tests' jumps of the fake clock must not look
  // like a PING left unanswered.
  o.connect_timeout = absl::Hours(1);
  return o;
}

std::shared_ptr<const CallerPolicies> Policies(const std::string& text) {
  absl::StatusOr<CallerPolicies> parsed = ParseCallerPolicies(text, "policy");
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return std::make_shared<const CallerPolicies>(*std::move(parsed));
}

// One broker replica's caller admission, counting in Redis.
struct Replica {
  Replica(const RedisAddress& address, const Clock& clock, std::shared_ptr<const CallerPolicies> policies,
          absl::Duration command_timeout = absl::Seconds(5))
      : pool(PoolOptions{}, clock), state(Options(address, clock, command_timeout)), admission(clock, kLeaseTimeout) {
    state.Start(&pool);
    EXPECT_TRUE(state.WaitUntilUp(absl::Seconds(5)));
    admission.SetLedger(std::make_unique<FleetCallerLedger>(state, kLeaseTimeout));
    admission.SetPolicies(std::move(policies));
    PoolShape shape;
    shape.accounts = 4;
    shape.by_tier[Tier::kPro] = 4;
    admission.SetPoolShape(shape);
  }
  ~Replica() { state.Stop(); }

  AccountPool pool;
  RedisState state;
  CallerAdmission admission;
};

int64_t Members(RedisProcess& redis, const std::string& entry) {
  return redis.Connect()->Command({"ZCARD", "cl:a:caller:" + entry})->integer;
}

TEST(FleetCallerLedgerTest, MaxInflightHoldsUnderConcurrentReservationsFromThreeReplicas) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_inflight=3\n");
  const CallerPolicy& c = *policies->Find("c");
  Replica r1(redis.address(), clock, policies), r2(redis.address(), clock, policies),
      r3(redis.address(), clock, policies);
  std::vector<Replica*> replicas = {&r1, &r2, &r3};
  std::atomic<int> held{0}, peak{0}, issued{0}, refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 9; ++t) {
    threads.emplace_back([&, t] {
      Replica& mine = *replicas[t % 3];
      Replica& other = *replicas[(t + 1) % 3];
      // Each thread keeps its leases while it asks for more (as a proxy with calls in flight does),
      // and reports its oldest when refused.
      std::deque<std::string> mine_held;
      auto report_oldest = [&] {
        --held;  // our count drops before the release is sent: Redis's never falls below it
        other.admission.Released(mine_held.front());  // reported to another replica
        mine_held.pop_front();
      };
      // Until it has had 4 leases: a report (a queued write) frees a place for anyone, soon.
      int mine_issued = 0;
      const absl::Time deadline = absl::Now() + absl::Seconds(20);
      for (int i = 0; mine_issued < 4 && absl::Now() < deadline; ++i) {
        absl::StatusOr<std::shared_ptr<const CallerShare>> share = mine.admission.Reserve(c);
        if (!share.ok()) {
          EXPECT_EQ(ExhaustedCaller(share.status())->limit, "max_inflight");
          ++refused;
          if (!mine_held.empty()) report_oldest();
          continue;
        }
        const std::string lease = absl::StrCat("l-", t, "-", i);
        CallerAdmission::Committed done = mine.admission.Commit(c, lease, absl::StrCat("acct-", i % 4), Tier::kPro);
        ASSERT_TRUE(done.refused_limit.empty());
        const int now = ++held;
        int seen = peak.load();
        while (now > seen && !peak.compare_exchange_weak(seen, now)) {
        }
        ++issued;
        ++mine_issued;
        mine_held.push_back(lease);
      }
      while (!mine_held.empty()) report_oldest();
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_LE(peak.load(), 3);
  EXPECT_EQ(peak.load(), 3);  // the budget was reached
  EXPECT_GT(refused.load(), 0);
  EXPECT_EQ(issued.load(), 9 * 4);  // reports freed places for other replicas again and again
  // Every lease was released by id at a replica that did not issue it.
  EXPECT_TRUE(Eventually([&] { return Members(redis, "c") == 0; }));
  EXPECT_EQ(r1.state.stats().caller_unanswered, 0);
}

TEST(FleetCallerLedgerTest, MaxAccountsIsCheckedAtCommitAcrossReplicas) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_accounts=1\n");
  const CallerPolicy& c = *policies->Find("c");
  Replica r1(redis.address(), clock, policies), r2(redis.address(), clock, policies);
  // Both reserve before either commits: each may pick any account.
  absl::StatusOr<std::shared_ptr<const CallerShare>> one = r1.admission.Reserve(c);
  absl::StatusOr<std::shared_ptr<const CallerShare>> two = r2.admission.Reserve(c);
  ASSERT_TRUE(one.ok() && two.ok());
  EXPECT_EQ(*one, nullptr);
  EXPECT_EQ(*two, nullptr);
  ASSERT_TRUE(r1.admission.Commit(c, "l-1", "acct-x", Tier::kPro).refused_limit.empty());
  // r2 picked another account: the commit is refused, and names the one the caller holds.
  CallerAdmission::Committed refused = r2.admission.Commit(c, "l-2", "acct-y", Tier::kPro);
  EXPECT_EQ(refused.refused_limit, "max_accounts");
  ASSERT_NE(refused.retry_share, nullptr);
  EXPECT_TRUE(refused.retry_share->Blocks("acct-y", Tier::kPro));
  EXPECT_FALSE(refused.retry_share->Blocks("acct-x", Tier::kPro));
  absl::Status error = r2.admission.LimitError(c, refused.refused_limit, refused.detail);
  EXPECT_TRUE(absl::IsResourceExhausted(error));
  EXPECT_EQ(ExhaustedCaller(error)->limit, "max_accounts");
  EXPECT_EQ(RetryDelay(error), absl::Seconds(1));
  // The reservation stayed: committed on the held account, it is accepted.
  ASSERT_TRUE(r2.admission.Commit(c, "l-2", "acct-x", Tier::kPro).refused_limit.empty());
  // A new reservation now sees the held account fleet-wide: only it may serve.
  absl::StatusOr<std::shared_ptr<const CallerShare>> three = r2.admission.Reserve(c);
  ASSERT_TRUE(three.ok());
  ASSERT_NE(*three, nullptr);
  EXPECT_TRUE((*three)->Blocks("acct-y", Tier::kPro));
  EXPECT_FALSE((*three)->Blocks("acct-x", Tier::kPro));
  r2.admission.Cancel(c);
  // Both leases reported (to the replica that did not issue them): a new account is fine again.
  r2.admission.Released("l-1");
  r1.admission.Released("l-2");
  ASSERT_TRUE(Eventually([&] { return Members(redis, "c") == 0; }));
  ASSERT_TRUE(r1.admission.Reserve(c).ok());
  EXPECT_TRUE(r1.admission.Commit(c, "l-3", "acct-y", Tier::kPro).refused_limit.empty());
}

TEST(FleetCallerLedgerTest, ATierShareIsCheckedAtCommit) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_accounts.pro=1\n");
  const CallerPolicy& c = *policies->Find("c");
  Replica r1(redis.address(), clock, policies), r2(redis.address(), clock, policies);
  ASSERT_TRUE(r1.admission.Reserve(c).ok());
  ASSERT_TRUE(r2.admission.Reserve(c).ok());
  ASSERT_TRUE(r1.admission.Commit(c, "l-1", "pro-1", Tier::kPro).refused_limit.empty());
  EXPECT_EQ(r2.admission.Commit(c, "l-2", "pro-2", Tier::kPro).refused_limit, "max_tier_accounts");
  EXPECT_TRUE(r2.admission.Commit(c, "l-2", "ultra-1", Tier::kUltra).refused_limit.empty());  // another tier
}

TEST(FleetCallerLedgerTest, LeasesOfADeadReplicaFreeAtTheLeaseTimeoutNotBefore) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_inflight=2\n");
  const CallerPolicy& c = *policies->Find("c");
  Replica survivor(redis.address(), clock, policies);
  {
    Replica doomed(redis.address(), clock, policies);
    ASSERT_TRUE(doomed.admission.Reserve(c).ok());
    doomed.admission.Commit(c, "l-1", "acct-1", Tier::kPro);
    ASSERT_TRUE(doomed.admission.Reserve(c).ok());  // a reservation it never commits
  }  // gone without a word
  EXPECT_TRUE(absl::IsResourceExhausted(survivor.admission.Reserve(c).status()));
  clock.Advance(kLeaseTimeout - absl::Seconds(1));
  EXPECT_TRUE(absl::IsResourceExhausted(survivor.admission.Reserve(c).status()));
  clock.Advance(absl::Seconds(1));
  ASSERT_TRUE(survivor.admission.Reserve(c).ok());
  ASSERT_TRUE(survivor.admission.Reserve(c).ok());  // the full budget again
  EXPECT_EQ(Members(redis, "c"), 2);  // the expired members were purged
}

TEST(FleetCallerLedgerTest, MembersAndKeysAreBoundedByTheLimitsAndExpire) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_inflight=2\nd max_inflight=1\ne max_accounts=2\n");
  Replica r(redis.address(), clock, policies);
  const CallerPolicy& e = *policies->Find("e");
  // Callers hammering at their budgets, on ever new accounts: the set never holds more than
  // max_inflight members, the accounts hash never more than max_accounts fields.
  for (int i = 0; i < 50; ++i) {
    for (const char* entry : {"c", "d"}) {
      const CallerPolicy& p = *policies->Find(entry);
      if (r.admission.Reserve(p).ok()) r.admission.Commit(p, absl::StrCat("l-", entry, i), "acct-1", Tier::kPro);
    }
    ASSERT_TRUE(r.admission.Reserve(e).ok());
    if (!r.admission.Commit(e, absl::StrCat("l-e", i), absl::StrCat("acct-", i), Tier::kPro).refused_limit.empty()) {
      r.admission.Cancel(e);
    }
  }
  EXPECT_EQ(Members(redis, "c"), 2);
  EXPECT_EQ(Members(redis, "d"), 1);
  std::unique_ptr<RedisConnection> conn = redis.Connect();
  EXPECT_EQ(conn->Command({"HLEN", "cl:a:caller-accounts:e"})->integer, 2);
  // A hostile report of an unknown id (or of a key's name) touches nothing.
  r.admission.Released("l-nobody-issued");
  r.admission.Released("cl:a:caller:c");
  absl::StatusOr<RedisReply> keys = conn->Command({"KEYS", "cl:a:caller*"});
  ASSERT_TRUE(keys.ok());
  // Per entry a set and an accounts hash, and a pointer per live lease (2 + 1 + 2); each key
  // expires by itself.
  EXPECT_EQ(keys->elements.size(), 3u * 2u + 5u);
  for (const RedisReply& key : keys->elements) {
    absl::StatusOr<RedisReply> ttl = conn->Command({"PTTL", key.str});
    EXPECT_GT(ttl->integer, 0) << key.str;
    EXPECT_LE(ttl->integer, absl::ToInt64Milliseconds(kLeaseTimeout)) << key.str;
  }
  // Past the lease timeout the next call finds nothing held: expired members and their accounts go.
  clock.Advance(kLeaseTimeout);
  absl::StatusOr<std::shared_ptr<const CallerShare>> fresh = r.admission.Reserve(e);
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(*fresh, nullptr);  // any account
  EXPECT_EQ(conn->Command({"HLEN", "cl:a:caller-accounts:e"})->integer, 0);
  EXPECT_EQ(Members(redis, "e"), 1);  // the new reservation
}

TEST(FleetCallerLedgerTest, RedisDownFallsBackToThisReplicasCount) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_inflight=1\n");
  const CallerPolicy& c = *policies->Find("c");
  Replica r1(redis.address(), clock, policies, absl::Milliseconds(200)),
      r2(redis.address(), clock, policies, absl::Milliseconds(200));
  ASSERT_TRUE(r1.admission.Reserve(c).ok());
  r1.admission.Commit(c, "l-1", "acct-1", Tier::kPro);
  EXPECT_TRUE(absl::IsResourceExhausted(r2.admission.Reserve(c).status()));  // fleet-wide: full
  redis.Kill();
  // Each replica now counts its own leases: r1 is full, r2 has room for one.
  EXPECT_TRUE(absl::IsResourceExhausted(r1.admission.Reserve(c).status()));
  ASSERT_TRUE(r2.admission.Reserve(c).ok());
  CallerAdmission::Committed done = r2.admission.Commit(c, "l-2", "acct-2", Tier::kPro);
  EXPECT_TRUE(done.refused_limit.empty());
  EXPECT_EQ(done.leases_left, 0);
  EXPECT_TRUE(absl::IsResourceExhausted(r2.admission.Reserve(c).status()));
  r2.admission.Released("l-2");
  EXPECT_TRUE(r2.admission.Reserve(c).ok());
  r2.admission.Cancel(c);
  EXPECT_GE(r1.state.stats().caller_unanswered + r2.state.stats().caller_unanswered, 3);
}

TEST(FleetCallerLedgerTest, AHungRedisCostsOneBoundedWait) {
  RedisProcess redis;
  FakeClock clock;
  auto policies = Policies("c max_inflight=1\n");
  const CallerPolicy& c = *policies->Find("c");
  Replica r(redis.address(), clock, policies, absl::Milliseconds(50));
  redis.Pause();
  const absl::Time asked = absl::Now();
  EXPECT_TRUE(r.admission.Reserve(c).ok());  // decided on the local count
  EXPECT_LT(absl::Now() - asked, absl::Seconds(1));
  EXPECT_EQ(r.state.stats().caller_unanswered, 1);
  r.admission.Commit(c, "l-1", "acct-1", Tier::kPro);
  EXPECT_TRUE(absl::IsResourceExhausted(r.admission.Reserve(c).status()));
  redis.Resume();
}

}  // namespace
}  // namespace tokenbroker
