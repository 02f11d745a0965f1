#include "server/quota_subscriber.h"

#include <algorithm>

#include "absl/random/random.h"
#include "server/proto_convert.h"
#include "spdlog/spdlog.h"
#include "tokenbroker/v1/monitor.grpc.pb.h"

namespace tokenbroker {

QuotaSubscriber::~QuotaSubscriber() { Disconnect(); }

void QuotaSubscriber::Connect(const std::string& target) {
  absl::MutexLock control(&control_mu_);
  DisconnectLocked();
  absl::MutexLock lock(&mu_);
  target_ = target;
  stopping_ = false;
  thread_ = std::thread([this, target] { Loop(target); });
}

void QuotaSubscriber::Disconnect() {
  absl::MutexLock control(&control_mu_);
  DisconnectLocked();
}

void QuotaSubscriber::DisconnectLocked() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    if (context_ != nullptr) context_->TryCancel();
  }
  if (thread_.joinable()) thread_.join();
  absl::MutexLock lock(&mu_);
  connected_ = false;
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

void QuotaSubscriber::Loop(std::string target) {
  absl::BitGen rng;
  absl::Duration backoff = absl::Milliseconds(100);
  const absl::Duration max_backoff = absl::Seconds(5);
  while (true) {
    auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
    auto stub = v1::QuotaMonitorService::NewStub(channel);
    grpc::ClientContext context;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      context_ = &context;
    }
    auto reader = stub->WatchQuota(&context, v1::WatchQuotaRequest());
    v1::WatchQuotaResponse message;
    while (reader->Read(&message)) {
      std::vector<QuotaObservation> batch;
      batch.reserve(message.observations_size());
      for (const v1::QuotaObservation& p : message.observations()) batch.push_back(FromProto(p));
      pool_.UpdateQuota(batch);
      if (message.snapshot()) {
        absl::MutexLock lock(&mu_);
        connected_ = true;
        ++connections_;
        backoff = absl::Milliseconds(100);
        spdlog::info("quota stream from {} connected: {} observations in the snapshot", target, batch.size());
      }
    }
    grpc::Status status = reader->Finish();
    absl::MutexLock lock(&mu_);
    context_ = nullptr;
    const bool was_connected = connected_;
    connected_ = false;
    if (stopping_) return;
    if (was_connected) {
      spdlog::warn("quota stream from {} lost ({}); keeping the cache and reconnecting", target, status.error_message());
    }
    // Jittered exponential backoff before the next attempt.
    absl::Duration wait = backoff / 2 + absl::Uniform(rng, 0.0, 0.5) * backoff;
    backoff = std::min(backoff * 2, max_backoff);
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), wait);
    if (stopping_) return;
  }
}

}  // namespace tokenbroker
