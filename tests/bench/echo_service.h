#pragma once

// The gRPC floor of the load benchmarks: a TokenBrokerService whose GetToken answers at once, with
// the context's default reactor, a canned response the size of a real one.

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <string>

#include "tokenbroker/v1/broker.grpc.pb.h"

namespace tokenbroker::bench {

// Thread-safe (the answer is read-only).
class EchoService final : public tokenbroker::v1::TokenBrokerService::CallbackService {
 public:
  explicit EchoService(int answer_bytes) {
    canned_.set_access_token("ya29.a0AfB_byC" + std::string(180, 'x'));
    canned_.set_account_id("acct-000123");
    canned_.set_email("user000123@example.com");
    canned_.set_project_id("vivid-river-000123");
    canned_.mutable_expire_time()->set_seconds(1795920000);
    canned_.set_tier(tokenbroker::v1::TIER_PRO);
    canned_.set_lease_id("l-0123456789abcdef0123456789abcdef");
    canned_.set_quota_decision(tokenbroker::v1::QUOTA_DECISION_PROCEED);
    canned_.set_remaining_fraction(0.62);
    // The token's length makes the answer as long as asked (a length's varint may take a byte more
    // or less: a few steps settle it).
    for (int step = 0; answer_bytes > 0 && step < 4; ++step) {
      const long missing = answer_bytes - 5 - static_cast<long>(canned_.ByteSizeLong());
      const long token = static_cast<long>(canned_.access_token().size()) + missing;
      if (missing == 0 || token < 1) break;
      canned_.set_access_token("ya29." + std::string(std::max(1L, token - 5), 'x'));
    }
  }
  grpc::ServerUnaryReactor* GetToken(grpc::CallbackServerContext* context, const tokenbroker::v1::GetTokenRequest*,
                                     tokenbroker::v1::GetTokenResponse* response) override {
    *response = canned_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  tokenbroker::v1::GetTokenResponse canned_;
};


}  // namespace tokenbroker::bench
