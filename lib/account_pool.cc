#include "lib/account_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/status/status.h"
#include "lib/errors.h"
#include "lib/safe_text.h"

namespace tokenbroker {

absl::StatusOr<Policy> ParsePolicy(absl::string_view name) {
  if (name == "balance") return Policy::kBalance;
  if (name == "fill_first") return Policy::kFillFirst;
  if (name == "reset_soonest") return Policy::kResetSoonest;
  if (name == "round_robin") return Policy::kRoundRobin;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy '", name, "'; use one of balance, fill_first, reset_soonest, round_robin"));
}

absl::string_view PolicyName(Policy policy) {
  switch (policy) {
    case Policy::kBalance: return "balance";
    case Policy::kFillFirst: return "fill_first";
    case Policy::kResetSoonest: return "reset_soonest";
    case Policy::kRoundRobin: return "round_robin";
  }
  return "balance";
}

namespace {

std::string FormatTimestamp(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone());
}

const ModelQuota* QuotaFor(const AccountRecord& rec, const std::string& model) {
  for (const ModelQuota& q : rec.quotas) {
    if (q.model == model) return &q;
  }
  return nullptr;
}

bool IsProtected(const AccountRecord& rec, const std::string& model) {
  return std::find(rec.protected_models.begin(), rec.protected_models.end(), model) !=
         rec.protected_models.end();
}

absl::string_view VerdictCountName(Verdict v) {
  switch (v) {
    case Verdict::kDisabled: return "disabled";
    case Verdict::kProxyDisabled: return "proxy-disabled";
    case Verdict::kProtected: return "protected for this model";
    case Verdict::kCooldown: return "cooling down";
    case Verdict::kExhausted: return "out of quota";
    case Verdict::kLeaseCap: return "at their lease cap";
    case Verdict::kRotatedAway: return "excluded";
    case Verdict::kChosen:
    case Verdict::kRankedLower: break;
  }
  return "eligible";
}

bool Forbidden(const AccountRecord& rec, const QuotaSettings& quota, absl::Time now) {
  return quota.enabled && rec.quota_forbidden && now - rec.quota_forbidden_observed <= quota.cache_ttl;
}

int DecisionRank(QuotaDecision d) {
  switch (d) {
    case QuotaDecision::kProceed: return 2;
    case QuotaDecision::kUnknown: return 1;
    case QuotaDecision::kLow: return 0;
    case QuotaDecision::kExhausted: break;
  }
  return -1;
}

}  // namespace


namespace {

// Whether `a` ranks before `b` under `policy` (docs/ARCHITECTURE.md §4): tier, then quota decision, then policy.
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
    case Policy::kRoundRobin: return a.rotation < b.rotation;
  }
  return a.index < b.index;
}

}  // namespace

struct AccountPool::Evaluation {
  std::vector<AccountVerdict> verdicts;  // parallel to entries_
  std::vector<size_t> ranked;            // eligible entries, best first (chosen first)
  std::optional<size_t> chosen;
  bool from_session = false;
};

AccountPool::AccountPool(PoolOptions options, const Clock& clock)
    : options_(options),
      clock_(clock),
      sessions_(options.session_idle_ttl, options.max_sessions),
      cooldowns_(options.cooldowns),
      leases_(options.lease_timeout) {}

void AccountPool::Load(std::vector<AccountRecord> records) {
  std::sort(records.begin(), records.end(),
            [](const AccountRecord& a, const AccountRecord& b) { return a.id < b.id; });
  absl::MutexLock lock(&mu_);
  std::vector<Entry> next;
  next.reserve(records.size());
  for (AccountRecord& rec : records) {
    Entry entry;
    if (auto it = index_.find(rec.id); it != index_.end()) {
      const Entry& old = entries_[it->second];
      entry.last_used = old.last_used;
      entry.in_flight = old.in_flight;
      entry.usage = old.usage;
      entry.marks = old.marks;
      // A token refreshed in memory is newer than what an unwritable file still holds.
      if (old.record.access_expiry > rec.access_expiry && old.record.refresh_token == rec.refresh_token) {
        rec.access_token = old.record.access_token;
        rec.access_expiry = old.record.access_expiry;
      }
      // Quota the monitor observed after the file was written is newer than the file's.
      for (const ModelQuota& q : old.record.quotas) {
        auto mine = std::find_if(rec.quotas.begin(), rec.quotas.end(),
                                 [&](const ModelQuota& f) { return f.model == q.model; });
        if (mine == rec.quotas.end()) {
          rec.quotas.push_back(q);
        } else if (q.observed > mine->observed) {
          *mine = q;
        }
      }
      rec.buckets = old.record.buckets;  // only the monitor knows them
      if (old.record.quota_forbidden_observed > rec.quota_forbidden_observed) {
        rec.quota_forbidden = old.record.quota_forbidden;
        rec.quota_forbidden_observed = old.record.quota_forbidden_observed;
      }
      if (rec.tier == Tier::kUnknown) rec.tier = old.record.tier;
      if (rec.project_id.empty()) rec.project_id = old.record.project_id;
      // A disable decided at run time stands even if the file could not record it.
      if (old.record.disabled && !rec.disabled) {
        rec.disabled = true;
        rec.disabled_reason = old.record.disabled_reason;
      }
    }
    entry.record = std::move(rec);
    next.push_back(std::move(entry));
  }
  for (const Entry& old : entries_) {
    bool kept = std::binary_search(next.begin(), next.end(), old, [](const Entry& a, const Entry& b) {
      return a.record.id < b.record.id;
    });
    if (!kept) {
      cooldowns_.Forget(old.record.id);
      leases_.Forget(old.record.id);
    }
  }
  entries_ = std::move(next);
  model_index_.clear();  // positions changed; rebuilt on next use
  index_.clear();
  for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].record.id] = i;
}

size_t AccountPool::size() const {
  absl::ReaderMutexLock lock(&mu_);
  return entries_.size();
}

size_t AccountPool::UsableCount() const {
  absl::ReaderMutexLock lock(&mu_);
  return static_cast<size_t>(std::count_if(entries_.begin(), entries_.end(), [](const Entry& e) {
    return !e.record.disabled && !e.record.proxy_disabled;
  }));
}

std::optional<std::string> AccountPool::PreviousFor(const SelectRequest& request,
                                                    const std::optional<std::string>& bound) const {
  if (!request.session_id.empty()) return bound;
  auto it = last_for_model_.find(request.model);
  if (it == last_for_model_.end()) return std::nullopt;
  return it->second;
}

AccountPool::Evaluation AccountPool::Evaluate(const SelectRequest& request, absl::Time now,
                                              const std::optional<std::string>& bound) const {
  Evaluation ev;
  ev.verdicts.resize(entries_.size());
  const std::optional<std::string> previous = PreviousFor(request, bound);
  std::optional<size_t> rotated_away;

  for (size_t i = 0; i < entries_.size(); ++i) {
    const AccountRecord& rec = entries_[i].record;
    AccountVerdict& v = ev.verdicts[i];
    v.account_id = rec.id;
    v.email = rec.email;
    v.tier = rec.tier;
    if (rec.disabled) {
      v.verdict = Verdict::kDisabled;
      v.detail = rec.disabled_reason.empty() ? "disabled" : absl::StrCat("disabled: ", rec.disabled_reason);
    } else if (rec.proxy_disabled) {
      v.verdict = Verdict::kProxyDisabled;
      v.detail = "proxy_disabled is set in its account file";
    } else if (IsProtected(rec, request.model)) {
      v.verdict = Verdict::kProtected;
      v.detail = absl::StrCat("model ", request.model, " is in its protected_models");
    } else if (std::optional<CooldownBlock> block = cooldowns_.Check(rec.id, request.model, now)) {
      v.verdict = Verdict::kCooldown;
      v.available_at = block->until;
      v.detail = block->probe_in_flight
                     ? absl::StrCat(block->reason, " until ", FormatTimestamp(block->until))
                     : absl::StrCat(block->scope == CooldownScope::kAccount ? "account" : "model",
                                    " cooling down until ", FormatTimestamp(block->until), " (",
                                    block->reason, ")");
    } else if (options_.max_inflight_per_account > 0 &&
               entries_[i].in_flight >= options_.max_inflight_per_account) {
      v.verdict = Verdict::kLeaseCap;
      v.available_at = leases_.EarliestExpiry(rec.id);
      v.detail = absl::StrCat(entries_[i].in_flight, " leases in flight (cap ",
                              options_.max_inflight_per_account, ")");
    } else if (ExhaustedLocked(i, request.model, now)) {
      v.verdict = Verdict::kExhausted;
      if (Forbidden(rec, quota_, now)) {
        v.detail = "the quota API answers 403 for this account (forbidden)";
      } else {
        const QuotaView qv = QuotaViewLocked(i, request.model, now);
        v.detail = absl::StrCat("quota for ", request.model, " estimated at ", qv.estimate.estimated, " (observed ",
                                qv.estimate.observed, qv.estimate.reset_passed ? " at its reset" : "", ", ",
                                qv.estimate.leases, " leases since at ", qv.estimate.cost, " each",
                                qv.estimate.cost_learned ? "" : " (prior)", "), below exhausted_threshold ",
                                quota_.exhausted_threshold);
        if (qv.cost_key != ModelFamily(request.model)) absl::StrAppend(&v.detail, "; bucket ", qv.cost_key);
        if (qv.reset_time) {
          v.available_at = *qv.reset_time;
          absl::StrAppend(&v.detail, "; resets at ", FormatTimestamp(*qv.reset_time));
        }
      }
    } else if (request.exclude.contains(rec.id)) {
      v.verdict = Verdict::kRotatedAway;
      v.detail = "excluded for this request (its token could not be refreshed)";
    } else if (request.force_rotate && previous && *previous == rec.id) {
      v.verdict = Verdict::kRotatedAway;
      v.detail = "force_rotate moves away from the account last used";
      rotated_away = i;
    } else {
      v.verdict = Verdict::kRankedLower;
      ev.ranked.push_back(i);
    }
  }

  std::vector<RankKey> keys(entries_.size());
  const RankContext ctx = RankContextFor(request);
  for (size_t i : ev.ranked) keys[i] = KeyFor(i, request.model, now, ctx);
  auto better = [&](size_t a, size_t b) { return Better(keys[a], keys[b], options_.policy); };
  std::sort(ev.ranked.begin(), ev.ranked.end(), better);

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
    const QuotaView qv = QuotaViewLocked(i, request.model, now);
    if (!qv.fresh) continue;
    ev.verdicts[i].observed_fraction = qv.estimate.observed;
    ev.verdicts[i].estimated_fraction = qv.estimate.estimated;
  }
  for (size_t r = 0; r < ev.ranked.size(); ++r) {
    AccountVerdict& v = ev.verdicts[ev.ranked[r]];
    v.rank = static_cast<int>(r + 1);
    if (r == 0) {
      v.verdict = Verdict::kChosen;
      if (v.detail.empty()) v.detail = ev.from_session ? "bound to the session" : "best ranked";
    } else {
      v.verdict = Verdict::kRankedLower;
      const AccountRecord& top = entries_[ev.ranked[0]].record;
      const AccountRecord& mine = entries_[ev.ranked[r]].record;
      const QuotaDecision my_decision = QuotaViewLocked(ev.ranked[r], request.model, now).decision;
      if (mine.tier < top.tier) {
        v.detail = absl::StrCat("lower tier than ", TierName(top.tier));
      } else if (DecisionRank(my_decision) < DecisionRank(QuotaViewLocked(ev.ranked[0], request.model, now).decision)) {
        v.detail = absl::StrCat("quota ", QuotaDecisionName(my_decision), " for ", request.model);
      } else {
        v.detail = absl::StrCat("ranked lower by ", PolicyName(options_.policy));
      }
    }
  }
  return ev;
}

AccountPool::RankContext AccountPool::RankContextFor(const SelectRequest& request) const {
  RankContext ctx;
  ctx.cursor = entries_.size();
  if (auto last = last_for_model_.find(request.model); last != last_for_model_.end()) {
    ctx.sticky = &last->second;
    if (auto pos = index_.find(last->second); pos != index_.end()) ctx.cursor = pos->second;
  }
  return ctx;
}

RankKey AccountPool::KeyFor(size_t i, const std::string& model, absl::Time now, const RankContext& ctx) const {
  const Entry& e = entries_[i];
  RankKey k;
  k.index = i;
  k.tier = static_cast<int>(e.record.tier);
  const QuotaView qv = QuotaViewLocked(i, model, now);
  k.decision = DecisionRank(qv.decision);
  if (qv.fraction) {
    k.fraction = *qv.fraction;
    if (qv.reset_time) k.reset = *qv.reset_time;
  }
  k.in_flight = e.in_flight;
  k.last_used = e.last_used;
  const size_t n = entries_.size();
  k.rotation = ctx.cursor == n ? i : (i + n - ctx.cursor - 1) % n;
  k.sticky = ctx.sticky != nullptr && *ctx.sticky == e.record.id;
  return k;
}

bool AccountPool::EligibleLocked(size_t i, const SelectRequest& request, absl::Time now,
                                 const std::optional<std::string>& previous) const {
  const Entry& e = entries_[i];
  const AccountRecord& rec = e.record;
  if (rec.disabled || rec.proxy_disabled || IsProtected(rec, request.model)) return false;
  if (cooldowns_.Check(rec.id, request.model, now)) return false;
  if (options_.max_inflight_per_account > 0 && e.in_flight >= options_.max_inflight_per_account) return false;
  if (ExhaustedLocked(i, request.model, now)) return false;
  if (!request.exclude.empty() && request.exclude.contains(rec.id)) return false;
  if (request.force_rotate && previous && *previous == rec.id) return false;
  return true;
}

bool AccountPool::KeyLess::operator()(const RankKey& a, const RankKey& b) const {
  if (policy != Policy::kRoundRobin) return Better(a, b, policy);
  // round_robin's rotation depends on the cursor, so the index holds the id order within each
  // (tier, decision) class and the walk starts after the cursor.
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.decision != b.decision) return a.decision > b.decision;
  return a.index < b.index;
}

void AccountPool::ReindexOne(ModelIndex& index, const std::string& model, size_t i, absl::Time now) {
  index.order.erase(index.key_of[i]);
  RankKey key = KeyFor(i, model, now, RankContext{nullptr, entries_.size()});
  key.rotation = 0;  // not part of an indexed rank (round_robin is not indexed)
  index.key_of[i] = key;
  index.order.insert(key);
  // When the rank changes by itself: a reading of the model's family turning stale, or a quota
  // resetting. One pending change per account: re-ranking on every lease schedules nothing new.
  if (!quota_.enabled) return;
  absl::Time when = absl::InfiniteFuture();
  const absl::Duration ttl = quota_.cache_ttl;
  auto consider = [&](absl::Time observed, const std::optional<absl::Time>& reset) {
    when = std::min(when, observed + ttl + absl::Nanoseconds(1));
    if (reset && *reset > now) when = std::min(when, *reset);
  };
  const AccountRecord& rec = entries_[i].record;
  if (const ModelQuota* q = QuotaFor(rec, model)) consider(q->observed, q->reset_time);
  const absl::string_view family = ModelFamily(model);
  for (const BucketQuota& b : rec.buckets) {
    if (b.family == family) consider(b.observed, b.reset_time);
  }
  if (when > now && when != absl::InfiniteFuture() && index.scheduled[i] != when) {
    index.scheduled[i] = when;
    index.changes.emplace(when, i);
  }
}

AccountPool::ModelIndex* AccountPool::IndexFor(const std::string& model, absl::Time now) {
  auto it = model_index_.find(model);
  if (it == model_index_.end()) {
    if (model_index_.size() >= kMaxIndexedModels) return nullptr;
    auto index = std::make_unique<ModelIndex>(options_.policy);
    index->key_of.resize(entries_.size());
    index->scheduled.assign(entries_.size(), absl::InfinitePast());
    for (size_t i = 0; i < entries_.size(); ++i) {
      index->key_of[i].index = i;
      index->key_of[i].tier = -1;  // a key not in the set: the first erase finds nothing
      ReindexOne(*index, model, i, now);
    }
    it = model_index_.emplace(model, std::move(index)).first;
  }
  ModelIndex& index = *it->second;
  while (!index.changes.empty() && index.changes.begin()->first <= now) {
    const size_t i = index.changes.begin()->second;
    index.changes.erase(index.changes.begin());
    ReindexOne(index, model, i, now);
  }
  return &index;
}

void AccountPool::ReindexLocked(size_t i, absl::Time now) {
  for (auto& [model, index] : model_index_) ReindexOne(*index, model, i, now);
}

std::optional<size_t> AccountPool::ChooseFastLocked(const SelectRequest& request, absl::Time now,
                                                    const std::optional<std::string>& bound,
                                                    bool* from_session) {
  const std::optional<std::string> previous = PreviousFor(request, bound);
  // A bound, eligible account is the answer: one check, no scan.
  if (bound && !request.force_rotate) {
    if (auto it = index_.find(*bound); it != index_.end() && EligibleLocked(it->second, request, now, previous)) {
      *from_session = true;
      return it->second;
    }
  }
  if (ModelIndex* index = IndexFor(request.model, now)) {
    std::optional<size_t> best;
    for (const RankKey& key : index->order) {
      if (EligibleLocked(key.index, request, now, previous)) {
        best = key.index;
        break;
      }
    }
    if (best && options_.policy == Policy::kRoundRobin) {
      // Within the best class, the first eligible account after the cursor, wrapping around.
      const RankKey& first = index->key_of[*best];
      const RankContext ctx = RankContextFor(request);
      if (ctx.cursor < entries_.size() && ctx.cursor >= *best) {
        RankKey probe = first;
        probe.index = ctx.cursor + 1;
        for (auto it = index->order.lower_bound(probe);
             it != index->order.end() && it->tier == first.tier && it->decision == first.decision; ++it) {
          if (EligibleLocked(it->index, request, now, previous)) return it->index;
        }
      }
    }
    // fill_first: the account last chosen for the model wins within the best (tier, decision).
    if (best && options_.policy == Policy::kFillFirst) {
      if (auto last = last_for_model_.find(request.model); last != last_for_model_.end()) {
        if (auto pos = index_.find(last->second);
            pos != index_.end() && pos->second != *best && EligibleLocked(pos->second, request, now, previous)) {
          const RankKey& s = index->key_of[pos->second];
          const RankKey& b = index->key_of[*best];
          if (s.tier == b.tier && s.decision == b.decision) best = pos->second;
        }
      }
    }
    return best;
  }
  std::optional<size_t> best;
  RankKey best_key;
  const RankContext ctx = RankContextFor(request);
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (!EligibleLocked(i, request, now, previous)) continue;
    RankKey key = KeyFor(i, request.model, now, ctx);
    if (!best || Better(key, best_key, options_.policy)) {
      best = i;
      best_key = key;
    }
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

absl::StatusOr<Selection> AccountPool::Select(const SelectRequest& request) {
  SharedState* shared = shared_state();
  if (shared == nullptr || request.session_id.empty()) return SelectOnce(request, nullptr);
  // A session shared by replicas: a binding made here is claimed in the shared state first, and
  // when another replica's claim came first, that account is used (when it is eligible here).
  SelectRequest req = request;
  for (int attempt = 0; attempt < 3 && shared->Up(); ++attempt) {
    Claim claim;
    absl::StatusOr<Selection> sel = SelectOnce(req, &claim);
    if (!sel.ok() || !claim.needed) return sel;
    std::optional<std::string> winner = shared->ClaimSession(req.session_id, claim.expected, claim.candidate);
    if (!winner) break;  // the shared state is unreachable: decide here
    {
      absl::MutexLock lock(&mu_);
      if (index_.contains(*winner)) sessions_.Bind(req.session_id, *winner, clock_.Now());
      if (*winner == claim.candidate) ++rebinds_[claim.reason];
    }
    // The session has moved (here or elsewhere): rotating again would move it twice.
    req.force_rotate = false;
  }
  return SelectOnce(req, nullptr);
}

absl::StatusOr<Selection> AccountPool::SelectOnce(const SelectRequest& request, Claim* claim) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  if (entries_.empty()) {
    return absl::UnavailableError("no accounts are loaded; add account files to the accounts directory");
  }
  ExpireLeasesLocked(now);
  std::optional<std::string> bound;
  absl::Time previous_use = absl::InfinitePast();
  if (!request.session_id.empty()) bound = sessions_.Lookup(request.session_id, now, &previous_use);
  bool from_session = false;
  std::optional<size_t> chosen = ChooseFastLocked(request, now, bound, &from_session);
  if (!chosen) {
    // Nothing eligible on the fast path: the full evaluation gives the reasons and the delay, or
    // force_rotate's fallback to the account it moved away from.
    Evaluation ev = Evaluate(request, now, bound);
    if (!ev.chosen) return NoAccountError(ev, request, now);
    chosen = ev.chosen;
    from_session = ev.from_session;
  }
  const char* rebind_reason = !bound ? "new" : request.force_rotate ? "force_rotate" : "ineligible";
  if (claim != nullptr && !request.session_id.empty() && !from_session) {
    claim->needed = true;
    claim->expected = bound.value_or("");
    claim->candidate = entries_[*chosen].record.id;
    claim->reason = rebind_reason;
    return Selection{};
  }
  Entry& entry = entries_[*chosen];
  entry.last_used = now;
  ++entry.in_flight;
  // The decision this lease was admitted on (before it counts against the estimate).
  const QuotaView admitted = QuotaViewLocked(*chosen, request.model, now);
  RecordUsageLocked(*chosen, request.model, now, 1);
  ReindexLocked(*chosen, now);
  IssuedLease lease = leases_.Issue(entry.record.id, request.model, now, request.caller);
  if (SharedState* shared = shared_state()) shared->LeaseIssued(lease.id, entry.record.id, request.model);
  cooldowns_.OnIssued(entry.record.id, request.model, now, lease.id);
  // Models come from callers: past kMaxTrackedModels an arbitrary one is forgotten (it only loses
  // its fill_first / round_robin position).
  if (last_for_model_.size() >= kMaxTrackedModels && !last_for_model_.contains(request.model)) {
    last_for_model_.erase(last_for_model_.begin());
  }
  last_for_model_[request.model] = entry.record.id;
  // The binding's TTL in the shared state restarts now and then, not on every use: its idle
  // expiry there lags the local one by at most a twentieth of the TTL.
  if (from_session && now - previous_use > options_.session_idle_ttl / 20) {
    if (SharedState* shared = shared_state()) shared->TouchSession(request.session_id);
  }
  if (!request.session_id.empty() && !from_session) {
    ++rebinds_[rebind_reason];
    sessions_.Bind(request.session_id, entry.record.id, now);
  }

  Selection sel;
  sel.account_id = entry.record.id;
  sel.email = entry.record.email;
  sel.tier = entry.record.tier;
  sel.project_id = entry.record.project_id;
  sel.from_session = from_session;
  sel.lease_id = std::move(lease.id);
  sel.quota_decision = admitted.decision;
  sel.remaining_fraction = admitted.fraction;
  return sel;
}

Explanation AccountPool::Explain(const SelectRequest& request) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  ExpireLeasesLocked(now);
  std::optional<std::string> bound;
  if (!request.session_id.empty()) bound = sessions_.Peek(request.session_id, now);
  Evaluation ev = Evaluate(request, now, bound);
  Explanation out;
  out.policy = options_.policy;
  out.from_session = ev.from_session;
  if (ev.chosen) out.chosen_account_id = entries_[*ev.chosen].record.id;
  for (size_t i : ev.ranked) out.accounts.push_back(ev.verdicts[i]);
  for (AccountVerdict& v : ev.verdicts) {
    if (v.rank == 0) out.accounts.push_back(std::move(v));
  }
  return out;
}

std::vector<AccountView> AccountPool::List() const {
  const absl::Time now = clock_.Now();
  absl::ReaderMutexLock lock(&mu_);
  std::vector<AccountView> out;
  out.reserve(entries_.size());
  for (const Entry& e : entries_) {
    AccountView v;
    v.account_id = e.record.id;
    v.email = e.record.email;
    v.tier = e.record.tier;
    v.project_id = e.record.project_id;
    v.disabled = e.record.disabled;
    v.disabled_reason = e.record.disabled_reason;
    v.proxy_disabled = e.record.proxy_disabled;
    v.protected_models = e.record.protected_models;
    if (!e.record.access_token.empty()) v.token_expiry = e.record.access_expiry;
    if (e.last_used != absl::InfinitePast()) v.last_used = e.last_used;
    v.quotas = e.record.quotas;
    v.quota_forbidden = e.record.quota_forbidden;
    v.bound_sessions = sessions_.CountFor(e.record.id);
    v.cooldowns = cooldowns_.List(e.record.id, now);
    v.validation_url = cooldowns_.ValidationUrl(e.record.id);
    v.in_flight = e.in_flight;
    v.failure_streak = cooldowns_.Streak(e.record.id);
    out.push_back(std::move(v));
  }
  return out;
}

void AccountPool::EndLeaseLocked(const Lease& lease) {
  // A lease that ends without a report (released, timed out) frees the half-open probe it held.
  cooldowns_.OnLeaseEnded(lease.account, lease.model, lease.id);
  if (auto it = index_.find(lease.account); it != index_.end() && entries_[it->second].in_flight > 0) {
    --entries_[it->second].in_flight;
    ReindexLocked(it->second, clock_.Now());
  }
}

void AccountPool::ExpireLeasesLocked(absl::Time now) {
  SharedState* shared = shared_state();
  for (const Lease& lease : leases_.Expire(now)) {
    EndLeaseLocked(lease);
    if (shared != nullptr) shared->LeaseEnded(lease.id);
  }
}

void AccountPool::ReleaseLease(const std::string& lease_id) {
  absl::MutexLock lock(&mu_);
  if (std::optional<Lease> lease = leases_.End(lease_id)) {
    // Given back unused: it spent no quota.
    if (auto it = index_.find(lease->account); it != index_.end()) {
      entries_[it->second].usage.Forget(ModelFamily(lease->model), lease->expires - options_.lease_timeout);
    }
    EndLeaseLocked(*lease);
    if (SharedState* shared = shared_state()) shared->LeaseEnded(lease_id);
  }
}

namespace {

absl::Status ForeignLeaseError(const std::string& lease_id) {
  return absl::PermissionDeniedError(absl::StrCat(
      "lease_id ", SafeText(lease_id, 64), " was issued to another caller; only that caller may report it"));
}

absl::Status NamedAccountError() {
  return absl::PermissionDeniedError(
      "a report naming account_id and model without a lease of this caller needs the admin token; "
      "report with the lease_id GetToken returned");
}

}  // namespace

absl::StatusOr<OutcomeResult> AccountPool::ReportOutcome(const Outcome& outcome) {
  // Reports are untrusted (docs/ARCHITECTURE.md §5): a lease is reported only by the caller it was issued to,
  // checked before anything changes. Its id carries the caller's tag, so a lease of another
  // replica is checked before it is taken from the shared state.
  if (!outcome.lease_id.empty() && !outcome.may_report_any_lease) {
    if (std::optional<std::string> tag = CallerTagOfLease(outcome.lease_id); tag && *tag != CallerTag(outcome.caller)) {
      return ForeignLeaseError(outcome.lease_id);
    }
  }
  SharedState* shared = shared_state();
  if (shared != nullptr && !outcome.lease_id.empty()) {
    bool here = false;
    {
      absl::ReaderMutexLock lock(&mu_);
      here = leases_.Contains(outcome.lease_id);
    }
    // A lease another replica issued: take it from the shared state and report by its account.
    if (!here) {
      if (std::optional<SharedLease> remote = shared->TakeLease(outcome.lease_id)) {
        Outcome by_account = outcome;
        by_account.lease_id.clear();
        by_account.account_id = remote->account;
        by_account.model = remote->model;
        by_account.may_name_account = true;  // named by a lease of this caller
        return ReportOutcomeHere(by_account, shared);
      }
    }
  }
  return ReportOutcomeHere(outcome, shared);
}

absl::StatusOr<OutcomeResult> AccountPool::ReportOutcomeHere(const Outcome& outcome, SharedState* shared) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  ExpireLeasesLocked(now);
  OutcomeResult result;
  std::optional<absl::Time> issued_at;  // of the reported lease, when it was issued here
  if (!outcome.lease_id.empty()) {
    if (std::optional<Lease> mine = leases_.Find(outcome.lease_id);
        mine && !outcome.may_report_any_lease && mine->caller != outcome.caller) {
      return ForeignLeaseError(outcome.lease_id);
    }
    if (std::optional<Lease> lease = leases_.End(outcome.lease_id)) {
      EndLeaseLocked(*lease);
      if (shared != nullptr) shared->LeaseEnded(lease->id);
      result.account_id = lease->account;
      result.model = lease->model;
      issued_at = lease->expires - options_.lease_timeout;
    } else if (outcome.account_id.empty()) {
      return absl::NotFoundError(absl::StrCat(
          "lease_id ", outcome.lease_id,
          " is unknown or has timed out; report with account_id and model instead"));
    }
  }
  if (result.account_id.empty()) {
    if (!outcome.may_name_account) return NamedAccountError();
    result.account_id = outcome.account_id;
    result.model = outcome.model;
  }
  if (result.model.empty()) {
    return InvalidFieldError("model", "is required when no known lease_id is given");
  }
  auto it = index_.find(result.account_id);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat("account_id ", result.account_id, " is not loaded"));
  }
  AccountRecord& rec = entries_[it->second].record;
  UpstreamError parsed = ParseUpstreamError(outcome.http_status, outcome.retry_after, outcome.error_body, now);
  // A success on an account with nothing on record changes nothing anywhere: not shared.
  const bool share = shared != nullptr && (parsed.kind != FailureKind::kSuccess || cooldowns_.Has(rec.id));
  CooldownDecision d = cooldowns_.Apply(rec.id, result.model, parsed, now, outcome.lease_id);
  if (parsed.kind == FailureKind::kQuotaExhausted || parsed.kind == FailureKind::kRateLimited) {
    MarkExhaustionLocked(it->second, result.model, now);
  }
  LearnFromOutcomeLocked(it->second, result.model, parsed, issued_at, now);
  if (share) {
    shared->OutcomeApplied({rec.id, result.model, outcome.http_status, outcome.retry_after, outcome.error_body, now},
                           cooldowns_.Export(rec.id));
    if (d.invalidate_token) shared->TokenDropped(rec.id);
  }
  result.scope = d.scope;
  result.until = d.until;
  result.reason = d.reason;
  if (d.invalidate_token) {
    rec.access_token.clear();
    rec.access_expiry = absl::InfinitePast();
  }
  return result;
}

absl::StatusOr<Credentials> AccountPool::GetCredentials(const std::string& account_id) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = index_.find(account_id);
  if (it == index_.end()) return absl::NotFoundError(absl::StrCat("no account ", account_id));
  const AccountRecord& rec = entries_[it->second].record;
  return Credentials{rec.refresh_token, rec.access_token, rec.access_expiry, rec.disabled};
}

void AccountPool::SetToken(const std::string& account_id, const std::string& access_token,
                           absl::Time expiry, const std::optional<std::string>& refresh_token) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(account_id);
  if (it == index_.end()) return;
  AccountRecord& rec = entries_[it->second].record;
  rec.access_token = access_token;
  rec.access_expiry = expiry;
  if (refresh_token) rec.refresh_token = *refresh_token;
}

void AccountPool::Disable(const std::string& account_id, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(account_id);
  if (it == index_.end()) return;
  AccountRecord& rec = entries_[it->second].record;
  rec.disabled = true;
  rec.disabled_reason = reason;
  runtime_disabled_[account_id] = reason;
}

ResetResult AccountPool::ResetLocked(size_t i, const std::string& model, bool enable) {
  AccountRecord& rec = entries_[i].record;
  ResetResult out;
  out.cooldown_lifted = cooldowns_.Lift(rec.id, model);
  // What reported 429s wrote into the quota estimate goes with them: those readings are forgotten
  // (unknown until the next observation), and so are the yardsticks of the lifted cooldowns.
  const absl::string_view family = model.empty() ? absl::string_view() : ModelFamily(model);
  auto reported = [&](bool from_outcome, absl::string_view of) {
    return from_outcome && (family.empty() || of == family);
  };
  std::erase_if(rec.quotas, [&](const ModelQuota& q) { return reported(q.from_outcome, ModelFamily(q.model)); });
  std::erase_if(rec.buckets, [&](const BucketQuota& b) { return reported(b.from_outcome, b.family); });
  std::erase_if(entries_[i].marks, [&](const QuotaMark& m) { return model.empty() || m.model == model; });
  ReindexLocked(i, clock_.Now());
  if (enable && rec.disabled) {
    rec.disabled = false;
    rec.disabled_reason.clear();
    out.enabled = true;
  }
  if (enable) runtime_disabled_.erase(rec.id);
  return out;
}

absl::StatusOr<ResetResult> AccountPool::Reset(const ResetRequest& request) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(request.account_id);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat("account_id ", SafeText(request.account_id, 64), " is not loaded"));
  }
  ResetResult out = ResetLocked(it->second, request.model, request.enable);
  if (SharedState* shared = shared_state()) {
    shared->AccountReset(request.account_id, request.model, request.enable, cooldowns_.Export(request.account_id));
  }
  return out;
}

void AccountPool::OnRemoteReset(const std::string& account, const std::string& model, bool enabled) {
  absl::MutexLock lock(&mu_);
  if (auto it = index_.find(account); it != index_.end()) ResetLocked(it->second, model, enabled);
}

std::vector<std::string> AccountPool::ExpiringBefore(absl::Time deadline) const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const Entry& e : entries_) {
    if (e.record.disabled || e.record.proxy_disabled) continue;
    if (e.record.access_expiry < deadline) out.push_back(e.record.id);
  }
  return out;
}

void AccountPool::SetQuotaSettings(const QuotaSettings& settings) {
  absl::MutexLock lock(&mu_);
  quota_ = settings;
  model_index_.clear();  // every rank may change; rebuilt on next use
}

QuotaSettings AccountPool::quota_settings() const {
  absl::ReaderMutexLock lock(&mu_);
  return quota_;
}

AccountPool::QuotaView AccountPool::QuotaViewLocked(size_t i, const std::string& model, absl::Time now) const {
  const Entry& e = entries_[i];
  QuotaView v;
  const ModelQuota* own = QuotaFor(e.record, model);
  if (!quota_.enabled) {
    if (own != nullptr) {  // hints to rank by, no decision
      v.fraction = own->remaining_fraction;
      v.reset_time = own->reset_time;
    }
    return v;
  }
  const absl::string_view family = ModelFamily(model);
  auto consider = [&](absl::string_view cost_key, const QuotaReading& reading) ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    if (now - reading.observed > quota_.cache_ttl) return;  // stale: unknown
    const double prior = e.usage.Cost(cost_key) ? 0 : CostPriorLocked(cost_key, e.record.tier);  // if unlearned
    QuotaEstimate est = e.usage.Estimate(family, cost_key, reading, now, quota_lag_, prior);
    if (v.fresh && est.estimated >= v.estimate.estimated) return;
    v.fresh = true;
    v.estimate = est;
    v.reading = reading;
    v.cost_key = cost_key;
  };
  if (own != nullptr) consider(family, QuotaReading{own->remaining_fraction, own->reset_time, own->observed});
  for (const BucketQuota& b : e.record.buckets) {
    if (b.family == family) consider(b.bucket, QuotaReading{b.remaining_fraction, b.reset_time, b.observed});
  }
  if (!v.fresh) return v;
  if (v.reading.reset_time && !v.estimate.reset_passed) v.reset_time = v.reading.reset_time;
  v.decision = DecideQuota(quota_, v.estimate.estimated, v.reading.observed, v.reset_time, now);
  // Less than half a call left is no call left, whatever the threshold.
  if (v.estimate.estimated < v.estimate.cost / 2) v.decision = QuotaDecision::kExhausted;
  v.fraction = v.estimate.estimated;
  return v;
}

bool AccountPool::ExhaustedLocked(size_t i, const std::string& model, absl::Time now) const {
  if (!quota_.enabled) return false;
  return Forbidden(entries_[i].record, quota_, now) ||
         QuotaViewLocked(i, model, now).decision == QuotaDecision::kExhausted;
}

double AccountPool::CostPriorLocked(absl::string_view cost_key, Tier tier) const {
  if (learned_cost_.empty()) return quota_.call_cost_prior;  // nothing learned yet: no lookups
  if (auto it = learned_cost_.find(absl::StrCat(cost_key, "/", TierName(tier))); it != learned_cost_.end()) {
    return it->second;
  }
  if (auto it = learned_cost_.find(cost_key); it != learned_cost_.end()) return it->second;
  return quota_.call_cost_prior;
}

void AccountPool::RecordUsageLocked(size_t i, const std::string& model, absl::Time at, int count) {
  if (!quota_.enabled) return;
  QuotaUsage& usage = entries_[i].usage;
  usage.Record(ModelFamily(model), at, count);
  // Observations older than cache_ttl no longer count, so neither do the leases before them.
  usage.Trim(at - quota_.cache_ttl - quota_.max_lag - absl::Seconds(1));
}

void AccountPool::LearnFromOutcomeLocked(size_t i, const std::string& model, const UpstreamError& parsed,
                                         std::optional<absl::Time> issued_at, absl::Time now) {
  const FailureKind kind = parsed.kind;
  if (!quota_.enabled || kind == FailureKind::kSuccess) return;
  Entry& e = entries_[i];
  const absl::string_view family = ModelFamily(model);
  // A failed call spent no quota: it must not count against the estimate nor the learned cost.
  if (issued_at) {
    e.usage.Forget(family, *issued_at);
    ReindexLocked(i, now);
  }
  if (kind != FailureKind::kQuotaExhausted) return;
  // The leases since the binding quota's last observation spent all it showed: an upper bound of
  // one call's cost.
  const QuotaView v = QuotaViewLocked(i, model, now);
  if (!v.fresh) return;
  if (!v.estimate.reset_passed &&
      e.usage.LearnExhausted(v.cost_key, v.reading.fraction, e.usage.IssuedSince(family, v.reading.observed - quota_lag_))) {
    ShareLearnedCostLocked(i, v.cost_key);
  }
  // The quota is spent now, for every model of the family: no other model walks into the same 429.
  auto spent = [&](std::optional<absl::Time> reset) {
    if (parsed.delay) return std::optional<absl::Time>(now + *parsed.delay);
    return reset && *reset > now ? reset : std::nullopt;
  };
  for (ModelQuota& q : e.record.quotas) {
    if (ModelFamily(q.model) != family) continue;
    q = ModelQuota{q.model, 0, spent(q.reset_time), now, /*from_outcome=*/true};
  }
  for (BucketQuota& b : e.record.buckets) {
    if (b.bucket != v.cost_key) continue;
    b = BucketQuota{b.family, b.bucket, 0, spent(b.reset_time), now, /*from_outcome=*/true};
  }
  ReindexLocked(i, now);
}

void AccountPool::ShareLearnedCostLocked(size_t i, absl::string_view cost_key) {
  const double cost = *entries_[i].usage.Cost(cost_key);
  learned_cost_[absl::StrCat(cost_key, "/", TierName(entries_[i].record.tier))] = cost;
  learned_cost_[std::string(cost_key)] = cost;
}

void AccountPool::MarkExhaustionLocked(size_t i, const std::string& model, absl::Time at) {
  Entry& e = entries_[i];
  QuotaMark mark{model, at, std::nullopt, std::nullopt};
  if (const ModelQuota* q = QuotaFor(e.record, model)) {
    mark.fraction = q->remaining_fraction;
    mark.reset_time = q->reset_time;
  }
  auto same = std::find_if(e.marks.begin(), e.marks.end(), [&](const QuotaMark& m) { return m.model == model; });
  if (same != e.marks.end()) {
    *same = std::move(mark);
    return;
  }
  if (e.marks.size() >= kMaxMarks) e.marks.erase(e.marks.begin());  // the oldest model's
  e.marks.push_back(std::move(mark));
}

void AccountPool::UpdateQuota(const std::vector<QuotaObservation>& observations) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<const std::string*, size_t>> touched;  // (model, entry) whose rank may change
  for (const QuotaObservation& o : observations) {
    auto it = index_.find(o.account_id);
    if (it == index_.end()) continue;
    Entry& entry = entries_[it->second];
    AccountRecord& rec = entry.record;
    if (o.tier != Tier::kUnknown) rec.tier = o.tier;
    if (!o.project_id.empty()) rec.project_id = o.project_id;
    rec.quota_forbidden = o.forbidden;
    rec.quota_forbidden_observed = o.observed;
    // A reset time before the moment the answer was taken means the answer is at least that old.
    if (o.reset_time && *o.reset_time < o.observed) LearnLagLocked(o.observed - *o.reset_time);
    if (!o.bucket.empty()) {  // a bucket limits every model of its family
      UpdateBucketLocked(it->second, o);
      ReindexLocked(it->second, now);
      continue;
    }
    if (o.model.empty()) {  // an account-level observation (tier, project, forbidden)
      ReindexLocked(it->second, now);
      continue;
    }
    const ModelQuota seen{o.model, o.remaining_fraction, o.reset_time, o.observed};
    const absl::string_view family = ModelFamily(o.model);
    auto q = std::find_if(rec.quotas.begin(), rec.quotas.end(), [&](const ModelQuota& m) { return m.model == o.model; });
    if (q == rec.quotas.end()) {
      rec.quotas.push_back(seen);
    } else {
      if (o.observed < q->observed) continue;  // late, older news
      if (q->from_outcome) {
        LearnLagFromSpentLocked(QuotaReading{q->remaining_fraction, q->reset_time, q->observed}, o);
        if (o.observed - quota_lag_ <= q->observed) continue;  // may predate the 429
      }
      if (!SourceLiesAbout(o.source, o.model) &&
          entry.usage.Learn(family, family, QuotaReading{q->remaining_fraction, q->reset_time, q->observed},
                            QuotaReading{o.remaining_fraction, o.reset_time, o.observed}, quota_lag_)) {
        ShareLearnedCostLocked(it->second, family);
      }
      *q = seen;
    }
    touched.emplace_back(&o.model, it->second);
    if (SourceLiesAbout(o.source, o.model)) continue;
    auto mark = std::find_if(entry.marks.begin(), entry.marks.end(), [&](const QuotaMark& m) { return m.model == o.model; });
    if (mark != entry.marks.end() &&
        ObservationEndsExhaustion(*mark, o.remaining_fraction, o.reset_time, o.observed, quota_lag_,
                                  quota_.exhausted_threshold)) {
      cooldowns_.EndQuotaCooldown(rec.id, o.model);
      entry.marks.erase(mark);
    }
  }
  for (const auto& [model, i] : touched) {
    if (auto idx = model_index_.find(*model); idx != model_index_.end()) ReindexOne(*idx->second, *model, i, now);
  }
}

void AccountPool::UpdateBucketLocked(size_t i, const QuotaObservation& o) {
  Entry& e = entries_[i];
  std::vector<BucketQuota>& buckets = e.record.buckets;
  const std::string family(FamilyOfGroup(o.family));
  const QuotaReading seen{o.remaining_fraction, o.reset_time, o.observed};
  auto b = std::find_if(buckets.begin(), buckets.end(), [&](const BucketQuota& x) { return x.bucket == o.bucket; });
  if (b == buckets.end()) {
    if (buckets.size() >= AccountRecord::kMaxBuckets) return;  // the monitor names a bounded set
    buckets.push_back(BucketQuota{family, o.bucket, o.remaining_fraction, o.reset_time, o.observed});
    return;
  }
  if (o.observed < b->observed) return;  // late, older news
  if (b->from_outcome) {
    LearnLagFromSpentLocked(QuotaReading{b->remaining_fraction, b->reset_time, b->observed}, o);
    if (o.observed - quota_lag_ <= b->observed) return;  // may predate the 429
  }
  if (e.usage.Learn(family, b->bucket, QuotaReading{b->remaining_fraction, b->reset_time, b->observed}, seen,
                    quota_lag_)) {
    ShareLearnedCostLocked(i, b->bucket);
  }
  *b = BucketQuota{family, o.bucket, o.remaining_fraction, o.reset_time, o.observed};
}

void AccountPool::LearnLagLocked(absl::Duration at_least) {
  // Such ages fall anywhere below the true lag, so their largest is taken half again as a margin.
  quota_lag_ = std::min({std::max(quota_lag_, at_least * 3 / 2), quota_.max_lag, quota_.cache_ttl / 2});
}

void AccountPool::LearnLagFromSpentLocked(const QuotaReading& spent, const QuotaObservation& o) {
  // The 429 showed the window spent at `spent.observed`; an answer taken later that still shows
  // quota left in that same window (the reset the 429 named) describes a moment before the 429.
  if (!spent.reset_time || !o.reset_time || o.observed <= spent.observed || o.remaining_fraction <= 0) return;
  if (absl::AbsDuration(*o.reset_time - *spent.reset_time) > absl::Seconds(1)) return;
  LearnLagLocked(o.observed - spent.observed);
}

size_t AccountPool::TrackedModels() const {
  absl::ReaderMutexLock lock(&mu_);
  return last_for_model_.size();
}

absl::Duration AccountPool::quota_lag() const {
  absl::ReaderMutexLock lock(&mu_);
  return quota_lag_;
}

std::map<std::string, int64_t> AccountPool::RebindCounts() const {
  absl::ReaderMutexLock lock(&mu_);
  return rebinds_;
}

void AccountPool::OnRemoteSession(const std::string& session, const std::string& account) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  // Only sessions this replica serves are kept; others are claimed when they first come here.
  std::optional<std::string> mine = sessions_.Peek(session, now);
  if (mine && *mine != account && index_.contains(account)) sessions_.Bind(session, account, now);
}

void AccountPool::OnRemoteOutcome(const SharedOutcome& o) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(o.account);
  if (it == index_.end()) return;
  AccountRecord& rec = entries_[it->second].record;
  UpstreamError parsed = ParseUpstreamError(o.http_status, o.retry_after, o.error_body, o.at);
  CooldownDecision d = cooldowns_.Apply(rec.id, o.model, parsed, o.at);
  if (parsed.kind == FailureKind::kQuotaExhausted || parsed.kind == FailureKind::kRateLimited) {
    MarkExhaustionLocked(it->second, o.model, o.at);
  }
  LearnFromOutcomeLocked(it->second, o.model, parsed, std::nullopt, o.at);
  if (d.invalidate_token) {
    rec.access_token.clear();
    rec.access_expiry = absl::InfinitePast();
  }
}

void AccountPool::OnRemoteCooldowns(const std::string& account, const CooldownState& state) {
  absl::MutexLock lock(&mu_);
  if (index_.contains(account)) cooldowns_.Merge(account, state);
}

void AccountPool::OnRemoteDisable(const std::string& account, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(account);
  if (it == index_.end()) return;
  AccountRecord& rec = entries_[it->second].record;
  if (!rec.disabled) {
    rec.disabled = true;
    rec.disabled_reason = reason;
  }
  runtime_disabled_[account] = reason;
}

void AccountPool::OnRemoteToken(const std::string& account, const SharedToken& token) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(account);
  if (it == index_.end()) return;
  AccountRecord& rec = entries_[it->second].record;
  if (token.expiry <= rec.access_expiry) return;
  rec.access_token = token.access_token;
  rec.access_expiry = token.expiry;
  if (token.refresh_token) rec.refresh_token = *token.refresh_token;
}

void AccountPool::OnRemoteLeasesIssued(const std::string& account, const std::string& model, int count,
                                       absl::Time at) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  auto it = index_.find(account);
  if (it == index_.end() || count <= 0) return;
  RecordUsageLocked(it->second, model, at, count);
  ReindexLocked(it->second, now);
}

void AccountPool::OnRemoteLeaseEnd(const std::string& lease_id) {
  absl::MutexLock lock(&mu_);
  if (std::optional<Lease> lease = leases_.End(lease_id)) EndLeaseLocked(*lease);
}

LocalState AccountPool::SnapshotForResync() {
  absl::MutexLock lock(&mu_);
  LocalState out;
  out.sessions = sessions_.Snapshot(clock_.Now());
  for (const Entry& e : entries_) {
    if (std::optional<CooldownState> c = cooldowns_.Export(e.record.id)) out.cooldowns.emplace_back(e.record.id, *c);
  }
  for (const auto& [id, reason] : runtime_disabled_) out.disabled.emplace_back(id, reason);
  return out;
}

std::vector<std::string> AccountPool::AccountIds() {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const Entry& e : entries_) out.push_back(e.record.id);
  return out;
}

}  // namespace tokenbroker
