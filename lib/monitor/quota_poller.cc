#include "lib/monitor/quota_poller.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {

QuotaPoller::QuotaPoller(QuotaPollerOptions options, AccountPool& pool, TokenManager& tokens,
                         const CloudCodeClient& cloud_code, QuotaSink sink, const Clock& clock)
    : options_(options),
      pool_(pool),
      tokens_(tokens),
      cloud_code_(cloud_code),
      sink_(std::move(sink)),
      clock_(clock),
      onboarding_(options_.onboarding, cloud_code, clock) {}

QuotaPoller::~QuotaPoller() { Stop(); }

void QuotaPoller::Start() {
  absl::MutexLock lock(&mu_);
  if (started_) return;
  started_ = true;
  for (int i = 0; i < std::max(1, options_.max_in_flight); ++i) threads_.emplace_back([this] { WorkerLoop(); });
  threads_.emplace_back([this] { SchedulerLoop(); });
}

void QuotaPoller::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
  threads_.clear();
}

int64_t QuotaPoller::PollCount() const {
  absl::MutexLock lock(&mu_);
  return polls_;
}

absl::Duration QuotaPoller::NextInterval() {
  return options_.interval * (1.0 + absl::Uniform(rng_, -options_.jitter, options_.jitter));
}

void QuotaPoller::SchedulerLoop() {
  // Due times follow the injected clock; the loop looks at it often enough for tests that move it.
  const absl::Duration tick = std::clamp(options_.interval / 50, absl::Milliseconds(5), absl::Seconds(1));
  while (true) {
    std::vector<AccountView> accounts = pool_.List();
    const absl::Time now = clock_.Now();
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    absl::flat_hash_set<std::string> usable;
    has_project_.clear();
    for (const AccountView& a : accounts) {
      if (a.disabled || a.proxy_disabled) continue;
      usable.insert(a.account_id);
      if (!a.project_id.empty()) has_project_.insert(a.account_id);
      if (!next_due_.contains(a.account_id)) {
        // New accounts are polled at once (the concurrency bound spreads them out); the jittered
        // interval takes over from then on.
        next_due_[a.account_id] = now;
      }
    }
    for (auto it = next_due_.begin(); it != next_due_.end();) {
      it = usable.contains(it->first) ? std::next(it) : next_due_.erase(it);
    }
    for (auto it = backoff_.begin(); it != backoff_.end();) {
      if (usable.contains(it->first)) {
        ++it;
      } else {
        backoff_.erase(it++);
      }
    }
    for (auto it = no_summary_.begin(); it != no_summary_.end();) {
      if (usable.contains(*it)) {
        ++it;
      } else {
        no_summary_.erase(it++);
      }
    }
    absl::erase_if(no_user_quota_, [&](const std::string& id) { return !usable.contains(id); });
    onboarding_.Retain(usable);
    for (auto& [id, due] : next_due_) {
      if (due <= now && !busy_.contains(id)) {
        busy_.insert(id);
        queue_.push_back(id);
        due = now + NextInterval();
      }
    }
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), tick);
    if (stopping_) return;
  }
}

void QuotaPoller::WorkerLoop() {
  while (true) {
    std::string id;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](QuotaPoller* p) ABSL_NO_THREAD_SAFETY_ANALYSIS { return p->stopping_ || !p->queue_.empty(); }, this));
      if (stopping_) return;
      id = std::move(queue_.front());
      queue_.pop_front();
    }
    Poll(id);
    absl::MutexLock lock(&mu_);
    busy_.erase(id);
    ++polls_;
  }
}

void QuotaPoller::Poll(const std::string& account_id) {
  absl::Notification got;
  absl::StatusOr<AccessToken> token;
  tokens_.Acquire(account_id, [&](absl::StatusOr<AccessToken> t) {
    token = std::move(t);
    got.Notify();
  });
  if (!got.WaitForNotificationWithTimeout(absl::Seconds(60)) || !token.ok()) {
    // Acquire always calls back; on timeout the callback still owns `token` and `got`, so wait.
    got.WaitForNotification();
    spdlog::debug("quota poll of account {} skipped: no token ({})", account_id,
                  token.ok() ? "timeout" : std::string(token.status().message()));
    return;
  }

  // The account's own way out (direct without an egress); never direct instead of its egress.
  absl::StatusOr<EgressRoute> route = tokens_.EgressFor(account_id);
  if (!route.ok()) {
    spdlog::debug("quota poll of account {} skipped: {}", account_id, std::string(route.status().message()));
    return;
  }
  const CloudCodeClient cloud_code = cloud_code_.Via(*std::move(route));

  auto on_error = [&](const absl::Status& s, const char* what) {
    if (IsEgressFailure(s)) {
      // Not the quota API's doing: the account's polls back off as for a 429, and it is cooled.
      absl::Time until;
      {
        absl::MutexLock lock(&mu_);
        auto step = backoff_.try_emplace(account_id, options_.rate_limit_backoff).first;
        until = clock_.Now() + step->second;
        step->second = std::min(step->second * 2, options_.max_rate_limit_backoff);
        next_due_[account_id] = until;
      }
      tokens_.OnEgressFailure(account_id, s, until);
      return;
    }
    if (absl::IsResourceExhausted(s)) {
      absl::MutexLock lock(&mu_);
      auto step = backoff_.try_emplace(account_id, options_.rate_limit_backoff).first;
      const std::optional<absl::Duration> asked = RetryDelayOf(s);
      const absl::Duration wait = asked ? *asked : step->second;
      if (!asked) step->second = std::min(step->second * 2, options_.max_rate_limit_backoff);
      next_due_[account_id] = clock_.Now() + wait;
      spdlog::warn("quota API rate-limited the polls of account {} ({}); its next poll in {}{}", account_id, what,
                   absl::FormatDuration(wait), asked ? " (as the answer asked)" : "");
      return;
    }
    if (std::optional<std::string> suspension = SuspensionOf(s)) {
      // Google's own answer to the account's own token: the account is suspended.
      QuotaObservation suspended;
      suspended.account_id = account_id;
      suspended.observed = clock_.Now();
      suspended.forbidden = true;
      suspended.suspended = true;
      suspended.suspension_message = *std::move(suspension);
      sink_({suspended});
      spdlog::warn("account {}: {} answered that Google suspended the account (Terms of Service)", account_id, what);
      return;
    }
    if (absl::IsPermissionDenied(s)) {
      QuotaObservation forbidden;
      forbidden.account_id = account_id;
      forbidden.observed = clock_.Now();
      forbidden.forbidden = true;
      sink_({forbidden});
      spdlog::warn("account {}: the quota API answered 403; reported as forbidden", account_id);
      return;
    }
    spdlog::warn("quota poll of account {} failed: {}", account_id, std::string(s.message()));
  };

  std::optional<CodeAssistInfo> info;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = code_assist_.find(account_id); it != code_assist_.end()) info = it->second;
  }
  if (!info) {
    absl::StatusOr<CodeAssistInfo> loaded = cloud_code.LoadCodeAssist(token->token);
    if (!loaded.ok()) return on_error(loaded.status(), "loadCodeAssist");
    info = *loaded;
    absl::MutexLock lock(&mu_);
    code_assist_[account_id] = *info;
    if (info->project_id.empty() && has_project_.contains(account_id)) {
      // The file's project stands (the broker keeps it); quota is read without one.
      if (reported_no_project_.insert(account_id).second) {
        spdlog::warn("account {}: loadCodeAssist names no Cloud Code project; the one in its file is kept", account_id);
      }
    }
  }
  // Neither loadCodeAssist nor the file names a project: onboard it (never make one up).
  bool needs_project = false;
  {
    absl::MutexLock lock(&mu_);
    needs_project = info->project_id.empty() && !has_project_.contains(account_id);
  }
  if (needs_project && !info->ineligible.empty()) {
    // No tier the account may use: onboarding cannot succeed, and is not tried. The account is not
    // served, with Google's reason, until loadCodeAssist says otherwise.
    ReportNoProject(account_id, info->tier, absl::StrCat("tier-ineligible (", info->ineligible, "); not onboarded"));
    {
      absl::MutexLock lock(&mu_);
      code_assist_.erase(account_id);  // asked again next poll: the account may become eligible
    }
    return;
  }
  if (needs_project && !Onboard(account_id, token->token, *info, cloud_code)) return;
  absl::StatusOr<std::vector<ModelQuotaInfo>> models = cloud_code.FetchAvailableModels(token->token, info->project_id);
  if (!models.ok()) return on_error(models.status(), "fetchAvailableModels");
  const absl::Time observed = clock_.Now();
  std::vector<QuotaObservation> out;
  QuotaObservation account_level;
  account_level.account_id = account_id;
  account_level.observed = observed;
  account_level.tier = info->tier;
  account_level.project_id = info->project_id;
  out.push_back(account_level);
  for (const ModelQuotaInfo& m : *models) {
    QuotaObservation o = account_level;
    o.source = QuotaSource::kAvailableModels;
    o.model = m.model;
    o.remaining_fraction = m.remaining_fraction;
    o.reset_time = m.reset_time;
    out.push_back(std::move(o));
  }
  // The buckets per model family and window: the weekly ones are nowhere else, and Claude/GPT
  // fractions from fetchAvailableModels cannot be trusted.
  bool summary = false;
  {
    absl::MutexLock lock(&mu_);
    summary = !no_summary_.contains(account_id);
  }
  absl::Status summary_error;
  if (summary) {
    absl::StatusOr<std::vector<QuotaBucketInfo>> buckets =
        cloud_code.RetrieveUserQuotaSummary(token->token, info->project_id);
    if (buckets.ok()) {
      const absl::Time bucket_observed = clock_.Now();
      for (const QuotaBucketInfo& b : *buckets) {
        QuotaObservation o = account_level;
        o.observed = bucket_observed;
        o.source = QuotaSource::kQuotaSummary;
        o.bucket = b.bucket;
        o.family = b.group;
        o.remaining_fraction = b.remaining_fraction;
        o.reset_time = b.reset_time;
        out.push_back(std::move(o));
      }
    } else if (absl::IsNotFound(buckets.status())) {
      absl::MutexLock lock(&mu_);
      if (no_summary_.insert(account_id).second) {
        spdlog::info("account {}: the quota API offers no retrieveUserQuotaSummary; its quota is read from "
                     "retrieveUserQuota and fetchAvailableModels", account_id);
      }
    } else {
      summary_error = buckets.status();
    }
  }
  bool user_quota = false;
  {
    absl::MutexLock lock(&mu_);
    user_quota = no_summary_.contains(account_id) && !no_user_quota_.contains(account_id);
  }
  const char* failed = "retrieveUserQuotaSummary";
  if (user_quota && summary_error.ok()) {
    summary_error = ReadUserQuota(cloud_code, account_id, token->token, account_level, out);
    failed = "retrieveUserQuota";
  }
  sink_(out);
  if (!summary_error.ok()) return on_error(summary_error, failed);
  absl::MutexLock lock(&mu_);
  backoff_.erase(account_id);
}

bool QuotaPoller::Onboard(const std::string& account_id, const std::string& access_token, CodeAssistInfo& info,
                          const CloudCodeClient& cloud_code) {
  const OnboardingStep step = onboarding_.Step(account_id, access_token, info.default_tier_id, &cloud_code);
  if (!step.project_id.empty()) {
    info.project_id = step.project_id;
    {
      absl::MutexLock lock(&mu_);
      code_assist_[account_id] = info;
      has_project_.insert(account_id);
    }
    spdlog::info("account {} onboarded: Cloud Code project {}", account_id, step.project_id);
    if (options_.on_onboarded) options_.on_onboarded(account_id, step.project_id);
    return true;
  }
  {
    absl::MutexLock lock(&mu_);
    // Come back when the onboarding has something to do (a poll of its operation), not later.
    if (auto due = next_due_.find(account_id); due != next_due_.end() && step.next) {
      due->second = std::min(due->second, *step.next);
    }
  }
  // Until it has a project the account is not served: no quota to read, only why.
  ReportNoProject(account_id, info.tier, step.reason);
  spdlog::debug("account {} has no Cloud Code project: {}", account_id, step.reason);
  return false;
}

void QuotaPoller::ReportNoProject(const std::string& account_id, Tier tier, std::string reason) {
  QuotaObservation why;
  why.account_id = account_id;
  why.observed = clock_.Now();
  why.tier = tier;
  why.no_project_reason = std::move(reason);
  sink_({why});
}

absl::Status QuotaPoller::ReadUserQuota(const CloudCodeClient& cloud_code, const std::string& account_id,
                                        const std::string& access_token,
                                        const QuotaObservation& account_level, std::vector<QuotaObservation>& out) {
  absl::StatusOr<std::vector<ModelQuotaInfo>> models = cloud_code.RetrieveUserQuota(access_token, account_level.project_id);
  if (absl::IsNotFound(models.status())) {
    absl::MutexLock lock(&mu_);
    if (no_user_quota_.insert(account_id).second) {
      spdlog::info("account {}: the quota API offers no retrieveUserQuota either; its quota is read from "
                   "fetchAvailableModels alone", account_id);
    }
    return absl::OkStatus();
  }
  if (!models.ok()) return models.status();
  const absl::Time observed = clock_.Now();
  for (const ModelQuotaInfo& m : *models) {
    QuotaObservation o = account_level;
    o.observed = observed;
    o.source = QuotaSource::kUserQuota;
    o.model = m.model;
    o.remaining_fraction = m.remaining_fraction;
    o.reset_time = m.reset_time;
    out.push_back(std::move(o));
  }
  return absl::OkStatus();
}

}  // namespace tokenbroker
