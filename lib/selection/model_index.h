#pragma once

#include <cstddef>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "absl/time/time.h"
#include "lib/selection/ranking.h"

namespace tokenbroker {

// Every account of the pool ordered by its rank for one model (Better, on keys made without a
// request context), so a selection walks from the best and stops at the first eligible account
// instead of scanning the pool. Also remembers when each account's rank changes by itself (a
// quota reading turning stale, a quota resetting): one pending change per account. Not
// thread-safe (the pool's lock guards it).
class ModelIndex {
 public:
  using Order = std::set<RankKey, RankLess>;

  ModelIndex(Policy policy, size_t pool_size);

  // Places account `i` at `key`; `next_change` is when its rank changes by itself (ignored unless
  // after `now` and finite).
  void Update(size_t i, const RankKey& key, absl::Time next_change, absl::Time now);
  // An account whose scheduled change is due at `now`, removed from the schedule; unset when none.
  std::optional<size_t> PopDue(absl::Time now);

  const Order& order() const { return order_; }
  const RankKey& key_of(size_t i) const { return key_of_[i]; }

 private:
  Order order_;
  std::vector<RankKey> key_of_;                 // by account position
  std::vector<bool> placed_;                    // by account position: in order_
  std::multimap<absl::Time, size_t> changes_;  // when an account's rank changes by itself
  std::vector<absl::Time> scheduled_;           // by account position: its latest entry in changes_
};

}  // namespace tokenbroker
