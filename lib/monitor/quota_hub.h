#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "lib/quota/quota.h"

namespace tokenbroker {

// The monitor's latest quota state, fanned out to any number of subscribers. Each subscriber
// holds a set of changed keys, not a queue: one that reads slowly gets the latest state per
// (account, model or bucket), coalesced, and costs at most one entry per key however long it stalls.
// Thread-safe.
class QuotaHub {
 public:
  // Called (with no hub lock held) when a subscriber goes from nothing pending to something.
  using Wakeup = std::function<void()>;

  // Stores the observations as the latest state and marks them pending for every subscriber
  // whose filter matches.
  void Publish(const std::vector<QuotaObservation>& observations);

  // A new subscriber: its first Take returns the full snapshot. An empty filter means all accounts.
  int64_t Subscribe(absl::flat_hash_set<std::string> account_filter, Wakeup wakeup);
  void Unsubscribe(int64_t id);

  struct Batch {
    bool snapshot = false;  // the first batch of this subscriber
    std::vector<QuotaObservation> observations;
  };
  // Takes what is pending for the subscriber (everything, the first time) and clears it.
  Batch Take(int64_t id);

  size_t PendingFor(int64_t id) const;
  // The most any subscriber has pending: what the slowest reader costs, bounded by size().
  size_t MaxPending() const;
  size_t size() const;
  size_t subscribers() const;

 private:
  struct Subscriber {
    absl::flat_hash_set<std::string> filter;
    Wakeup wakeup;
    bool snapshot_taken = false;
    absl::flat_hash_set<std::string> pending;  // keys
  };
  static std::string Key(const QuotaObservation& o) { return o.account_id + '\n' + o.model + '\n' + o.bucket; }

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, QuotaObservation> latest_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int64_t, Subscriber> subscribers_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace tokenbroker
