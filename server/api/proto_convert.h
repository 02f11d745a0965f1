#pragma once

#include "absl/time/time.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/timestamp.pb.h"
#include "lib/selection/account_pool.h"
#include "lib/broker/token_issuer.h"
#include "tokenbroker/v1/broker.pb.h"
#include "tokenbroker/v1/monitor.pb.h"

namespace tokenbroker {

// Domain -> proto translations for the broker's responses. Pure functions.
v1::Tier ToProto(Tier tier);
v1::Verdict ToProto(Verdict verdict);
v1::SelectionPolicy ToProto(Policy policy);
v1::CooldownScope ToProto(CooldownScope scope);
v1::QuotaDecision ToProto(QuotaDecision decision);
void ToProto(absl::Time t, google::protobuf::Timestamp* out);
void ToProto(const AccountView& view, v1::Account* out);
void ToProto(const Explanation& explanation, v1::ExplainSelectionResponse* out);
absl::Duration FromProto(const google::protobuf::Duration& d);
void ToProto(absl::Duration d, google::protobuf::Duration* out);

// GetToken, both ways. The request must have passed ValidateGetToken (api_limits.h); the caller,
// the call's deadline and its cancellation are the service's to fill in.
IssueRequest FromProto(const v1::GetTokenRequest& request);
void ToProto(const Issued& issued, v1::GetTokenResponse* out);

// The monitor stream's observation, both ways (the monitor writes it, the broker reads it).
void ToProto(const QuotaObservation& o, v1::QuotaObservation* out);
QuotaObservation FromProto(const v1::QuotaObservation& p);

}  // namespace tokenbroker
