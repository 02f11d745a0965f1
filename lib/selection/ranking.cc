#include "lib/selection/ranking.h"

namespace tokenbroker {

int DecisionRank(QuotaDecision d) {
  switch (d) {
    case QuotaDecision::kProceed: return 2;
    case QuotaDecision::kUnknown: return 1;
    case QuotaDecision::kLow: return 0;
    case QuotaDecision::kExhausted: break;
  }
  return -1;
}

bool Better(const RankKey& a, const RankKey& b, Policy policy) {
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.decision != b.decision) return a.decision > b.decision;
  auto balance = [&] {
    if (a.fraction != b.fraction) return a.fraction > b.fraction;
    if (a.in_flight != b.in_flight) return a.in_flight < b.in_flight;
    if (a.last_used != b.last_used) return a.last_used < b.last_used;
    return a.index < b.index;
  };
  switch (policy) {
    case Policy::kBalance: return balance();
    case Policy::kFillFirst:
      if (a.sticky != b.sticky) return a.sticky;
      return a.index < b.index;
    case Policy::kResetSoonest:
      if (a.reset != b.reset) return a.reset < b.reset;
      return balance();
    case Policy::kRoundRobin:
      if (a.rotation != b.rotation) return a.rotation < b.rotation;
      return a.index < b.index;
  }
  return a.index < b.index;
}

RankKey MakeRankKey(size_t index, const std::string& id, Tier tier, const QuotaView& quota, int in_flight,
                    absl::Time last_used, const RankContext& ctx) {
  RankKey k;
  k.index = index;
  k.tier = static_cast<int>(tier);
  k.decision = DecisionRank(quota.decision);
  if (quota.fraction) {
    k.fraction = *quota.fraction;
    if (quota.reset_time) k.reset = *quota.reset_time;
  }
  k.in_flight = in_flight;
  k.last_used = last_used;
  return WithContext(k, id, ctx);
}

RankKey WithContext(RankKey key, const std::string& id, const RankContext& ctx) {
  const size_t n = ctx.pool_size;
  key.rotation = ctx.cursor == n ? key.index : (key.index + n - ctx.cursor - 1) % n;
  key.sticky = ctx.sticky != nullptr && *ctx.sticky == id;
  return key;
}

}  // namespace tokenbroker
