#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace tokenbroker {

// The one place absl::Status becomes grpc::Status. Same code and message; a status made by
// InvalidFieldError carries a google.rpc.BadRequest field violation in the rich error details
// (grpc-status-details-bin), readable by grpcurl, buf curl and every gRPC client; one made by
// NoAccountAvailableError carries google.rpc.QuotaFailure (subject "model:<model>") and, when
// an account will free, google.rpc.RetryInfo: the delay until it frees, plus a random spread of up
// to a tenth of it (at most 500 ms) so that callers told the same instant do not all return at it.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace tokenbroker
