#include "lib/selection/session_binder.h"

#include "gtest/gtest.h"

namespace tokenbroker {
namespace {

const absl::Time kT0 = absl::FromUnixSeconds(1'800'000'000);

TEST(SessionBinder, BindsAndExpiresAfterIdleTtl) {
  SessionBinder b(absl::Minutes(10), 100);
  b.Bind("s", "a", kT0);
  EXPECT_EQ(b.Lookup("s", kT0 + absl::Minutes(9)), "a");
  // The lookup touched it: ten more minutes from then.
  EXPECT_EQ(b.Lookup("s", kT0 + absl::Minutes(18)), "a");
  EXPECT_FALSE(b.Lookup("s", kT0 + absl::Minutes(29)).has_value());
  EXPECT_EQ(b.size(), 0u);
  EXPECT_EQ(b.CountFor("a"), 0);
}

TEST(SessionBinder, PeekChangesNothing) {
  SessionBinder b(absl::Minutes(10), 100);
  b.Bind("s", "a", kT0);
  EXPECT_EQ(b.Peek("s", kT0 + absl::Minutes(9)), "a");
  EXPECT_FALSE(b.Lookup("s", kT0 + absl::Minutes(11)).has_value());
}

TEST(SessionBinder, CapacityEvictsLeastRecentlyUsed) {
  SessionBinder b(absl::Hours(1), 3);
  b.Bind("s1", "a", kT0);
  b.Bind("s2", "a", kT0 + absl::Seconds(1));
  b.Bind("s3", "b", kT0 + absl::Seconds(2));
  EXPECT_EQ(b.Lookup("s1", kT0 + absl::Seconds(3)), "a");  // s2 is now the oldest
  b.Bind("s4", "b", kT0 + absl::Seconds(4));
  EXPECT_EQ(b.size(), 3u);
  EXPECT_FALSE(b.Peek("s2", kT0 + absl::Seconds(5)).has_value());
  EXPECT_TRUE(b.Peek("s1", kT0 + absl::Seconds(5)).has_value());
  EXPECT_EQ(b.CountFor("a"), 1);
  EXPECT_EQ(b.CountFor("b"), 2);
}

TEST(SessionBinder, RebindMovesTheCount) {
  SessionBinder b(absl::Hours(1), 10);
  b.Bind("s", "a", kT0);
  b.Bind("s", "b", kT0);
  EXPECT_EQ(b.CountFor("a"), 0);
  EXPECT_EQ(b.CountFor("b"), 1);
  EXPECT_EQ(b.size(), 1u);
}

}  // namespace
}  // namespace tokenbroker
