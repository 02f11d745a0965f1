#pragma once

// GetToken's request and response on a protobuf arena (issue 15). By default gRPC's callback API
// heap-allocates every string field of both messages (the response has about ten); here they come
// out of a block that lives in the holder, and holders are reused per thread, so a warm GetToken
// allocates for its messages only the buffers of strings longer than the small-string size.

#include <grpcpp/support/message_allocator.h>

#include "tokenbroker/v1/broker.pb.h"

namespace tokenbroker {

class TokenMessageAllocator final
    : public grpc::MessageAllocator<v1::GetTokenRequest, v1::GetTokenResponse> {
 public:
  // Holders kept per thread for reuse; beyond it a released holder is freed.
  static constexpr size_t kCachedPerThread = 32;

  grpc::MessageHolder<v1::GetTokenRequest, v1::GetTokenResponse>* AllocateMessages() override;
};

}  // namespace tokenbroker
