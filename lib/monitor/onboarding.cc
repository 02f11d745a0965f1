#include "lib/monitor/onboarding.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/common/safe_text.h"

namespace tokenbroker {

absl::Status ValidateOnboardingOptions(const OnboardingOptions& o) {
  for (const auto& [name, value] : {std::pair{"--onboard_timeout", o.timeout}, std::pair{"first_check", o.first_check},
                                    std::pair{"max_check", o.max_check}, std::pair{"--onboard_retry", o.retry},
                                    std::pair{"max_retry", o.max_retry}}) {
    if (value <= absl::ZeroDuration()) return absl::InvalidArgumentError(absl::StrCat(name, " must be positive"));
  }
  if (o.first_check > o.max_check) return absl::InvalidArgumentError("first_check must not exceed max_check");
  if (o.retry > o.max_retry) {
    return absl::InvalidArgumentError(
        absl::StrCat("--onboard_retry must not exceed ", absl::FormatDuration(o.max_retry), " (the longest back-off)"));
  }
  return absl::OkStatus();
}

Onboarding::Onboarding(OnboardingOptions options, const CloudCodeClient& cloud_code, const Clock& clock)
    : options_(options), cloud_code_(cloud_code), clock_(clock) {}

std::string Onboarding::Describe(const State& s) {
  if (!s.operation.empty()) {
    return absl::StrCat("onboarding in progress (onboardUser since ", FormatTimestamp(s.started), ")");
  }
  return absl::StrCat("onboarding failed: ", s.failure, "; next attempt at ", FormatTimestamp(s.next));
}

void Onboarding::Fail(State& s, const std::string& why, absl::Time now) const {
  s.operation.clear();
  s.failure = SafeText(why, 200);
  s.next = now + s.retry;
  s.retry = std::min(s.retry * 2, options_.max_retry);
}

OnboardingStep Onboarding::Step(const std::string& account_id, const std::string& access_token,
                                const std::string& tier_id, const CloudCodeClient* via) {
  const CloudCodeClient& cloud_code = via != nullptr ? *via : cloud_code_;
  State s;
  {
    absl::MutexLock lock(&mu_);
    auto [it, fresh] = states_.try_emplace(account_id);
    if (fresh) it->second.retry = options_.retry;
    s = it->second;
  }
  const absl::Time now = clock_.Now();
  if (now < s.next) return OnboardingStep{"", Describe(s), s.next};

  absl::StatusOr<OnboardOperation> op;
  if (s.operation.empty()) {
    if (tier_id.empty()) {
      op = absl::FailedPreconditionError("loadCodeAssist named no allowed tier to onboard to");
    } else {
      {
        absl::MutexLock lock(&mu_);
        ++attempts_;
      }
      s.started = now;
      op = cloud_code.OnboardUser(access_token, tier_id, options_.timeout);
    }
  } else {
    // The last poll is due at the deadline at the latest; its answer decides.
    op = cloud_code.GetOperation(access_token, s.operation, options_.timeout);
  }
  const absl::Time after = clock_.Now();
  OnboardingStep step;
  if (op.ok() && op->done && op->error.empty()) {
    absl::MutexLock lock(&mu_);
    states_.erase(account_id);
    return OnboardingStep{op->project_id, "", std::nullopt};
  }
  if (!op.ok()) {
    // A poll that could not be made says nothing of the operation: poll again, until the timeout.
    const bool transient = !s.operation.empty() && (absl::IsUnavailable(op.status()) ||
                                                    absl::IsResourceExhausted(op.status()));
    if (transient && after < s.started + options_.timeout) {
      s.check = std::min(s.check * 2, options_.max_check);
      s.next = std::min(after + s.check, s.started + options_.timeout);
    } else if (absl::IsDeadlineExceeded(op.status())) {
      Fail(s, absl::StrCat("not done within --onboard_timeout ", absl::FormatDuration(options_.timeout)), after);
    } else {
      Fail(s, std::string(op.status().message()), after);
    }
  } else if (op->done) {
    Fail(s, absl::StrCat("the operation ended in error: ", op->error), after);
  } else if (after - s.started >= options_.timeout) {
    Fail(s, absl::StrCat("not done within --onboard_timeout ", absl::FormatDuration(options_.timeout)), after);
  } else {
    const bool first = s.operation.empty();
    s.operation = op->name;
    s.check = first ? options_.first_check : std::min(s.check * 2, options_.max_check);
    // The deadline is noticed on time: the last poll is at it at the latest.
    s.next = std::min(after + s.check, s.started + options_.timeout);
  }
  step.reason = Describe(s);
  step.next = s.next;
  absl::MutexLock lock(&mu_);
  states_[account_id] = s;
  return step;
}

void Onboarding::Retain(const absl::flat_hash_set<std::string>& keep) {
  absl::MutexLock lock(&mu_);
  absl::erase_if(states_, [&](const auto& kv) { return !keep.contains(kv.first); });
}

size_t Onboarding::size() const {
  absl::MutexLock lock(&mu_);
  return states_.size();
}

int64_t Onboarding::attempts() const {
  absl::MutexLock lock(&mu_);
  return attempts_;
}

}  // namespace tokenbroker
