// The WaitQueue and the FakeClock it waits on: retries run when the fake clock reaches their time
// (nothing here waits on real time to check a duration), at a Notify, at a Cancel (kCancelled)
// and at Shutdown (kFinal).
#include "lib/broker/wait_queue.h"

#include <optional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "lib/common/clock.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::tokenbroker::testing::Eventually;
using Wake = WaitQueue::Wake;

// What one retry saw when it ran.
struct Ran {
  absl::Mutex mu;
  std::optional<Wake> why ABSL_GUARDED_BY(mu);
  absl::Time at ABSL_GUARDED_BY(mu);

  WaitQueue::Retry Retry(const Clock& clock) {
    return [this, &clock](Wake w) {
      absl::MutexLock lock(&mu);
      why = w;
      at = clock.Now();
    };
  }
  bool ran() {
    absl::MutexLock lock(&mu);
    return why.has_value();
  }
  Wake wake() {
    absl::MutexLock lock(&mu);
    return *why;
  }
  absl::Time time() {
    absl::MutexLock lock(&mu);
    return at;
  }
};

TEST(FakeClockTest, AwaitUntilWakesAtTheDeadlineOrWhenTheConditionHolds) {
  FakeClock clock;
  absl::Mutex mu;
  bool flag = false;
  const absl::Time deadline = clock.Now() + absl::Seconds(5);
  std::optional<bool> timed_out_result;
  std::thread waiter([&] {
    absl::MutexLock lock(&mu);
    timed_out_result = clock.AwaitUntil(mu, absl::Condition(&flag), deadline);
  });
  ASSERT_TRUE(Eventually([&] { return clock.waiters() == 1; }));
  clock.Advance(absl::Seconds(4));
  clock.Advance(absl::Seconds(1));
  waiter.join();
  EXPECT_EQ(timed_out_result, false);
  EXPECT_EQ(clock.waiters(), 0);

  std::optional<bool> signalled_result;
  std::thread signalled([&] {
    absl::MutexLock lock(&mu);
    signalled_result = clock.AwaitUntil(mu, absl::Condition(&flag), absl::InfiniteFuture());
  });
  ASSERT_TRUE(Eventually([&] { return clock.waiters() == 1; }));
  {
    absl::MutexLock lock(&mu);
    flag = true;
  }
  signalled.join();
  EXPECT_EQ(signalled_result, true);
}

TEST(WaitQueueTest, ARetryRunsWhenTheClockReachesItsTime) {
  FakeClock clock;
  WaitQueue queue(clock);
  const absl::Time start = clock.Now();
  Ran ran;
  EXPECT_EQ(queue.Park(&ran, start + absl::Milliseconds(300), ran.Retry(clock)), WaitQueue::ParkResult::kParked);
  EXPECT_EQ(queue.size(), 1u);
  ASSERT_TRUE(Eventually([&] { return clock.waiters() == 1; }));
  clock.Advance(absl::Milliseconds(299));
  clock.Advance(absl::Milliseconds(1));
  ASSERT_TRUE(Eventually([&] { return ran.ran(); }));
  EXPECT_EQ(ran.wake(), Wake::kDue);
  // It ran at its time on the clock: not at the first Advance, which fell short of it.
  EXPECT_EQ(ran.time(), start + absl::Milliseconds(300));
  EXPECT_EQ(queue.size(), 0u);
  queue.Forget(&ran);
}

TEST(WaitQueueTest, RetriesRunInTheOrderOfTheirTimes) {
  FakeClock clock;
  WaitQueue queue(clock);
  const absl::Time start = clock.Now();
  Ran early, late;
  queue.Park(&late, start + absl::Seconds(2), late.Retry(clock));
  queue.Park(&early, start + absl::Seconds(1), early.Retry(clock));
  clock.Advance(absl::Seconds(1));
  ASSERT_TRUE(Eventually([&] { return early.ran(); }));
  EXPECT_FALSE(late.ran());
  EXPECT_EQ(queue.size(), 1u);
  clock.Advance(absl::Seconds(1));
  ASSERT_TRUE(Eventually([&] { return late.ran(); }));
  EXPECT_EQ(late.time(), start + absl::Seconds(2));
}

TEST(WaitQueueTest, NotifyRunsEveryParkedRetryAtOnce) {
  FakeClock clock;
  WaitQueue queue(clock);
  const absl::Time start = clock.Now();
  Ran a, b;
  queue.Park(&a, start + absl::Hours(1), a.Retry(clock));
  queue.Park(&b, start + absl::Hours(2), b.Retry(clock));
  queue.Notify();
  ASSERT_TRUE(Eventually([&] { return a.ran() && b.ran(); }));
  EXPECT_EQ(a.wake(), Wake::kDue);
  EXPECT_EQ(b.time(), start);  // the clock did not move
  EXPECT_EQ(queue.size(), 0u);
}

TEST(WaitQueueTest, ACancelledCallIsAnsweredAtOnceAndNeverWaitsAgain) {
  FakeClock clock;
  WaitQueue queue(clock);
  Ran parked;
  queue.Park(&parked, clock.Now() + absl::Hours(1), parked.Retry(clock));
  EXPECT_TRUE(queue.Cancel(&parked));
  EXPECT_TRUE(parked.ran());  // on this thread, before Cancel returned
  EXPECT_EQ(parked.wake(), Wake::kCancelled);
  EXPECT_EQ(queue.size(), 0u);
  // A call cancelled while not parked: its next Park runs the retry at once, cancelled.
  Ran later;
  EXPECT_FALSE(queue.Cancel(&later));
  EXPECT_EQ(queue.Park(&later, clock.Now() + absl::Hours(1), later.Retry(clock)), WaitQueue::ParkResult::kCancelled);
  EXPECT_EQ(later.wake(), Wake::kCancelled);
  EXPECT_EQ(queue.size(), 0u);
  queue.Forget(&parked);
  queue.Forget(&later);
}

TEST(WaitQueueTest, ShutdownGivesEveryRetryItsLastTry) {
  FakeClock clock;
  WaitQueue queue(clock);
  Ran parked;
  queue.Park(&parked, clock.Now() + absl::Hours(1), parked.Retry(clock));
  queue.Shutdown();
  EXPECT_TRUE(parked.ran());
  EXPECT_EQ(parked.wake(), Wake::kFinal);
  Ran after;
  EXPECT_EQ(queue.Park(&after, clock.Now() + absl::Hours(1), after.Retry(clock)), WaitQueue::ParkResult::kRanNow);
  EXPECT_EQ(after.wake(), Wake::kFinal);
  queue.Shutdown();  // idempotent
}

TEST(WaitQueueTest, RetriesThatRunTogetherRunByPriorityThenAge) {
  FakeClock clock;
  WaitQueue q(clock);
  absl::Mutex mu;
  std::vector<int> order;
  auto retry = [&](int id) {
    return [&, id](Wake) {
      absl::MutexLock lock(&mu);
      order.push_back(id);
    };
  };
  int keys[5];
  // Parked in this order (and at this age), with these priorities; due at different times.
  q.Park(&keys[0], clock.Now() + absl::Seconds(9), retry(0), /*priority=*/0);
  clock.Advance(absl::Milliseconds(1));
  q.Park(&keys[1], clock.Now() + absl::Seconds(8), retry(1), /*priority=*/2);
  clock.Advance(absl::Milliseconds(1));
  q.Park(&keys[2], clock.Now() + absl::Seconds(7), retry(2), /*priority=*/0);
  clock.Advance(absl::Milliseconds(1));
  q.Park(&keys[3], clock.Now() + absl::Seconds(6), retry(3), /*priority=*/2);
  clock.Advance(absl::Milliseconds(1));
  q.Park(&keys[4], clock.Now() + absl::Seconds(5), retry(4), /*priority=*/1);
  q.Notify();
  ASSERT_TRUE(Eventually([&] {
    absl::MutexLock lock(&mu);
    return order.size() == 5;
  }));
  absl::MutexLock lock(&mu);
  EXPECT_EQ(order, (std::vector<int>{1, 3, 4, 0, 2}));
  for (int& k : keys) q.Forget(&k);
}

}  // namespace
}  // namespace tokenbroker
