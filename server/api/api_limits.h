#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tokenbroker/v1/broker.pb.h"

namespace tokenbroker {

// The API's limits, in one place: what a request may carry (docs/ARCHITECTURE.md §3). Model and
// session id lengths are lib/errors.h's (the pool relies on them too). Each Validate* returns OK
// or INVALID_ARGUMENT naming the first field at fault (InvalidFieldError); nothing is truncated.

// Longest max_wait a GetToken may ask for.
inline constexpr absl::Duration kMaxWait = absl::Minutes(10);
// ReportOutcome: a lease id as GetToken returns it, an account id, the raw Retry-After header, the
// upstream's error body.
inline constexpr size_t kMaxLeaseIdLength = 64;
inline constexpr size_t kMaxAccountIdLength = 256;
inline constexpr size_t kMaxRetryAfterLength = 256;
inline constexpr size_t kMaxErrorBody = 64 * 1024;
// SetQuotaManager's monitor_target, ListAccounts' page_token.
inline constexpr size_t kMaxTargetLength = 512;
inline constexpr size_t kMaxPageTokenLength = 512;
// A ListAccounts page holds about this many bytes at most, whatever the page size.
inline constexpr size_t kListPageBytes = 1 << 20;

absl::Status ValidateGetToken(const v1::GetTokenRequest& request);
absl::Status ValidateReportOutcome(const v1::ReportOutcomeRequest& request);
absl::Status ValidateExplainSelection(const v1::ExplainSelectionRequest& request);
absl::Status ValidateListAccounts(const v1::ListAccountsRequest& request);
absl::Status ValidateResetAccount(const v1::ResetAccountRequest& request);
// The monitor target alone (the quota settings are checked by ValidateQuotaSettings).
absl::Status ValidateMonitorTarget(const std::string& target);

}  // namespace tokenbroker
