// Fleet-wide admission (issue 16, docs/ARCHITECTURE.md §7): the in-flight cap and the half-open probe
// counted across replicas through a real redis-server (started and killed by the test), on a
// fake clock shared by the replicas.
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "lib/common/clock.h"
#include "lib/common/errors.h"
#include "lib/selection/account_pool.h"
#include "lib/state/redis_state.h"
#include "tests/unit/redis_process.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::tokenbroker::testing::Eventually;
using ::tokenbroker::testing::MakeAccount;
using ::tokenbroker::testing::RedisProcess;

constexpr absl::Duration kLeaseTimeout = absl::Minutes(10);

RedisStateOptions Options(const RedisAddress& address, const Clock& clock) {
  RedisStateOptions o;
  o.address = address;
  o.prefix = "fa:";
  o.lease_ttl = kLeaseTimeout;
  o.clock = &clock;
  // The hung-server PING runs on this clock too: the tests' jumps of the fake clock must not look
  // like a PING left unanswered.
  o.connect_timeout = absl::Hours(1);
  return o;
}

PoolOptions Capped(int cap) {
  PoolOptions o;
  o.max_inflight_per_account = cap;
  o.lease_timeout = kLeaseTimeout;
  return o;
}

// One broker replica: its pool behind a RedisState, on the shared fake clock. "a" is ULTRA, so
// every replica ranks it first; "b" is PRO.
struct Replica {
  Replica(const RedisAddress& address, const Clock& clock, PoolOptions options,
          const std::vector<std::string>& ids = {"a"})
      : pool(std::move(options), clock), state(Options(address, clock)) {
    std::vector<AccountRecord> records;
    for (const std::string& id : ids) records.push_back(MakeAccount(id, id == "a" ? Tier::kUltra : Tier::kPro));
    pool.Load(records);
    pool.AttachSharedState(&state);
    state.Start(&pool);
    EXPECT_TRUE(state.WaitUntilUp(absl::Seconds(5)));
  }
  ~Replica() {
    pool.AttachSharedState(nullptr);
    state.Stop();
  }
  AccountPool pool;
  RedisState state;
};

SelectRequest Req(const std::string& model = "m") {
  SelectRequest r;
  r.model = model;
  return r;
}

int64_t Reserved(RedisProcess& redis, const std::string& account) {
  return redis.Connect()->Command({"ZCARD", "fa:a:" + account})->integer;
}

TEST(FleetAdmissionTest, TheScriptCountsEveryReplicasLiveReservationsAndDropsExpiredOnes) {
  RedisProcess redis;
  FakeClock clock;
  Replica r1(redis.address(), clock, Capped(2)), r2(redis.address(), clock, Capped(2));
  RedisState& one = r1.state;
  RedisState& two = r2.state;
  AdmissionRequest ask;
  ask.account = "a";
  ask.model = "m";
  ask.cap = 2;
  ask.now = clock.Now();
  ask.expires = ask.now + absl::Seconds(30);
  ask.probe_ttl = absl::Seconds(60);
  ask.lease_id = "l-1";
  ASSERT_EQ(one.Admit(ask)->verdict, AdmissionVerdict::kAdmitted);
  ask.lease_id = "l-2";
  std::optional<AdmissionResult> second = two.Admit(ask);
  ASSERT_EQ(second->verdict, AdmissionVerdict::kAdmitted);
  EXPECT_EQ(second->in_flight, 2);
  ask.lease_id = "l-3";
  std::optional<AdmissionResult> third = one.Admit(ask);
  ASSERT_EQ(third->verdict, AdmissionVerdict::kAtCap);
  EXPECT_EQ(third->in_flight, 2);
  EXPECT_EQ(third->frees, ask.expires);
  // A release frees one place for whoever asks next.
  one.ReleaseAdmission("a", "m", "l-1");
  ASSERT_TRUE(Eventually([&] { return two.Admit(ask)->verdict == AdmissionVerdict::kAdmitted; }));
  // Nobody releases l-2 and l-3 (their replica died): past their expiry they count no more.
  ask.lease_id = "l-4";
  EXPECT_EQ(one.Admit(ask)->verdict, AdmissionVerdict::kAtCap);
  ask.now += absl::Seconds(30);
  ask.expires = ask.now + absl::Seconds(30);
  EXPECT_EQ(one.Admit(ask)->verdict, AdmissionVerdict::kAdmitted);
  EXPECT_EQ(Reserved(redis, "a"), 1);
  // The set itself expires with its last lease.
  EXPECT_GT(redis.Connect()->Command({"PTTL", "fa:a:a"})->integer, 0);
  EXPECT_EQ(one.stats().admissions_at_cap, 2);
}

TEST(FleetAdmissionTest, ACapOfTwoHoldsAcrossThreeReplicasAndAReportFreesAPlaceForAnyOfThem) {
  RedisProcess redis;
  FakeClock clock;
  Replica r1(redis.address(), clock, Capped(2)), r2(redis.address(), clock, Capped(2)),
      r3(redis.address(), clock, Capped(2));
  // Selection under a fleet cap needs a round trip: never on the caller's thread.
  EXPECT_FALSE(r1.pool.SelectHere(Req()).has_value());
  absl::StatusOr<Selection> s1 = r1.pool.Select(Req());
  absl::StatusOr<Selection> s2 = r2.pool.Select(Req());
  ASSERT_TRUE(s1.ok()) << s1.status();
  ASSERT_TRUE(s2.ok()) << s2.status();
  // r3 holds no lease of its own, yet the fleet is at the cap.
  absl::StatusOr<Selection> s3 = r3.pool.Select(Req());
  ASSERT_TRUE(absl::IsResourceExhausted(s3.status())) << s3.status();
  EXPECT_NE(s3.status().message().find("fleet-wide lease cap (max_inflight_per_account=2"), std::string::npos)
      << s3.status().message();
  std::optional<absl::Duration> retry = RetryDelay(s3.status());
  ASSERT_TRUE(retry.has_value());
  EXPECT_LE(*retry, absl::Milliseconds(200));
  EXPECT_FALSE(r1.pool.Select(Req()).ok());
  EXPECT_EQ(Reserved(redis, "a"), 2);
  // r1's lease reported to r3 (which takes it from Redis): its place is free at once, for r3.
  Outcome done;
  done.lease_id = s1->lease_id;
  done.http_status = 200;
  // (once r1's write-behind has filed the lease in Redis)
  ASSERT_TRUE(Eventually([&] { return r3.pool.ReportOutcome(done).ok(); }));
  ASSERT_TRUE(Eventually([&] { return Reserved(redis, "a") == 1; }));
  absl::StatusOr<Selection> s4 = r3.pool.Select(Req());
  ASSERT_TRUE(s4.ok()) << s4.status();
  // A lease given back unused (its token could not be had) frees its place too.
  r2.pool.ReleaseLease(s2->lease_id);
  ASSERT_TRUE(Eventually([&] { return Reserved(redis, "a") == 1; }));
  EXPECT_TRUE(r1.pool.Select(Req()).ok());
  EXPECT_EQ(Reserved(redis, "a"), 2);
}

TEST(FleetAdmissionTest, AnAccountFullFleetWideIsSkippedForTheNextOneWithRoom) {
  RedisProcess redis;
  FakeClock clock;
  Replica r1(redis.address(), clock, Capped(1), {"a", "b"}), r2(redis.address(), clock, Capped(1), {"a", "b"});
  absl::StatusOr<Selection> first = r1.pool.Select(Req());
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->account_id, "a");
  // r2's own view has "a" free and ranked first; the fleet has no room on it: "b".
  absl::StatusOr<Selection> second = r2.pool.Select(Req());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->account_id, "b");
  absl::StatusOr<Selection> third = r2.pool.Select(Req());
  ASSERT_TRUE(absl::IsResourceExhausted(third.status()));
  // The lease ids are the reservations' names: the one Redis counts is the one handed out.
  EXPECT_EQ(redis.Connect()->Command({"ZSCORE", "fa:a:b", second->lease_id})->type, RedisReply::Type::kString);
}

TEST(FleetAdmissionTest, TheLeasesOfAReplicaThatDiedFreeAtTheLeaseTimeout) {
  RedisProcess redis;
  FakeClock clock;
  auto doomed = std::make_unique<Replica>(redis.address(), clock, Capped(2));
  ASSERT_TRUE(doomed->pool.Select(Req()).ok());
  ASSERT_TRUE(doomed->pool.Select(Req()).ok());
  // Gone without a word: nothing is released.
  doomed->state.Stop();
  doomed.reset();
  Replica survivor(redis.address(), clock, Capped(2));
  EXPECT_TRUE(absl::IsResourceExhausted(survivor.pool.Select(Req()).status()));
  clock.Advance(kLeaseTimeout - absl::Seconds(1));
  EXPECT_TRUE(absl::IsResourceExhausted(survivor.pool.Select(Req()).status()));
  clock.Advance(absl::Seconds(1));
  EXPECT_TRUE(survivor.pool.Select(Req()).ok());
  EXPECT_TRUE(survivor.pool.Select(Req()).ok());
  EXPECT_FALSE(survivor.pool.Select(Req()).ok());
}

TEST(FleetAdmissionTest, RedisDownFallsBackToTheLocalCountAndSaysSo) {
  RedisProcess redis;
  FakeClock clock;
  Replica r1(redis.address(), clock, Capped(2)), r2(redis.address(), clock, Capped(2));
  ASSERT_TRUE(r1.pool.Select(Req()).ok());
  ASSERT_TRUE(r1.pool.Select(Req()).ok());
  redis.Kill();
  // r2 notices on its next round trip, and that call is answered from its own count (one lease);
  // then it answers at once, on the caller's thread.
  EXPECT_TRUE(r2.pool.Select(Req()).ok());
  EXPECT_FALSE(r2.state.Up());
  std::optional<absl::StatusOr<Selection>> here = r2.pool.SelectHere(Req());
  ASSERT_TRUE(here.has_value());
  EXPECT_TRUE(here->ok());
  // Its own count still caps it.
  absl::StatusOr<Selection> over = r2.pool.Select(Req());
  ASSERT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_NE(over.status().message().find("lease cap"), std::string::npos);
  EXPECT_GE(r2.pool.AdmissionFallbacks(), 2);
}

TEST(FleetAdmissionTest, AHungRedisCostsOneBoundedWaitThenTheLocalCountDecides) {
  RedisProcess redis;
  FakeClock clock;
  Replica r(redis.address(), clock, Capped(2));
  ASSERT_TRUE(r.pool.Select(Req()).ok());
  redis.Pause();
  // The reservation's round trip waits out the command timeout (50 ms), no more; the call is
  // answered from the local count.
  const absl::Time asked = absl::Now();
  EXPECT_TRUE(r.pool.Select(Req()).ok());
  EXPECT_LT(absl::Now() - asked, absl::Seconds(1));
  EXPECT_FALSE(r.state.Up());
  EXPECT_EQ(r.state.stats().admissions_unanswered, 1);
  EXPECT_EQ(r.pool.AdmissionFallbacks(), 1);
  EXPECT_TRUE(absl::IsResourceExhausted(r.pool.Select(Req()).status()));  // its own two
  redis.Resume();
}

TEST(FleetAdmissionTest, AfterACooldownOneReplicaProbesForTheFleet) {
  RedisProcess redis;
  FakeClock clock;
  PoolOptions uncapped = Capped(0);
  Replica r1(redis.address(), clock, uncapped), r2(redis.address(), clock, uncapped),
      r3(redis.address(), clock, uncapped);
  // No cap, no cooldown: no round trip.
  ASSERT_TRUE(r2.pool.SelectHere(Req()).has_value());
  absl::StatusOr<Selection> lease = r1.pool.Select(Req());
  ASSERT_TRUE(lease.ok());
  Outcome limited;
  limited.lease_id = lease->lease_id;
  limited.http_status = 429;
  limited.retry_after = "30";
  ASSERT_TRUE(r1.pool.ReportOutcome(limited).ok());
  auto cooling = [&](Replica& r) {
    return absl::IsResourceExhausted(r.pool.Explain(Req()).chosen_account_id.empty()
                                         ? absl::ResourceExhaustedError("")
                                         : absl::OkStatus());
  };
  ASSERT_TRUE(Eventually([&] { return cooling(r2) && cooling(r3); }));
  clock.Advance(absl::Seconds(31));
  // The cooldown has run out everywhere at once: the first to ask probes; the others do not.
  EXPECT_FALSE(r2.pool.SelectHere(Req()).has_value());  // a probe needs the fleet's token
  absl::StatusOr<Selection> probe = r2.pool.Select(Req());
  ASSERT_TRUE(probe.ok()) << probe.status();
  for (Replica* r : {&r1, &r3}) {
    absl::StatusOr<Selection> other = r->pool.Select(Req());
    ASSERT_TRUE(absl::IsResourceExhausted(other.status())) << other.status();
    const Explanation why = r->pool.Explain(Req());
    ASSERT_EQ(why.accounts.size(), 1u);
    EXPECT_NE(why.accounts[0].detail.find("one probe is in flight"), std::string::npos) << why.accounts[0].detail;
  }
  EXPECT_TRUE(absl::IsResourceExhausted(r2.pool.Select(Req()).status()));  // and the prober once only
  // The probe succeeds, reported to r3: the account is open again everywhere.
  Outcome ok;
  ok.lease_id = probe->lease_id;
  ok.http_status = 200;
  ASSERT_TRUE(Eventually([&] { return r3.pool.ReportOutcome(ok).ok(); }));
  for (Replica* r : {&r1, &r2, &r3}) {
    EXPECT_TRUE(Eventually([&] { return r->pool.Select(Req()).ok(); }));
  }
  // The token went with the probe's lease (its release is written behind).
  EXPECT_TRUE(Eventually([&] { return redis.Connect()->Command({"EXISTS", "fa:p:a|m"})->integer == 0; }));
}

TEST(FleetAdmissionTest, AProbeThatFailsReopensTheCooldownAndReleasesTheToken) {
  RedisProcess redis;
  FakeClock clock;
  Replica r1(redis.address(), clock, Capped(0)), r2(redis.address(), clock, Capped(0));
  absl::StatusOr<Selection> lease = r1.pool.Select(Req());
  ASSERT_TRUE(lease.ok());
  Outcome limited;
  limited.lease_id = lease->lease_id;
  limited.http_status = 429;
  limited.retry_after = "30";
  ASSERT_TRUE(r1.pool.ReportOutcome(limited).ok());
  ASSERT_TRUE(Eventually([&] { return r2.pool.Explain(Req()).chosen_account_id.empty(); }));
  clock.Advance(absl::Seconds(31));
  absl::StatusOr<Selection> probe = r1.pool.Select(Req());
  ASSERT_TRUE(probe.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(r2.pool.Select(Req()).status()));
  limited.lease_id = probe->lease_id;
  ASSERT_TRUE(r1.pool.ReportOutcome(limited).ok());
  ASSERT_TRUE(Eventually([&] { return redis.Connect()->Command({"EXISTS", "fa:p:a|m"})->integer == 0; }));
  // Cooling again on both; after it, one probe again.
  clock.Advance(absl::Seconds(5));
  EXPECT_TRUE(absl::IsResourceExhausted(r2.pool.Select(Req()).status()));
  ASSERT_TRUE(Eventually([&] { return !r2.pool.List()[0].cooldowns.empty(); }));
  clock.Advance(absl::Minutes(5));
  EXPECT_TRUE(r2.pool.Select(Req()).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(r1.pool.Select(Req()).status()));
}

}  // namespace
}  // namespace tokenbroker
