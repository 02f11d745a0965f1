#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "lib/common/errors.h"
#include "lib/selection/account_pool.h"

// Choosing an account: the fast path over the per-model index and the full evaluation (Explain, and
// the reasons when nothing is eligible). The rules are CheckEligibility (eligibility.h) and Better
// (ranking.h); this file only applies them.

namespace tokenbroker {
namespace {

absl::string_view VerdictCountName(Verdict v) {
  switch (v) {
    case Verdict::kSuspended: return "suspended";
    case Verdict::kDisabled: return "disabled";
    case Verdict::kProxyDisabled: return "proxy-disabled";
    case Verdict::kProtected: return "protected for this model";
    case Verdict::kCooldown: return "cooling down";
    case Verdict::kExhausted: return "out of quota";
    case Verdict::kLeaseCap: return "at their lease cap";
    case Verdict::kRotatedAway: return "excluded";
    case Verdict::kCallerShare: return "outside the caller's share";
    case Verdict::kChosen:
    case Verdict::kRankedLower: break;
  }
  return "eligible";
}

}  // namespace

std::optional<std::string> AccountPool::PreviousFor(const SelectRequest& request,
                                                    const std::optional<std::string>& bound) const {
  if (!request.session_id.empty()) return bound;
  auto it = last_for_model_.find(request.model);
  if (it == last_for_model_.end()) return std::nullopt;
  return it->second;
}

EligibilityContext AccountPool::ContextFor(const SelectRequest& request, const std::optional<std::string>& previous,
                                           absl::Time now) const {
  return EligibilityContext{request, previous, cooldowns_, quota_, leases_, options_.max_inflight_per_account, now,
                            quota_.families().Of(request.model)};
}

Eligibility AccountPool::CheckLocked(size_t i, const EligibilityContext& ctx, bool explain) const {
  const Entry& e = entries_[i];
  return CheckEligibility(AccountSnapshot{e.record, e.quota, e.in_flight}, ctx, explain);
}

RankContext AccountPool::RankContextFor(const SelectRequest& request) const {
  RankContext ctx;
  ctx.pool_size = entries_.size();
  ctx.cursor = entries_.size();
  if (auto last = last_for_model_.find(request.model); last != last_for_model_.end()) {
    ctx.sticky = &last->second;
    if (auto pos = index_.find(last->second); pos != index_.end()) ctx.cursor = pos->second;
  }
  return ctx;
}

RankKey AccountPool::KeyFor(size_t i, const std::string& model, absl::Time now, const RankContext& ctx) const {
  const Entry& e = entries_[i];
  return MakeRankKey(i, e.record.id, e.record.tier, quota_.View(e.record, e.quota, model, now), e.in_flight,
                     e.last_used, ctx);
}

AccountPool::Evaluation AccountPool::Evaluate(const SelectRequest& request, absl::Time now,
                                              const std::optional<std::string>& bound) const {
  Evaluation ev;
  ev.verdicts.resize(entries_.size());
  const std::optional<std::string> previous = PreviousFor(request, bound);
  const EligibilityContext ctx = ContextFor(request, previous, now);
  std::optional<size_t> rotated_away;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const AccountRecord& rec = entries_[i].record;
    Eligibility e = CheckLocked(i, ctx, /*explain=*/true);
    AccountVerdict& v = ev.verdicts[i];
    v.account_id = rec.id;
    v.email = rec.email;
    v.tier = rec.tier;
    v.verdict = e.verdict;
    v.detail = std::move(e.detail);
    v.available_at = e.available_at;
    if (e.eligible()) ev.ranked.push_back(i);
    if (e.rotated_from) rotated_away = i;
  }

  std::vector<RankKey> keys(entries_.size());
  const RankContext rank_ctx = RankContextFor(request);
  for (size_t i : ev.ranked) keys[i] = KeyFor(i, request.model, now, rank_ctx);
  std::sort(ev.ranked.begin(), ev.ranked.end(),
            [&](size_t a, size_t b) { return Better(keys[a], keys[b], options_.policy); });

  if (!request.force_rotate && bound) {
    if (auto it = index_.find(*bound); it != index_.end()) {
      auto pos = std::find(ev.ranked.begin(), ev.ranked.end(), it->second);
      if (pos != ev.ranked.end()) {
        std::rotate(ev.ranked.begin(), pos, pos + 1);
        ev.from_session = true;
      }
    }
  }
  if (!ev.ranked.empty()) {
    ev.chosen = ev.ranked.front();
  } else if (rotated_away) {
    // force_rotate with no alternative: the previous account is still better than no answer.
    ev.chosen = rotated_away;
    ev.ranked.push_back(*rotated_away);
    ev.verdicts[*rotated_away].detail = "force_rotate found no other eligible account";
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    const QuotaView qv = quota_.View(entries_[i].record, entries_[i].quota, request.model, now);
    if (!qv.fresh) continue;
    ev.verdicts[i].observed_fraction = qv.estimate.observed;
    ev.verdicts[i].estimated_fraction = qv.estimate.estimated;
    ev.verdicts[i].binding_quota = std::string(qv.cost_key);
  }
  for (size_t r = 0; r < ev.ranked.size(); ++r) {
    AccountVerdict& v = ev.verdicts[ev.ranked[r]];
    v.rank = static_cast<int>(r + 1);
    if (r == 0) {
      v.verdict = Verdict::kChosen;
      if (v.detail.empty()) v.detail = ev.from_session ? "bound to the session" : "best ranked";
    } else {
      v.verdict = Verdict::kRankedLower;
      const RankKey& top = keys[ev.ranked[0]];
      const RankKey& mine = keys[ev.ranked[r]];
      if (mine.tier < top.tier) {
        v.detail = absl::StrCat("lower tier than ", TierName(entries_[ev.ranked[0]].record.tier));
      } else if (mine.decision < top.decision) {
        const QuotaDecision d = quota_.View(entries_[ev.ranked[r]].record, entries_[ev.ranked[r]].quota, request.model, now).decision;
        v.detail = absl::StrCat("quota ", QuotaDecisionName(d), " for ", request.model);
      } else {
        v.detail = absl::StrCat("ranked lower by ", PolicyName(options_.policy));
      }
    }
  }
  return ev;
}

void AccountPool::ReindexOne(ModelIndex& index, const std::string& model, size_t i, absl::Time now) {
  // Keys without a request context: round_robin's rotation is the position, no sticky account.
  const RankKey key = KeyFor(i, model, now, RankContext{nullptr, entries_.size(), entries_.size()});
  index.Update(i, key, quota_.NextChange(entries_[i].record, model, now), now);
}

ModelIndex* AccountPool::IndexFor(const std::string& model, absl::Time now) {
  auto it = model_index_.find(model);
  if (it == model_index_.end()) {
    if (model_index_.size() >= kMaxIndexedModels) return nullptr;
    auto index = std::make_unique<ModelIndex>(options_.policy, entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) ReindexOne(*index, model, i, now);
    it = model_index_.emplace(model, std::move(index)).first;
  }
  ModelIndex& index = *it->second;
  while (std::optional<size_t> due = index.PopDue(now)) ReindexOne(index, model, *due, now);
  return &index;
}

void AccountPool::ReindexLocked(size_t i, absl::Time now) {
  for (auto& [model, index] : model_index_) ReindexOne(*index, model, i, now);
}

std::optional<size_t> AccountPool::ChooseFastLocked(const SelectRequest& request, absl::Time now,
                                                    const std::optional<std::string>& bound, bool* from_session) {
  const std::optional<std::string> previous = PreviousFor(request, bound);
  const EligibilityContext ctx = ContextFor(request, previous, now);
  auto eligible = [&](size_t i) ABSL_SHARED_LOCKS_REQUIRED(mu_) { return CheckLocked(i, ctx, false).eligible(); };
  // A bound, eligible account is the answer: one check, no scan.
  if (bound && !request.force_rotate) {
    if (auto it = index_.find(*bound); it != index_.end() && eligible(it->second)) {
      *from_session = true;
      return it->second;
    }
  }
  ModelIndex* index = IndexFor(request.model, now);
  if (index == nullptr) {  // past kMaxIndexedModels: one pass over the pool
    std::optional<size_t> best;
    RankKey best_key;
    const RankContext rank_ctx = RankContextFor(request);
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (!eligible(i)) continue;
      RankKey key = KeyFor(i, request.model, now, rank_ctx);
      if (!best || Better(key, best_key, options_.policy)) {
        best = i;
        best_key = key;
      }
    }
    return best;
  }
  std::optional<size_t> best;
  for (const RankKey& key : index->order()) {
    if (eligible(key.index)) {
      best = key.index;
      break;
    }
  }
  if (!best || (options_.policy != Policy::kRoundRobin && options_.policy != Policy::kFillFirst)) return best;
  // The index ranks without the request's context: the one account the context can promote within
  // the best (tier, decision) class — round_robin's first eligible after the cursor, fill_first's
  // last choice — is ranked against the index's best with the context, by the same rule.
  const RankContext rank_ctx = RankContextFor(request);
  const RankKey& first = index->key_of(*best);
  std::optional<size_t> challenger;
  if (options_.policy == Policy::kRoundRobin && rank_ctx.cursor < entries_.size() && rank_ctx.cursor >= *best) {
    RankKey probe = first;
    probe.index = probe.rotation = rank_ctx.cursor + 1;
    for (auto it = index->order().lower_bound(probe);
         it != index->order().end() && it->tier == first.tier && it->decision == first.decision; ++it) {
      if (eligible(it->index)) {
        challenger = it->index;
        break;
      }
    }
  } else if (options_.policy == Policy::kFillFirst && rank_ctx.sticky != nullptr) {
    if (auto pos = index_.find(*rank_ctx.sticky); pos != index_.end() && pos->second != *best) {
      const RankKey& s = index->key_of(pos->second);
      if (s.tier == first.tier && s.decision == first.decision && eligible(pos->second)) challenger = pos->second;
    }
  }
  auto key = [&](size_t i) ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return WithContext(index->key_of(i), entries_[i].record.id, rank_ctx);
  };
  if (challenger && Better(key(*challenger), key(*best), options_.policy)) {
    return challenger;
  }
  return best;
}

absl::Status AccountPool::NoAccountError(const Evaluation& ev, const SelectRequest& request, absl::Time now) const {
  std::optional<absl::Time> earliest;
  for (const AccountVerdict& v : ev.verdicts) {
    if (v.available_at && (!earliest || *v.available_at < *earliest)) earliest = v.available_at;
  }
  std::map<absl::string_view, int> counts;
  for (const AccountVerdict& v : ev.verdicts) ++counts[VerdictCountName(v.verdict)];
  std::vector<std::string> parts;
  for (const auto& [name, count] : counts) parts.push_back(absl::StrCat(count, " ", name));
  std::optional<absl::Duration> retry;
  std::string when = "; none will free by itself";
  if (earliest) {
    retry = std::max(absl::ZeroDuration(), *earliest - now);
    when = absl::StrCat("; the earliest frees in ", absl::FormatDuration(absl::Ceil(*retry, absl::Milliseconds(1))),
                        " (", FormatTimestamp(*earliest), ")");
  }
  return NoAccountAvailableError(
      absl::StrCat("no account can serve model ", request.model, " now: ", absl::StrJoin(parts, ", "), when),
      request.model, retry);
}

}  // namespace tokenbroker
