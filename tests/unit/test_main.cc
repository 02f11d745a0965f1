// The main of every unit test binary (tb_test in tests/CMakeLists.txt).
//
// Abseil's lock-order cycle detection aborts the test binary the first time two absl::Mutex are
// taken in an order that contradicts an order seen before (A then B, later B then A), with both
// stacks, whether or not the two threads ever meet. Debian builds Abseil with it on by default; we
// set it explicitly so the unit tests do not depend on that (deadlock_detection_test checks it).
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

int main(int argc, char** argv) {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kAbort);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
