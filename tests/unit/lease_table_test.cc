#include "lib/lease_table.h"

#include <set>

#include "gtest/gtest.h"

namespace tokenbroker {
namespace {

const absl::Time kT0 = absl::FromUnixSeconds(1795914000);

TEST(LeaseTable, IssueEndAndCount) {
  LeaseTable t(absl::Minutes(10));
  const Lease a1 = t.Issue("a", "m", kT0);
  const Lease a2 = t.Issue("a", "n", kT0);
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

TEST(LeaseTable, ExpireEndsOnlyTimedOutLeases) {
  LeaseTable t(absl::Minutes(10));
  const Lease early = t.Issue("a", "m", kT0);
  const Lease late = t.Issue("a", "m", kT0 + absl::Minutes(5));
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

}  // namespace
}  // namespace tokenbroker
