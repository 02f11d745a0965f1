#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/common/clock.h"
#include "lib/upstream/http_client.h"

namespace tokenbroker {

// loadCodeAssist's answer: the account's Cloud Code project (empty: it has none — never made up)
// and tier (paidTier if present, else currentTier).
struct CodeAssistInfo {
  std::string project_id;
  Tier tier = Tier::kUnknown;
  // The allowedTiers[] id marked isDefault (else the first one): the tier onboardUser asks for.
  std::string default_tier_id;
  // The account may use no tier (allowedTiers names none, ineligibleTiers[] says why): onboarding
  // cannot succeed. "<tierId>: <reasonCode>: <reasonMessage>" as SafeText; empty otherwise.
  std::string ineligible;
};

// onboardUser's long-running operation, as onboardUser or a poll of it answers.
struct OnboardOperation {
  std::string name;        // e.g. "operations/abc123"; polled at GET {base}/v1internal/<name>
  bool done = false;
  std::string project_id;  // done and succeeded: response.cloudaicompanionProject.id
  std::string error;       // done and failed: the operation's error (code and message, SafeText)
};

// One model of fetchAvailableModels. A model without remainingFraction is at 0.
struct ModelQuotaInfo {
  std::string model;
  double remaining_fraction = 0;
  std::optional<absl::Time> reset_time;
};

// One bucket of retrieveUserQuotaSummary: one window of a model family's quota. A bucket without
// remainingFraction is at 0.
struct QuotaBucketInfo {
  std::string group;   // groupId: "gemini", "3p"
  std::string bucket;  // bucketId, e.g. "gemini-weekly"
  std::string window;  // e.g. "5h", "168h" (informative)
  double remaining_fraction = 0;
  std::optional<absl::Time> reset_time;
};

// Pure parsers of the answers (shapes in upstream-formats.md). INVALID_ARGUMENT for a body that
// is not the expected JSON. ParseQuotaSummary accepts `groups` at the top or under `quotaSummary`,
// skips buckets without a bucketId and keeps at most 32 buckets.
absl::StatusOr<CodeAssistInfo> ParseLoadCodeAssist(absl::string_view body);
absl::StatusOr<std::vector<ModelQuotaInfo>> ParseAvailableModels(absl::string_view body);
absl::StatusOr<std::vector<QuotaBucketInfo>> ParseQuotaSummary(absl::string_view body);
// retrieveUserQuota: `buckets[{modelId, tokenType, remainingFraction, resetTime}]`, one entry per
// model (its lowest fraction over token types), sorted by model; entries without a modelId are
// skipped, at most 64 models kept.
absl::StatusOr<std::vector<ModelQuotaInfo>> ParseUserQuota(absl::string_view body);
// onboardUser's answer or a poll of its operation. INVALID_ARGUMENT for a body that is not a JSON
// object, for an operation name that is not a safe URL path ([A-Za-z0-9/_.-], at most 256, no
// ".."), and for an operation that is done without a project or an error, or not done and
// nameless (it could never be polled).
absl::StatusOr<OnboardOperation> ParseOnboardOperation(absl::string_view body);

// The delay a Cloud Code error answer asked for (Retry-After, RetryInfo, quotaResetDelay, ...), as
// carried by the statuses CloudCodeClient returns; unset when it named none.
std::optional<absl::Duration> RetryDelayOf(const absl::Status& status);
// For an error status of CloudCodeClient: when the answer said Google suspended the account
// (Terms of Service), its message (SafeText).
std::optional<std::string> SuspensionOf(const absl::Status& status);

// Cloud Code's v1internal API. Tries each base URL in turn when one answers 429, 5xx or cannot be
// reached. Thread-safe; blocking (call from worker threads). `http` must outlive it.
class CloudCodeClient {
 public:
  // `clock` (must outlive it) dates the parsed failures.
  CloudCodeClient(std::vector<std::string> base_urls, const HttpClient& http,
                  absl::Duration timeout = absl::Seconds(15), const Clock& clock = Clock::Real());

  // The same client, its calls made through `egress` (one account's own way out).
  CloudCodeClient Via(EgressRoute egress) const;

  // UNAUTHENTICATED on 401, PERMISSION_DENIED on 403, RESOURCE_EXHAUSTED when every base answered
  // 429, UNAVAILABLE for 5xx or transport failures.
  absl::StatusOr<CodeAssistInfo> LoadCodeAssist(const std::string& access_token) const;
  // With a project; on 403 retries once without it; 403 again is PERMISSION_DENIED (forbidden).
  absl::StatusOr<std::vector<ModelQuotaInfo>> FetchAvailableModels(const std::string& access_token,
                                                                   const std::string& project_id) const;
  // Quota per model family and window. NOT_FOUND when the API does not offer it (404); otherwise
  // the errors of LoadCodeAssist.
  absl::StatusOr<std::vector<QuotaBucketInfo>> RetrieveUserQuotaSummary(const std::string& access_token,
                                                                        const std::string& project_id) const;
  // Quota per model (retrieveUserQuota); errors as RetrieveUserQuotaSummary.
  absl::StatusOr<std::vector<ModelQuotaInfo>> RetrieveUserQuota(const std::string& access_token,
                                                                const std::string& project_id) const;

  // Starts onboarding an account without a project: POST onboardUser {"tierId": tier_id, ...}.
  // Answers the operation (possibly already done). Each request waits at most `timeout` (capped
  // by the client's). Errors as LoadCodeAssist; DEADLINE_EXCEEDED when the upstream hangs.
  absl::StatusOr<OnboardOperation> OnboardUser(const std::string& access_token, const std::string& tier_id,
                                               absl::Duration timeout) const;
  // One poll of an onboardUser operation: GET {base}/v1internal/<operation name>. Errors as
  // OnboardUser. Polling it with back-off and a deadline is the caller's (Onboarding,
  // lib/monitor/onboarding.h), so no thread sleeps here.
  absl::StatusOr<OnboardOperation> GetOperation(const std::string& access_token, const std::string& name,
                                                absl::Duration timeout) const;

 private:
  // POSTs {base}/v1internal:<method> (or, with `get_path`, GETs {base}/v1internal/<get_path>).
  absl::StatusOr<HttpResponse> Call(const std::string& method, const std::string& access_token,
                                    const std::string& body, absl::Duration timeout,
                                    const std::string& get_path = "") const;

  const std::vector<std::string> base_urls_;
  const HttpClient& http_;
  const absl::Duration timeout_;
  const Clock& clock_;
  EgressRoute egress_;  // default: direct
};

}  // namespace tokenbroker
