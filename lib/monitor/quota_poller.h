#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/monitor/onboarding.h"
#include "lib/selection/account_pool.h"
#include "lib/upstream/cloud_code_client.h"
#include "lib/common/clock.h"
#include "lib/quota/quota.h"
#include "lib/tokens/token_manager.h"

namespace tokenbroker {

struct QuotaPollerOptions {
  absl::Duration interval = absl::Minutes(5);  // each account is polled once per interval
  double jitter = 0.1;                          // ± this fraction of the interval
  int max_in_flight = 4;                        // quota requests at once, never more
  // After the quota API itself answers 429 for an account, that account's polls wait the delay the
  // answer asked for (RetryInfo, Retry-After), or else this long, doubling per 429 in a row up to
  // the max. Other accounts are polled on schedule.
  absl::Duration rate_limit_backoff = absl::Seconds(30);
  absl::Duration max_rate_limit_backoff = absl::Minutes(10);
  // Accounts loadCodeAssist names no project for (and whose file names none) are onboarded.
  OnboardingOptions onboarding;
  // Called (on a poller thread) with an account onboarded and its new project, e.g. to write it
  // into the account's file. May be empty.
  std::function<void(const std::string& account_id, const std::string& project_id)> on_onboarded;
};

// Where observations go: the monitor's QuotaHub, or (embedded mode) the broker's own pool.
using QuotaSink = std::function<void(const std::vector<QuotaObservation>&)>;

// Polls every usable account's quota from Cloud Code: loadCodeAssist once per account (project
// and tier, cached; an account without a project, there or in its file, is onboarded (Onboarding)
// and, until it has one, only an account-level observation saying why is sent), then
// fetchAvailableModels and retrieveUserQuotaSummary (buckets per model family and window; after a
// 404, retrieveUserQuota per model instead) every interval, with at most max_in_flight
// requests at a time. A 429 from the quota API defers that account's next poll (its RetryInfo, or
// backoff); a 403 reports the account as forbidden. Observations are stamped with the time the
// answer came and their source (kAvailableModels). Thread-safe. All references must outlive the poller.
class QuotaPoller {
 public:
  QuotaPoller(QuotaPollerOptions options, AccountPool& pool, TokenManager& tokens, const CloudCodeClient& cloud_code,
              QuotaSink sink, const Clock& clock);
  ~QuotaPoller();  // Stop()s

  void Start();
  void Stop();  // idempotent

  // Completed polls (successful or not) since start.
  int64_t PollCount() const;
  // Accounts being onboarded or whose onboarding failed, and onboardUser requests made.
  size_t OnboardingAccounts() const { return onboarding_.size(); }
  int64_t OnboardingAttempts() const { return onboarding_.attempts(); }

 private:
  void SchedulerLoop();
  void WorkerLoop();
  void Poll(const std::string& account_id);
  // For an account neither loadCodeAssist nor its file names a project for: one onboarding step.
  // True when it is onboarded (info.project_id set, on_onboarded called); false when it still has
  // no project (the account-level observation saying why has been sent, its next poll moved to
  // the onboarding's next step).
  bool Onboard(const std::string& account_id, const std::string& access_token, CodeAssistInfo& info,
               const CloudCodeClient& cloud_code);
  // Tells the brokers why the account has no project (one account-level observation): not served.
  void ReportNoProject(const std::string& account_id, Tier tier, std::string reason);
  // Per-model quota from retrieveUserQuota, where retrieveUserQuotaSummary is not offered (appended
  // to `out`); an error other than 404 is returned.
  absl::Status ReadUserQuota(const CloudCodeClient& cloud_code, const std::string& account_id,
                             const std::string& access_token,
                             const QuotaObservation& account_level, std::vector<QuotaObservation>& out);
  absl::Duration NextInterval() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const QuotaPollerOptions options_;
  AccountPool& pool_;
  TokenManager& tokens_;
  const CloudCodeClient& cloud_code_;
  const QuotaSink sink_;
  const Clock& clock_;

  mutable absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, absl::Time> next_due_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> busy_ ABSL_GUARDED_BY(mu_);  // queued or being polled
  // Per account, after the quota API answered it 429: the next back-off step.
  absl::flat_hash_map<std::string, absl::Duration> backoff_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, CodeAssistInfo> code_assist_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> reported_no_project_ ABSL_GUARDED_BY(mu_);
  // Accounts whose quota API answered 404 to retrieveUserQuotaSummary: not asked again.
  absl::flat_hash_set<std::string> no_summary_ ABSL_GUARDED_BY(mu_);
  // ... and to retrieveUserQuota too: per-model quota from fetchAvailableModels alone.
  absl::flat_hash_set<std::string> no_user_quota_ ABSL_GUARDED_BY(mu_);
  // Accounts whose record in the pool names a project (from its file; rebuilt every tick): never
  // onboarded. An account onboarded here keeps its project in code_assist_.
  absl::flat_hash_set<std::string> has_project_ ABSL_GUARDED_BY(mu_);
  Onboarding onboarding_;
  int64_t polls_ ABSL_GUARDED_BY(mu_) = 0;
  absl::BitGen rng_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

}  // namespace tokenbroker
