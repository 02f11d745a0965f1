#include "lib/selection/lease_table.h"

#include <deque>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tokenbroker {
namespace {

const absl::Time kT0 = absl::FromUnixSeconds(1795914000);

TEST(LeaseTable, IssueEndAndCount) {
  LeaseTable t(absl::Minutes(10));
  const IssuedLease a1 = t.Issue("a", "m", kT0);
  const IssuedLease a2 = t.Issue("a", "n", kT0);
  t.Issue("b", "m", kT0);
  EXPECT_NE(a1.id, a2.id);
  EXPECT_EQ(a1.expires, kT0 + absl::Minutes(10));
  EXPECT_EQ(t.InFlight("a"), 2);
  std::optional<Lease> ended = t.End(a1.id);
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->model, "m");
  EXPECT_FALSE(t.End(a1.id).has_value());
  EXPECT_EQ(t.InFlight("a"), 1);
  EXPECT_EQ(t.size(), 2u);
}

// Issue 16: a lease named before it is issued (its fleet-wide reservation carries the name).
TEST(LeaseTable, AnIdNamedAheadIsTheIssuedLeasesAndOnlyForItsCaller) {
  LeaseTable t(absl::Minutes(10));
  const std::string id = t.NewId("proxy-a");
  EXPECT_EQ(t.size(), 0u);
  EXPECT_FALSE(t.Contains(id));
  const IssuedLease issued = t.IssueAs(id, "a", "m", kT0, "proxy-a");
  EXPECT_EQ(issued.id, id);
  EXPECT_EQ(t.Find(id)->caller, "proxy-a");
  EXPECT_EQ(t.InFlight("a"), 1);
  // Taken already, another caller's, or malformed: a fresh id instead.
  EXPECT_NE(t.IssueAs(id, "a", "m", kT0, "proxy-a").id, id);
  const std::string other = t.NewId("proxy-b");
  EXPECT_NE(t.IssueAs(other, "a", "m", kT0, "proxy-a").id, other);
  const IssuedLease fresh = t.IssueAs("l-nonsense", "a", "m", kT0, "proxy-a");
  EXPECT_TRUE(t.Contains(fresh.id));
  EXPECT_EQ(t.InFlight("a"), 4);
}

TEST(LeaseTable, ExpireEndsOnlyTimedOutLeases) {
  LeaseTable t(absl::Minutes(10));
  const IssuedLease early = t.Issue("a", "m", kT0);
  const IssuedLease late = t.Issue("a", "m", kT0 + absl::Minutes(5));
  EXPECT_EQ(t.EarliestExpiry("a"), early.expires);
  EXPECT_TRUE(t.Expire(kT0 + absl::Minutes(9)).empty());
  std::vector<Lease> gone = t.Expire(kT0 + absl::Minutes(10));
  ASSERT_EQ(gone.size(), 1u);
  EXPECT_EQ(gone[0].id, early.id);
  EXPECT_EQ(t.InFlight("a"), 1);
  EXPECT_EQ(t.EarliestExpiry("a"), late.expires);
  EXPECT_FALSE(t.EarliestExpiry("b").has_value());
}

TEST(LeaseTable, IdsAreUnique) {
  LeaseTable t(absl::Minutes(10));
  std::set<std::string> ids;
  for (int i = 0; i < 1000; ++i) ids.insert(t.Issue("a", "m", kT0).id);
  EXPECT_EQ(ids.size(), 1000u);
  t.Forget("a");
  EXPECT_EQ(t.size(), 0u);
  EXPECT_EQ(t.InFlight("a"), 0);
}

TEST(LeaseTable, ForeignAndMalformedIdsAreUnknown) {
  LeaseTable t(absl::Minutes(10)), other(absl::Minutes(10));
  const IssuedLease mine = t.Issue("a", "m", kT0);
  const IssuedLease theirs = other.Issue("a", "m", kT0);
  EXPECT_TRUE(t.Contains(mine.id));
  EXPECT_FALSE(t.Contains(theirs.id));  // another table's (replica's) prefix
  for (const std::string& bad : std::vector<std::string>{"", "l-", "x-" + mine.id.substr(2), mine.id + "0", "l-" + std::string(32, 'G'),
                                std::string(mine.id).replace(33, 1, "Z")}) {
    EXPECT_FALSE(t.Contains(bad)) << bad;
    EXPECT_FALSE(t.End(bad).has_value()) << bad;
  }
  EXPECT_EQ(t.InFlight("a"), 1);
  std::optional<Lease> ended = t.End(mine.id);
  ASSERT_TRUE(ended.has_value());
  EXPECT_EQ(ended->id, mine.id);
  EXPECT_EQ(ended->account, "a");
  EXPECT_FALSE(t.Contains(mine.id));
}

// Issue 11 item 3: ids are unguessable: two ids of one table and caller share their table and
// caller parts and nothing else; the random part is 96 bits of the system's CSPRNG.
TEST(LeaseTable, IdsAreUnguessableAndCarryTheCallersTag) {
  LeaseTable t(absl::Minutes(10));
  const IssuedLease a = t.Issue("acct", "m", kT0, "proxy-a");
  const IssuedLease b = t.Issue("acct", "m", kT0, "proxy-a");
  ASSERT_EQ(a.id.size(), LeaseTable::kIdLength);
  EXPECT_EQ(a.id.substr(0, 26), b.id.substr(0, 26));
  int same = 0;
  for (size_t i = 26; i < a.id.size(); ++i) same += a.id[i] == b.id[i];
  EXPECT_LT(same, 10);  // 24 hex digits: about 1.5 equal by chance
  EXPECT_EQ(CallerTagOfLease(a.id), CallerTag("proxy-a"));
  EXPECT_NE(CallerTag("proxy-a"), CallerTag("proxy-b"));
  EXPECT_EQ(t.Find(a.id)->caller, "proxy-a");
  // The id with another caller's tag is not the lease.
  std::string forged = a.id;
  forged.replace(18, 8, CallerTag("proxy-b"));
  EXPECT_FALSE(t.Contains(forged));
  // Consecutive ids are not neighbours: the next id cannot be computed from one.
  std::set<std::string> random_parts;
  for (int i = 0; i < 2000; ++i) random_parts.insert(t.Issue("acct", "m", kT0, "proxy-a").id.substr(26, 6));
  EXPECT_GT(random_parts.size(), 1900u);
}

// Leases come from callers who need not report them: the table is bounded, and a full table makes
// room from the caller holding the most, oldest first, so a flood pushes out only its own leases.
TEST(LeaseTable, AFullTableEndsTheBiggestHoldersOldestLease) {
  LeaseTable t(absl::Minutes(10), /*max_leases=*/5);
  EXPECT_FALSE(t.MakeRoom().has_value());  // room to spare
  const IssuedLease good1 = t.Issue("a", "m", kT0, "good");
  const IssuedLease good2 = t.Issue("b", "m", kT0 + absl::Seconds(1), "good");
  std::vector<std::string> flood;
  for (int i = 0; i < 3; ++i) flood.push_back(t.Issue("c", "m", kT0 + absl::Seconds(2 + i), "flood").id);
  ASSERT_EQ(t.size(), 5u);
  for (int i = 0; i < 10000; ++i) {
    std::optional<Lease> evicted = t.MakeRoom();
    ASSERT_TRUE(evicted.has_value()) << i;
    EXPECT_EQ(evicted->caller, "flood");
    if (i < 3) {
      EXPECT_EQ(evicted->id, flood[i]);  // oldest first
    }
    EXPECT_EQ(evicted->account, "c");
    flood.push_back(t.Issue("c", "m", kT0 + absl::Seconds(10 + i), "flood").id);
    ASSERT_EQ(t.size(), 5u);
  }
  EXPECT_TRUE(t.Contains(good1.id));
  EXPECT_TRUE(t.Contains(good2.id));
  EXPECT_EQ(t.InFlight("c"), 3);
  EXPECT_FALSE(t.Contains(flood[0]));
  // Once the flood reported its leases, the biggest holder is the other caller.
  for (size_t i = flood.size() - 3; i < flood.size(); ++i) ASSERT_TRUE(t.End(flood[i]).has_value());
  for (int i = 0; i < 3; ++i) t.Issue("c", "m", kT0 + absl::Hours(1), "third-" + std::to_string(i));
  std::optional<Lease> evicted = t.MakeRoom();
  ASSERT_TRUE(evicted.has_value());
  EXPECT_EQ(evicted->id, good1.id);
}

TEST(LeaseTable, OneCallerAloneLosesItsOldestLeasesAndTheTableStaysAtItsBound) {
  LeaseTable t(absl::Minutes(10), /*max_leases=*/100);
  std::deque<std::string> live;  // oldest first
  int evictions = 0;
  for (int i = 0; i < 5000; ++i) {
    if (std::optional<Lease> evicted = t.MakeRoom()) {
      ++evictions;
      ASSERT_EQ(evicted->id, live.front());  // the oldest live lease; reported ones are skipped
      live.pop_front();
    }
    live.push_back(t.Issue("acct-" + std::to_string(i % 7), "m", kT0 + absl::Milliseconds(i)).id);
    ASSERT_LE(t.size(), 100u);
    if (i % 3 == 1) {  // some leases are reported: the table's per-caller order skips them
      ASSERT_TRUE(t.End(live.back()).has_value());
      live.pop_back();
    }
  }
  EXPECT_GT(evictions, 3000);
  int in_flight = 0;
  for (int a = 0; a < 7; ++a) in_flight += t.InFlight("acct-" + std::to_string(a));
  EXPECT_EQ(in_flight, static_cast<int>(t.size()));
  // Expiry still ends them all.
  EXPECT_EQ(t.Expire(kT0 + absl::Hours(1)).size(), static_cast<size_t>(in_flight));
  EXPECT_EQ(t.size(), 0u);
}

}  // namespace
}  // namespace tokenbroker
