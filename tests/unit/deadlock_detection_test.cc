// The unit tests' main turns Abseil's lock-order cycle detection on: this checks that it is on and
// that it catches an inversion in one thread (no deadlock has to happen for it to fire).
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace {

void LockBothInOrder(absl::Mutex& first, absl::Mutex& second) {
  absl::MutexLock a(&first);
  absl::MutexLock b(&second);
}

TEST(DeadlockDetection, ConsistentOrderIsFine) {
  absl::Mutex a;
  absl::Mutex b;
  LockBothInOrder(a, b);
  LockBothInOrder(a, b);
}

TEST(DeadlockDetectionDeathTest, InvertedOrderAborts) {
  EXPECT_DEATH(
      {
        absl::Mutex a;
        absl::Mutex b;
        LockBothInOrder(a, b);
        LockBothInOrder(b, a);
      },
      "potential deadlock");
}

}  // namespace
