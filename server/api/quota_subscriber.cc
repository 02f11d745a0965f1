#include "server/api/quota_subscriber.h"

#include <algorithm>

#include "absl/random/random.h"
#include "server/api/proto_convert.h"
#include "spdlog/spdlog.h"
#include "tokenbroker/v1/monitor.grpc.pb.h"

namespace tokenbroker {

QuotaSubscriber::~QuotaSubscriber() { Stop(); }

void QuotaSubscriber::Connect(const std::string& target) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  target_ = target;
  ChangedLocked();
  if (!thread_.joinable()) thread_ = std::thread([this] { Loop(); });
}

void QuotaSubscriber::Disconnect() {
  absl::MutexLock lock(&mu_);
  target_.clear();
  ChangedLocked();
}

void QuotaSubscriber::ChangedLocked() {
  ++generation_;
  connected_ = false;
  if (context_ != nullptr) context_->TryCancel();
}

void QuotaSubscriber::Stop() {
  std::thread thread;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    target_.clear();
    ChangedLocked();
    thread.swap(thread_);
  }
  if (thread.joinable()) thread.join();
}

std::string QuotaSubscriber::target() const {
  absl::MutexLock lock(&mu_);
  return target_;
}

bool QuotaSubscriber::connected() const {
  absl::MutexLock lock(&mu_);
  return connected_;
}

int64_t QuotaSubscriber::connections() const {
  absl::MutexLock lock(&mu_);
  return connections_;
}

void QuotaSubscriber::Loop() {
  absl::BitGen rng;
  absl::Duration backoff = absl::Milliseconds(100);
  const absl::Duration max_backoff = absl::Seconds(5);
  uint64_t last_generation = 0;
  while (true) {
    grpc::ClientContext context;
    std::string target;
    uint64_t generation = 0;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](QuotaSubscriber* s) ABSL_NO_THREAD_SAFETY_ANALYSIS { return s->stopping_ || !s->target_.empty(); },
          this));
      if (stopping_) return;
      target = target_;
      generation = generation_;
      context_ = &context;
    }
    if (generation != last_generation) backoff = absl::Milliseconds(100);  // a new target: no backoff carried over
    last_generation = generation;
    auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
    auto stub = v1::QuotaMonitorService::NewStub(channel);
    auto reader = stub->WatchQuota(&context, v1::WatchQuotaRequest());
    v1::WatchQuotaResponse message;
    while (reader->Read(&message)) {
      std::vector<QuotaObservation> batch;
      batch.reserve(message.observations_size());
      for (const v1::QuotaObservation& p : message.observations()) batch.push_back(FromProto(p));
      pool_.UpdateQuota(batch);
      if (then_) then_(batch);
      if (message.snapshot()) {
        absl::MutexLock lock(&mu_);
        if (generation != generation_) continue;  // replaced meanwhile: the stream is being cancelled
        connected_ = true;
        ++connections_;
        backoff = absl::Milliseconds(100);
        spdlog::info("quota stream from {} connected: {} observations in the snapshot", target, batch.size());
      }
    }
    grpc::Status status = reader->Finish();
    absl::MutexLock lock(&mu_);
    context_ = nullptr;
    if (stopping_) return;
    if (generation != generation_) continue;  // Connect or Disconnect: follow target_ at once
    const bool was_connected = connected_;
    connected_ = false;
    if (was_connected) {
      spdlog::warn("quota stream from {} lost ({}); keeping the cache and reconnecting", target, status.error_message());
    }
    // Jittered exponential backoff before the next attempt (a Connect, Disconnect or Stop ends it).
    absl::Duration wait = backoff / 2 + absl::Uniform(rng, 0.0, 0.5) * backoff;
    backoff = std::min(backoff * 2, max_backoff);
    struct Args {
      QuotaSubscriber* self;
      uint64_t generation;
    } args{this, generation};
    mu_.AwaitWithTimeout(absl::Condition(
                             +[](Args* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                               return a->self->stopping_ || a->self->generation_ != a->generation;
                             },
                             &args),
                         wait);
    if (stopping_) return;
  }
}

}  // namespace tokenbroker
