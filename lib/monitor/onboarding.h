#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/upstream/cloud_code_client.h"

namespace tokenbroker {

struct OnboardingOptions {
  // How long one onboarding may take, from onboardUser to its operation's done (each request
  // waits at most this long too). Past it, the onboarding has failed.
  absl::Duration timeout = absl::Minutes(2);
  // The operation is polled first this long after onboardUser answered, then at doubling
  // intervals up to max_check.
  absl::Duration first_check = absl::Seconds(1);
  absl::Duration max_check = absl::Seconds(20);
  // After a failed onboarding the account's next attempt waits this long, doubling per failure
  // in a row up to max_retry: onboardUser is never hammered.
  absl::Duration retry = absl::Minutes(10);
  absl::Duration max_retry = absl::Hours(6);
};

// INVALID_ARGUMENT naming the field unless every duration is positive, first_check <= max_check
// and retry <= max_retry. Field names are the flags' (--onboard_timeout, --onboard_retry).
absl::Status ValidateOnboardingOptions(const OnboardingOptions& options);

// Where one account's onboarding stands after a Step.
struct OnboardingStep {
  std::string project_id;  // onboarded: its project (from the operation, never made up)
  // Not onboarded (yet): why, for operators and brokers ("onboarding in progress ...",
  // "onboarding failed: ...; next attempt at ...").
  std::string reason;
  // When a Step would do something again (poll the operation, or try anew); unset once onboarded.
  std::optional<absl::Time> next;
};

// Onboards accounts that have no Cloud Code project (docs/ARCHITECTURE.md §6): onboardUser with
// the default allowed tier, then its long-running operation polled with back-off until done or
// `timeout`, on the injected clock. A Step makes at most one request and only when one is due, so
// no thread sleeps and the caller (QuotaPoller) schedules the next Step at `next`. A failure
// (an error answer, an operation that ends in error, the timeout) backs the account off.
// Thread-safe; the caller steps one account from one thread at a time. References must outlive it.
class Onboarding {
 public:
  Onboarding(OnboardingOptions options, const CloudCodeClient& cloud_code, const Clock& clock);

  // Moves the account's onboarding on by at most one request, if one is due. `tier_id` is
  // loadCodeAssist's default allowed tier (empty: onboarding fails, naming why).
  // `via`: the client to call through (the account's egress); the one given at construction if null.
  OnboardingStep Step(const std::string& account_id, const std::string& access_token, const std::string& tier_id,
                      const CloudCodeClient* via = nullptr) ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets the accounts not in `keep` (they left the pool): the state stays bounded by the pool.
  void Retain(const absl::flat_hash_set<std::string>& keep) ABSL_LOCKS_EXCLUDED(mu_);
  // Accounts with an onboarding in progress or failed.
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);
  // onboardUser requests made since start.
  int64_t attempts() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct State {
    std::string operation;  // in progress: the operation's name
    absl::Time started = absl::InfinitePast();
    absl::Time next = absl::InfinitePast();  // the next poll, or the next attempt after a failure
    absl::Duration check;                    // the next poll's back-off step
    absl::Duration retry;                    // the back-off after the next failure
    std::string failure;                     // the last failure, while waiting for the next attempt
  };
  // Records a failure: no operation, and the next attempt backed off.
  void Fail(State& s, const std::string& why, absl::Time now) const;
  static std::string Describe(const State& s);

  const OnboardingOptions options_;
  const CloudCodeClient& cloud_code_;
  const Clock& clock_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, State> states_ ABSL_GUARDED_BY(mu_);
  int64_t attempts_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tokenbroker
