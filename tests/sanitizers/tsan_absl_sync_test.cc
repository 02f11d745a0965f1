// TSan tree only: with tests/sanitizers/tsan_absl_sync.cc, TSan orders what absl::Mutex, Await and
// Notification order (no report; TSAN_OPTIONS has halt_on_error=1, so a report fails the test),
// and still reports an unsynchronised write.
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace {

TEST(TsanAbslSync, MutexOrdersGuardedWrites) {
  absl::Mutex mu;
  int guarded = 0;
  auto add = [&] {
    for (int i = 0; i < 1000; ++i) {
      absl::MutexLock lock(&mu);
      ++guarded;
    }
  };
  std::thread a(add);
  std::thread b(add);
  a.join();
  b.join();
  absl::MutexLock lock(&mu);
  EXPECT_EQ(guarded, 2000);
}

TEST(TsanAbslSync, NotificationAndAwaitHandOver) {
  int handed = 0;  // written before Notify, read after the wait: no lock
  absl::Notification done;
  std::thread writer([&] {
    handed = 1;
    done.Notify();
  });
  done.WaitForNotification();
  EXPECT_EQ(handed, 1);
  writer.join();

  absl::Mutex mu;
  bool ready = false;
  int before_lock = 0;  // written before the writer's Lock, read after the Await
  std::thread setter([&] {
    before_lock = 7;
    absl::MutexLock lock(&mu);
    ready = true;
  });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&ready));
  }
  EXPECT_EQ(before_lock, 7);
  setter.join();
}

TEST(TsanAbslSyncDeathTest, UnsynchronisedWriteIsReported) {
  EXPECT_EXIT(
      {
        int racy = 0;
        std::thread a([&] { ++racy; });
        std::thread b([&] { ++racy; });
        a.join();
        b.join();
        std::exit(0);
      },
      ::testing::ExitedWithCode(66), "data race");
}

}  // namespace
