#include "server/api/status_convert.h"

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"

namespace tokenbroker {
namespace {

// Callers told the same instant would all come back at it, and a replica would hand out what
// another has just handed out before their lease counts meet: each RetryInfo is lengthened by a
// random part of up to a tenth of it (at most 500 ms), so the herd arrives spread out.
absl::Duration Spread(absl::Duration delay) {
  thread_local absl::BitGen gen;
  const absl::Duration most = std::min(delay / 10, absl::Milliseconds(500));
  if (most <= absl::ZeroDuration()) return delay;
  return delay + absl::Nanoseconds(absl::Uniform<int64_t>(gen, 0, absl::ToInt64Nanoseconds(most) + 1));
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const auto code = static_cast<grpc::StatusCode>(status.code());
  std::string message(status.message());
  google::rpc::Status rich;
  rich.set_code(static_cast<int>(status.code()));
  rich.set_message(message);
  if (std::optional<std::string> field = InvalidField(status)) {
    google::rpc::BadRequest bad;
    google::rpc::BadRequest::FieldViolation* v = bad.add_field_violations();
    v->set_field(*field);
    std::string prefix = *field + ": ";
    v->set_description(message.rfind(prefix, 0) == 0 ? message.substr(prefix.size()) : message);
    rich.add_details()->PackFrom(bad);
  }
  if (std::optional<std::string> model = ExhaustedModel(status)) {
    google::rpc::QuotaFailure failure;
    google::rpc::QuotaFailure::Violation* v = failure.add_violations();
    v->set_subject(absl::StrCat("model:", *model));
    v->set_description(message);
    rich.add_details()->PackFrom(failure);
  }
  if (std::optional<CallerLimit> caller = ExhaustedCaller(status)) {
    google::rpc::QuotaFailure failure;
    google::rpc::QuotaFailure::Violation* v = failure.add_violations();
    v->set_subject(absl::StrCat("caller:", caller->caller));
    v->set_description(absl::StrCat("caller policy limit ", caller->limit, ": ", message));
    rich.add_details()->PackFrom(failure);
  }
  if (std::optional<absl::Duration> delay = RetryDelay(status)) {
    google::rpc::RetryInfo retry;
    const int64_t nanos = absl::ToInt64Nanoseconds(Spread(*delay));
    retry.mutable_retry_delay()->set_seconds(nanos / 1'000'000'000);
    retry.mutable_retry_delay()->set_nanos(static_cast<int32_t>(nanos % 1'000'000'000));
    rich.add_details()->PackFrom(retry);
  }
  if (rich.details_size() == 0) return grpc::Status(code, message);
  return grpc::Status(code, message, rich.SerializeAsString());
}

}  // namespace tokenbroker
