#include "lib/monitor/quota_hub.h"

#include <algorithm>

namespace tokenbroker {

void QuotaHub::Publish(const std::vector<QuotaObservation>& observations) {
  std::vector<Wakeup> to_wake;
  {
    absl::MutexLock lock(&mu_);
    for (const QuotaObservation& o : observations) {
      std::string key = Key(o);
      latest_[key] = o;
      for (auto& [id, sub] : subscribers_) {
        if (!sub.filter.empty() && !sub.filter.contains(o.account_id)) continue;
        if (!sub.snapshot_taken) continue;  // the snapshot will carry it
        const bool was_idle = sub.pending.empty();
        sub.pending.insert(key);
        if (was_idle && sub.wakeup) to_wake.push_back(sub.wakeup);
      }
    }
  }
  for (Wakeup& w : to_wake) w();
}

int64_t QuotaHub::Subscribe(absl::flat_hash_set<std::string> account_filter, Wakeup wakeup) {
  absl::MutexLock lock(&mu_);
  int64_t id = next_id_++;
  subscribers_[id] = Subscriber{std::move(account_filter), std::move(wakeup), false, {}};
  return id;
}

void QuotaHub::Unsubscribe(int64_t id) {
  absl::MutexLock lock(&mu_);
  subscribers_.erase(id);
}

QuotaHub::Batch QuotaHub::Take(int64_t id) {
  Batch batch;
  absl::MutexLock lock(&mu_);
  auto it = subscribers_.find(id);
  if (it == subscribers_.end()) return batch;
  Subscriber& sub = it->second;
  if (!sub.snapshot_taken) {
    sub.snapshot_taken = true;
    batch.snapshot = true;
    for (const auto& [key, o] : latest_) {
      if (sub.filter.empty() || sub.filter.contains(o.account_id)) batch.observations.push_back(o);
    }
  } else {
    for (const std::string& key : sub.pending) {
      if (auto o = latest_.find(key); o != latest_.end()) batch.observations.push_back(o->second);
    }
  }
  sub.pending.clear();
  std::sort(batch.observations.begin(), batch.observations.end(), [](const QuotaObservation& a, const QuotaObservation& b) {
    return a.account_id != b.account_id ? a.account_id < b.account_id : a.model < b.model;
  });
  return batch;
}

size_t QuotaHub::PendingFor(int64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = subscribers_.find(id);
  return it == subscribers_.end() ? 0 : it->second.pending.size();
}

size_t QuotaHub::MaxPending() const {
  absl::MutexLock lock(&mu_);
  size_t most = 0;
  for (const auto& [id, sub] : subscribers_) most = std::max(most, sub.pending.size());
  return most;
}

size_t QuotaHub::size() const {
  absl::MutexLock lock(&mu_);
  return latest_.size();
}

size_t QuotaHub::subscribers() const {
  absl::MutexLock lock(&mu_);
  return subscribers_.size();
}

}  // namespace tokenbroker
