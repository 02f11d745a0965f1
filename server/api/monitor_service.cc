#include "server/api/monitor_service.h"

#include <functional>
#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "server/api/proto_convert.h"

namespace tokenbroker {
namespace {

// One WatchQuota stream. The hub wakes it through a Link that outlives it, so a wake-up racing
// with the end of the stream is harmless.
class WatchReactor final : public grpc::ServerWriteReactor<v1::WatchQuotaResponse> {
 public:
  using Link = MonitorService::Link;

  WatchReactor(QuotaHub& hub, absl::flat_hash_set<std::string> filter, std::shared_ptr<Link> link,
               std::function<void()> on_done)
      : hub_(hub), link_(std::move(link)), on_done_(std::move(on_done)) {
    {
      absl::MutexLock lock(&link_->mu);
      link_->reactor = this;
    }
    std::weak_ptr<Link> weak = link_;
    id_ = hub_.Subscribe(std::move(filter), [weak] {
      if (std::shared_ptr<Link> link = weak.lock()) {
        absl::MutexLock lock(&link->mu);
        if (link->reactor != nullptr) static_cast<WatchReactor*>(link->reactor)->MaybeWrite();
      }
    });
    MaybeWrite();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the stream is closed"));
      return;
    }
    bool closing;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      closing = closing_;
    }
    if (closing) {
      FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the quota monitor is shutting down"));
      return;
    }
    MaybeWrite();
  }

  // Ends the stream with UNAVAILABLE (the monitor is draining): now, or when the write in flight
  // completes.
  void Close() {
    {
      absl::MutexLock lock(&mu_);
      closing_ = true;
      if (writing_) return;  // OnWriteDone finishes
    }
    FinishOnce(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the quota monitor is shutting down"));
  }

  void OnCancel() override { FinishOnce(grpc::Status::CANCELLED); }

  void OnDone() override {
    {
      absl::MutexLock lock(&link_->mu);
      link_->reactor = nullptr;
    }
    hub_.Unsubscribe(id_);
    on_done_();
    delete this;
  }

 private:
  void FinishOnce(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
    }
    Finish(status);
  }

  // Sends what is pending, unless a write is in flight (its completion sends the rest). No lock
  // is held across StartWrite, so a reaction run inline cannot deadlock.
  void MaybeWrite() {
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_ || closing_) return;
      QuotaHub::Batch batch = hub_.Take(id_);
      if (!batch.snapshot && batch.observations.empty()) return;
      message_.Clear();
      message_.set_snapshot(batch.snapshot);
      for (const QuotaObservation& o : batch.observations) {
        ToProto(o, message_.add_observations());
      }
      writing_ = true;
    }
    // message_ is not touched again until OnWriteDone clears writing_.
    StartWrite(&message_);
  }

  QuotaHub& hub_;
  std::shared_ptr<Link> link_;
  std::function<void()> on_done_;
  int64_t id_ = 0;
  absl::Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  v1::WatchQuotaResponse message_;  // owned by the write in flight while writing_
};

}  // namespace

grpc::ServerWriteReactor<v1::WatchQuotaResponse>* MonitorService::WatchQuota(grpc::CallbackServerContext* context,
                                                                             const v1::WatchQuotaRequest* request) {
  absl::flat_hash_set<std::string> filter(request->account_ids().begin(), request->account_ids().end());
  auto link = std::make_shared<Link>();
  bool closing;
  {
    absl::MutexLock lock(&mu_);
    closing = closing_;
    if (!closing) links_.insert(link);
  }
  auto* reactor = new WatchReactor(hub_, std::move(filter), link, [this, link] {
    absl::MutexLock lock(&mu_);
    links_.erase(link);
  });
  if (closing) reactor->Close();
  return reactor;
}

void MonitorService::CloseStreams() {
  std::vector<std::shared_ptr<Link>> links;
  {
    absl::MutexLock lock(&mu_);
    closing_ = true;
    links.assign(links_.begin(), links_.end());
  }
  for (const std::shared_ptr<Link>& link : links) {
    absl::MutexLock lock(&link->mu);
    if (link->reactor != nullptr) static_cast<WatchReactor*>(link->reactor)->Close();
  }
}

}  // namespace tokenbroker
