#pragma once

#include <cstddef>
#include <string>

#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/quota/quota_book.h"
#include "lib/selection/policy.h"

namespace tokenbroker {

// What ranks an eligible account for one request: computed once per account, compared many times.
struct RankKey {
  int tier = 0;
  int decision = 0;
  double fraction = -1;  // -1: unknown
  int in_flight = 0;
  absl::Time last_used;
  absl::Time reset = absl::InfiniteFuture();
  size_t rotation = 0;  // round robin: distance after the account last chosen for the model
  bool sticky = false;  // fill_first: the account last chosen for the model
  size_t index = 0;
};

// What ranking needs once per request rather than once per account: the account last chosen for
// the model (fill_first's sticky choice) and its position (round_robin's cursor). Without one
// (`cursor` == pool size), rotation is the position itself.
struct RankContext {
  const std::string* sticky = nullptr;
  size_t cursor = 0;
  size_t pool_size = 0;
};

// The one ranking rule (docs/ARCHITECTURE.md §4): whether `a` ranks before `b` under `policy` —
// tier, then quota decision, then the policy's order.
bool Better(const RankKey& a, const RankKey& b, Policy policy);

// Orders keys by Better: the per-model index's order (keys made without a context, so round_robin's
// rotation is the position and fill_first has no sticky account).
struct RankLess {
  Policy policy;
  bool operator()(const RankKey& a, const RankKey& b) const { return Better(a, b, policy); }
};

// How a quota decision ranks: PROCEED, then UNKNOWN, then LOW (EXHAUSTED is never eligible).
int DecisionRank(QuotaDecision d);

// `key` (of the account `id`) with the request context's part filled in: rotation and sticky.
RankKey WithContext(RankKey key, const std::string& id, const RankContext& ctx);

// The key of the account at position `index` for one request.
RankKey MakeRankKey(size_t index, const std::string& id, Tier tier, const QuotaView& quota, int in_flight,
                    absl::Time last_used, const RankContext& ctx);

}  // namespace tokenbroker
