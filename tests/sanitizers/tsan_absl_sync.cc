// TSan tree only: tells ThreadSanitizer about Debian's absl::Mutex, CondVar and Notification.
//
// Debian's Abseil is not built with -fsanitize=thread, so its Mutex never reports its lock and
// unlock to TSan (an instrumented Abseil does, through the annotations of
// <sanitizer/tsan_interface.h>), and TSan would report every ABSL_GUARDED_BY member as a data race.
// This file interposes the out-of-line entry points of those classes (the test binary's definitions
// win over libabsl_synchronization.so's, for our calls and for gRPC's alike), makes the annotations
// an instrumented Abseil makes, and calls the real function, found with dlsym(RTLD_NEXT).
//
// Between a pre_* and its post_* annotation TSan ignores memory accesses, as for an instrumented
// Abseil: that covers the Condition functions Abseil evaluates inside Lock/Unlock/Await.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

#define TB_STR2(x) #x
#define TB_STR(x) TB_STR2(x)

// The real function: `rest` is the Itanium mangling after the namespace absl::<inline namespace>,
// e.g. "5Mutex4LockEv"; `const_method` for a const member function.
void* Real(const char* rest, bool const_method = false) {
  const char* ns = TB_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name = std::string(const_method ? "_ZNK4absl" : "_ZN4absl") +
                           std::to_string(std::strlen(ns)) + ns + rest;
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_absl_sync: %s not found in Abseil\n", name.c_str());
    std::abort();
  }
  return fn;
}

template <typename Fn>
Fn RealFn(const char* rest, bool const_method = false) {
  return reinterpret_cast<Fn>(Real(rest, const_method));
}

// Only the outermost interposed call annotates: Abseil's own calls between its entry points
// (Notification uses a Mutex) are inside it.
thread_local int depth = 0;

struct Outermost {
  Outermost() : outer(depth++ == 0) {}
  ~Outermost() { --depth; }
  const bool outer;
};

constexpr unsigned kRead = __tsan_mutex_read_lock;

void PreLock(void* mu, unsigned flags, bool on) {
  if (on) __tsan_mutex_pre_lock(mu, flags);
}
void PostLock(void* mu, unsigned flags, bool on) {
  if (on) __tsan_mutex_post_lock(mu, flags, 0);
}
void PreUnlock(void* mu, unsigned flags, bool on) {
  if (on) __tsan_mutex_pre_unlock(mu, flags);
}
void PostUnlock(void* mu, unsigned flags, bool on) {
  if (on) __tsan_mutex_post_unlock(mu, flags);
}
// A wait that releases `mu` and holds it again on return (Await, CondVar::Wait): the real wait
// runs as an unlock, then a lock is annotated.
void PostRelock(void* mu, unsigned flags, bool on) {
  if (!on) return;
  __tsan_mutex_post_unlock(mu, flags);
  __tsan_mutex_pre_lock(mu, flags);
  __tsan_mutex_post_lock(mu, flags, 0);
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  static auto real = RealFn<void (*)(Mutex*)>("5MutexD1Ev");
  __tsan_mutex_destroy(this, __tsan_mutex_not_static);
  real(this);
}

void Mutex::Lock() {
  static auto real = RealFn<void (*)(Mutex*)>("5Mutex4LockEv");
  Outermost o;
  PreLock(this, 0, o.outer);
  real(this);
  PostLock(this, 0, o.outer);
}

void Mutex::ReaderLock() {
  static auto real = RealFn<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  Outermost o;
  PreLock(this, kRead, o.outer);
  real(this);
  PostLock(this, kRead, o.outer);
}

bool Mutex::TryLock() {
  static auto real = RealFn<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  Outermost o;
  if (o.outer) __tsan_mutex_pre_lock(this, __tsan_mutex_try_lock);
  const bool locked = real(this);
  if (o.outer) {
    __tsan_mutex_post_lock(this, __tsan_mutex_try_lock | (locked ? 0 : __tsan_mutex_try_lock_failed), 0);
  }
  return locked;
}

bool Mutex::ReaderTryLock() {
  static auto real = RealFn<bool (*)(Mutex*)>("5Mutex13ReaderTryLockEv");
  Outermost o;
  if (o.outer) __tsan_mutex_pre_lock(this, kRead | __tsan_mutex_try_lock);
  const bool locked = real(this);
  if (o.outer) {
    __tsan_mutex_post_lock(this, kRead | __tsan_mutex_try_lock | (locked ? 0 : __tsan_mutex_try_lock_failed),
                           0);
  }
  return locked;
}

void Mutex::Unlock() {
  static auto real = RealFn<void (*)(Mutex*)>("5Mutex6UnlockEv");
  Outermost o;
  PreUnlock(this, 0, o.outer);
  real(this);
  PostUnlock(this, 0, o.outer);
}

void Mutex::ReaderUnlock() {
  static auto real = RealFn<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  Outermost o;
  PreUnlock(this, kRead, o.outer);
  real(this);
  PostUnlock(this, kRead, o.outer);
}

void Mutex::LockWhen(const Condition& cond) {
  static auto real = RealFn<void (*)(Mutex*, const Condition&)>("5Mutex8LockWhenERKNS0_9ConditionE");
  Outermost o;
  PreLock(this, 0, o.outer);
  real(this, cond);
  PostLock(this, 0, o.outer);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static auto real = RealFn<void (*)(Mutex*, const Condition&)>("5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Outermost o;
  PreLock(this, kRead, o.outer);
  real(this, cond);
  PostLock(this, kRead, o.outer);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = RealFn<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outermost o;
  PreLock(this, 0, o.outer);
  const bool met = real(this, cond, timeout);
  PostLock(this, 0, o.outer);
  return met;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = RealFn<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outermost o;
  PreLock(this, 0, o.outer);
  const bool met = real(this, cond, deadline);
  PostLock(this, 0, o.outer);
  return met;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = RealFn<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outermost o;
  PreLock(this, kRead, o.outer);
  const bool met = real(this, cond, timeout);
  PostLock(this, kRead, o.outer);
  return met;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = RealFn<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outermost o;
  PreLock(this, kRead, o.outer);
  const bool met = real(this, cond, deadline);
  PostLock(this, kRead, o.outer);
  return met;
}

// Await* may release the lock while waiting (write lock or read lock: the flags only say which
// the caller holds; an exclusive hold is what every caller of ours has).
void Mutex::Await(const Condition& cond) {
  static auto real = RealFn<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  Outermost o;
  PreUnlock(this, 0, o.outer);
  real(this, cond);
  PostRelock(this, 0, o.outer);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = RealFn<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outermost o;
  PreUnlock(this, 0, o.outer);
  const bool met = real(this, cond, timeout);
  PostRelock(this, 0, o.outer);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = RealFn<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outermost o;
  PreUnlock(this, 0, o.outer);
  const bool met = real(this, cond, deadline);
  PostRelock(this, 0, o.outer);
  return met;
}

void CondVar::Wait(Mutex* mu) {
  static auto real = RealFn<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  Outermost o;
  PreUnlock(mu, 0, o.outer);
  real(this, mu);
  PostRelock(mu, 0, o.outer);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  static auto real = RealFn<bool (*)(CondVar*, Mutex*, absl::Duration)>(
      "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Outermost o;
  PreUnlock(mu, 0, o.outer);
  const bool timed_out = real(this, mu, timeout);
  PostRelock(mu, 0, o.outer);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static auto real = RealFn<bool (*)(CondVar*, Mutex*, absl::Time)>(
      "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Outermost o;
  PreUnlock(mu, 0, o.outer);
  const bool timed_out = real(this, mu, deadline);
  PostRelock(mu, 0, o.outer);
  return timed_out;
}

// Notify happens before every wait that returns notified.
void Notification::Notify() {
  static auto real = RealFn<void (*)(Notification*)>("12Notification6NotifyEv");
  Outermost o;
  if (o.outer) __tsan_release(this);
  real(this);
}

void Notification::WaitForNotification() const {
  static auto real = RealFn<void (*)(const Notification*)>("12Notification19WaitForNotificationEv", true);
  Outermost o;
  real(this);
  if (o.outer) __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  static auto real = RealFn<bool (*)(const Notification*, absl::Duration)>(
      "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE", true);
  Outermost o;
  const bool notified = real(this, timeout);
  if (o.outer && notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  static auto real = RealFn<bool (*)(const Notification*, absl::Time)>(
      "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE", true);
  Outermost o;
  const bool notified = real(this, deadline);
  if (o.outer && notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
