#include "lib/selection/model_index.h"

namespace tokenbroker {

ModelIndex::ModelIndex(Policy policy, size_t pool_size)
    : order_(RankLess{policy}),
      key_of_(pool_size),
      placed_(pool_size, false),
      scheduled_(pool_size, absl::InfinitePast()) {}

void ModelIndex::Update(size_t i, const RankKey& key, absl::Time next_change, absl::Time now) {
  if (placed_[i]) {
    // Every lease re-ranks its account: move the set's node to its new place instead of freeing
    // it and allocating another.
    Order::node_type node = order_.extract(key_of_[i]);
    if (node.empty()) {
      order_.insert(key);
    } else {
      node.value() = key;
      order_.insert(std::move(node));
    }
    key_of_[i] = key;
  } else {
    key_of_[i] = key;
    order_.insert(key);
    placed_[i] = true;
  }
  // Re-ranking on every lease schedules nothing new.
  if (next_change > now && next_change != absl::InfiniteFuture() && scheduled_[i] != next_change) {
    scheduled_[i] = next_change;
    changes_.emplace(next_change, i);
  }
}

std::optional<size_t> ModelIndex::PopDue(absl::Time now) {
  if (changes_.empty() || changes_.begin()->first > now) return std::nullopt;
  const size_t i = changes_.begin()->second;
  changes_.erase(changes_.begin());
  return i;
}

}  // namespace tokenbroker
