#include "server/api/api_limits.h"

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"

namespace tokenbroker {

absl::Status ValidateGetToken(const v1::GetTokenRequest& request) {
  for (const absl::Status& s : {ValidateModel("model", request.model(), /*required=*/true),
                                ValidateSessionId("session_id", request.session_id()),
                                ValidateModel("quota_group", request.quota_group(), /*required=*/false)}) {
    if (!s.ok()) return s;
  }
  if (request.has_max_wait()) {
    const google::protobuf::Duration& d = request.max_wait();
    const absl::Duration max_wait = absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
    if (max_wait < absl::ZeroDuration() || max_wait > kMaxWait || d.nanos() < 0 || d.nanos() >= 1'000'000'000) {
      return InvalidFieldError("max_wait", absl::StrCat("must be between 0 and ", absl::FormatDuration(kMaxWait)));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateReportOutcome(const v1::ReportOutcomeRequest& request) {
  if (request.lease_id().empty() && request.account_id().empty()) {
    return InvalidFieldError("lease_id", "give the lease_id from GetToken, or account_id and model");
  }
  if (request.lease_id().size() > kMaxLeaseIdLength) {
    return InvalidFieldError("lease_id", "is longer than 64 bytes; pass the lease_id GetToken returned");
  }
  if (request.account_id().size() > kMaxAccountIdLength) {
    return InvalidFieldError("account_id", "is longer than 256 bytes");
  }
  if (absl::Status s = ValidateModel("model", request.model(), /*required=*/false); !s.ok()) return s;
  if (request.http_status() < 100 || request.http_status() > 599) {
    return InvalidFieldError("http_status", absl::StrCat("is ", request.http_status(),
                                                         "; give the upstream's HTTP status, 100 to 599"));
  }
  if (request.retry_after().size() > kMaxRetryAfterLength) {
    return InvalidFieldError("retry_after", "is longer than 256 bytes; pass the raw header value");
  }
  if (request.error_body().size() > kMaxErrorBody) {
    return InvalidFieldError("error_body", absl::StrCat("is ", request.error_body().size(),
                                                        " bytes; at most 65536 are allowed"));
  }
  return absl::OkStatus();
}

absl::Status ValidateExplainSelection(const v1::ExplainSelectionRequest& request) {
  for (const absl::Status& s : {ValidateModel("model", request.model(), /*required=*/true),
                                ValidateSessionId("session_id", request.session_id()),
                                ValidateModel("quota_group", request.quota_group(), /*required=*/false)}) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ValidateListAccounts(const v1::ListAccountsRequest& request) {
  if (request.page_size() < 0) return InvalidFieldError("page_size", "must not be negative");
  if (request.page_token().size() > kMaxPageTokenLength) {
    return InvalidFieldError("page_token", "is not a next_page_token this server returned");
  }
  return absl::OkStatus();
}

absl::Status ValidateResetAccount(const v1::ResetAccountRequest& request) {
  if (request.account_id().empty() || request.account_id().size() > kMaxAccountIdLength) {
    return InvalidFieldError("account_id", "is required: the id list-accounts shows");
  }
  return ValidateModel("model", request.model(), /*required=*/false);
}

absl::Status ValidateMonitorTarget(const std::string& target) {
  if (target.size() > kMaxTargetLength || target.find_first_of(" \t\n") != std::string::npos) {
    return InvalidFieldError("monitor_target", "must be host:port or unix:path, without spaces");
  }
  return absl::OkStatus();
}

}  // namespace tokenbroker
