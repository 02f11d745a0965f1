#include "server/api/token_messages.h"

#include <google/protobuf/arena.h>

#include <memory>
#include <vector>

namespace tokenbroker {
namespace {

google::protobuf::ArenaOptions FirstBlock(char* block, size_t size) {
  google::protobuf::ArenaOptions options;
  options.initial_block = block;
  options.initial_block_size = size;
  return options;
}

class Holder;

// This thread's released holders. Holders are released on whichever gRPC thread ends the call;
// each thread keeps at most kCachedPerThread and frees the rest, so nothing grows.
struct Cache {
  std::vector<std::unique_ptr<Holder>> free;
};
thread_local Cache t_cache;

class Holder final : public grpc::MessageHolder<v1::GetTokenRequest, v1::GetTokenResponse> {
 public:
  Holder() : arena_(FirstBlock(block_, sizeof(block_))) { Make(); }

  void Release() override {
    // Reset destroys both messages and keeps the first block for the next call.
    arena_.Reset();
    if (t_cache.free.size() < TokenMessageAllocator::kCachedPerThread) {
      t_cache.free.emplace_back(this);
    } else {
      delete this;
    }
  }

  void Make() {
    set_request(google::protobuf::Arena::CreateMessage<v1::GetTokenRequest>(&arena_));
    set_response(google::protobuf::Arena::CreateMessage<v1::GetTokenResponse>(&arena_));
  }

 private:
  // A GetToken's two messages with their string objects fit (the strings' long buffers are the
  // heap's); a larger one makes the arena take more blocks for that call only.
  alignas(16) char block_[1024];
  google::protobuf::Arena arena_;
};

}  // namespace

grpc::MessageHolder<v1::GetTokenRequest, v1::GetTokenResponse>* TokenMessageAllocator::AllocateMessages() {
  if (!t_cache.free.empty()) {
    Holder* h = t_cache.free.back().release();
    t_cache.free.pop_back();
    h->Make();
    return h;
  }
  return new Holder();
}

}  // namespace tokenbroker
