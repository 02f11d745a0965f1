#include "lib/quota/quota_book.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"

namespace tokenbroker {
namespace {

const ModelQuota* QuotaFor(const AccountRecord& rec, absl::string_view model) {
  for (const ModelQuota& q : rec.quotas) {
    if (q.model == model) return &q;
  }
  return nullptr;
}

}  // namespace

QuotaView QuotaBook::View(const AccountRecord& rec, const AccountQuota& quota, absl::string_view model,
                          absl::Time now) const {
  QuotaView v;
  const ModelQuota* own = QuotaFor(rec, model);
  if (!settings_.enabled) {
    if (own != nullptr) {  // hints to rank by, no decision
      v.fraction = own->remaining_fraction;
      v.reset_time = own->reset_time;
    }
    return v;
  }
  const absl::string_view family = families_->Of(model);
  auto consider = [&](absl::string_view cost_key, const QuotaReading& reading) {
    if (now - reading.observed > settings_.cache_ttl) return;  // stale: unknown
    const double prior = quota.usage.Cost(cost_key) ? 0 : CostPrior(cost_key, rec.tier);  // if unlearned
    QuotaEstimate est = quota.usage.Estimate(family, cost_key, reading, now, lag_, prior);
    if (v.fresh && est.estimated >= v.estimate.estimated) return;
    v.fresh = true;
    v.estimate = est;
    v.reading = reading;
    v.cost_key = cost_key;
  };
  if (own != nullptr) consider(family, QuotaReading{own->remaining_fraction, own->reset_time, own->observed});
  for (const BucketQuota& b : rec.buckets) {
    if (b.family == family) consider(b.bucket, QuotaReading{b.remaining_fraction, b.reset_time, b.observed});
  }
  if (!v.fresh) return v;
  if (v.reading.reset_time && !v.estimate.reset_passed) v.reset_time = v.reading.reset_time;
  v.decision = DecideQuota(settings_, v.estimate.estimated, v.reading.observed, v.reset_time, now);
  // Less than half a call left is no call left, whatever the threshold.
  if (v.estimate.estimated < v.estimate.cost / 2) v.decision = QuotaDecision::kExhausted;
  v.fraction = v.estimate.estimated;
  return v;
}

bool QuotaBook::Forbidden(const AccountRecord& rec, absl::Time now) const {
  return settings_.enabled && rec.quota_forbidden && now - rec.quota_forbidden_observed <= settings_.cache_ttl;
}

bool QuotaBook::Exhausted(const AccountRecord& rec, const AccountQuota& quota, absl::string_view model,
                          absl::Time now) const {
  if (!settings_.enabled) return false;
  return Forbidden(rec, now) || View(rec, quota, model, now).decision == QuotaDecision::kExhausted;
}

std::string QuotaBook::ExhaustedDetail(const AccountRecord& rec, const AccountQuota& quota, absl::string_view model,
                                       absl::Time now, std::optional<absl::Time>* resets) const {
  if (Forbidden(rec, now)) return "the quota API answers 403 for this account (forbidden)";
  const QuotaView qv = View(rec, quota, model, now);
  std::string detail = absl::StrCat(
      "quota for ", model, " estimated at ", qv.estimate.estimated, " (observed ", qv.estimate.observed,
      qv.estimate.reset_passed ? " at its reset" : "", ", ", qv.estimate.leases, " leases since at ", qv.estimate.cost,
      " each", qv.estimate.cost_learned ? "" : " (prior)", "), below exhausted_threshold ",
      settings_.exhausted_threshold);
  if (qv.cost_key != families_->Of(model)) absl::StrAppend(&detail, "; bucket ", qv.cost_key);
  if (qv.reset_time) {
    *resets = *qv.reset_time;
    absl::StrAppend(&detail, "; resets at ", FormatTimestamp(*qv.reset_time));
  }
  return detail;
}

absl::Time QuotaBook::NextChange(const AccountRecord& rec, absl::string_view model, absl::Time now) const {
  if (!settings_.enabled) return absl::InfiniteFuture();
  absl::Time when = absl::InfiniteFuture();
  auto consider = [&](absl::Time observed, const std::optional<absl::Time>& reset) {
    when = std::min(when, observed + settings_.cache_ttl + absl::Nanoseconds(1));
    if (reset && *reset > now) when = std::min(when, *reset);
  };
  if (const ModelQuota* q = QuotaFor(rec, model)) consider(q->observed, q->reset_time);
  const absl::string_view family = families_->Of(model);
  for (const BucketQuota& b : rec.buckets) {
    if (b.family == family) consider(b.observed, b.reset_time);
  }
  return when;
}

double QuotaBook::CostPrior(absl::string_view cost_key, Tier tier) const {
  if (learned_cost_.empty()) return settings_.call_cost_prior;  // nothing learned yet: no lookups
  if (auto it = learned_cost_.find(absl::StrCat(cost_key, "/", TierName(tier))); it != learned_cost_.end()) {
    return it->second;
  }
  if (auto it = learned_cost_.find(cost_key); it != learned_cost_.end()) return it->second;
  return settings_.call_cost_prior;
}

void QuotaBook::ShareLearnedCost(const AccountRecord& rec, const AccountQuota& quota, absl::string_view cost_key) {
  const double cost = *quota.usage.Cost(cost_key);
  learned_cost_[absl::StrCat(cost_key, "/", TierName(rec.tier))] = cost;
  learned_cost_[std::string(cost_key)] = cost;
}

void QuotaBook::RecordUsage(AccountQuota& quota, absl::string_view model, absl::Time at, int count) {
  if (!settings_.enabled) return;
  quota.usage.Record(families_->Of(model), at, count);
  // Observations older than cache_ttl no longer count, so neither do the leases before them.
  quota.usage.Trim(at - settings_.cache_ttl - settings_.max_lag - absl::Seconds(1));
}

void QuotaBook::ForgetLease(AccountQuota& quota, absl::string_view model, absl::Time issued_at) {
  quota.usage.Forget(families_->Of(model), issued_at);
}

void QuotaBook::MarkExhaustion(const AccountRecord& rec, AccountQuota& quota, absl::string_view model,
                               absl::Time at) {
  QuotaMark mark{std::string(model), at, std::nullopt, std::nullopt};
  if (const ModelQuota* q = QuotaFor(rec, model)) {
    mark.fraction = q->remaining_fraction;
    mark.reset_time = q->reset_time;
  }
  auto same = std::find_if(quota.marks.begin(), quota.marks.end(), [&](const QuotaMark& m) { return m.model == model; });
  if (same != quota.marks.end()) {
    *same = std::move(mark);
    return;
  }
  if (quota.marks.size() >= AccountQuota::kMaxMarks) quota.marks.erase(quota.marks.begin());  // the oldest model's
  quota.marks.push_back(std::move(mark));
}

bool QuotaBook::LearnFromOutcome(AccountRecord& rec, AccountQuota& quota, absl::string_view model,
                                 const UpstreamError& parsed, std::optional<absl::Time> issued_at, absl::Time now) {
  const FailureKind kind = parsed.kind;
  if (kind == FailureKind::kQuotaExhausted || kind == FailureKind::kRateLimited) MarkExhaustion(rec, quota, model, now);
  if (!settings_.enabled || kind == FailureKind::kSuccess) return false;
  const absl::string_view family = families_->Of(model);
  // A failed call spent no quota: it must not count against the estimate nor the learned cost.
  bool changed = false;
  if (issued_at) {
    quota.usage.Forget(family, *issued_at);
    changed = true;
  }
  if (kind != FailureKind::kQuotaExhausted) return changed;
  // The leases since the binding quota's last observation spent all it showed: an upper bound of
  // one call's cost.
  const QuotaView v = View(rec, quota, model, now);
  if (!v.fresh) return changed;
  const std::string cost_key(v.cost_key);  // the record's buckets change below
  if (!v.estimate.reset_passed &&
      quota.usage.LearnExhausted(cost_key, v.reading.fraction, quota.usage.IssuedSince(family, v.reading.observed - lag_))) {
    ShareLearnedCost(rec, quota, cost_key);
  }
  // The quota is spent now, for every model of the family: no other model walks into the same 429.
  auto spent = [&](std::optional<absl::Time> reset) {
    if (parsed.delay) return std::optional<absl::Time>(now + *parsed.delay);
    return reset && *reset > now ? reset : std::nullopt;
  };
  for (ModelQuota& q : rec.quotas) {
    if (families_->Of(q.model) != family) continue;
    q = ModelQuota{q.model, 0, spent(q.reset_time), now, /*from_outcome=*/true};
  }
  for (BucketQuota& b : rec.buckets) {
    if (b.bucket != cost_key) continue;
    b = BucketQuota{b.family, b.bucket, 0, spent(b.reset_time), now, /*from_outcome=*/true};
  }
  return true;
}

QuotaBook::Observed QuotaBook::Observe(AccountRecord& rec, AccountQuota& quota, const QuotaObservation& o) {
  Observed out;
  if (o.tier != Tier::kUnknown) rec.tier = o.tier;
  if (!o.project_id.empty()) rec.project_id = o.project_id;
  rec.no_project_reason = o.project_id.empty() ? o.no_project_reason : "";
  rec.quota_forbidden = o.forbidden;
  rec.quota_forbidden_observed = o.observed;
  // A reset time before the moment the answer was taken means the answer is at least that old.
  if (o.reset_time && *o.reset_time < o.observed) LearnLag(o.observed - *o.reset_time);
  if (!o.bucket.empty()) {  // a bucket limits every model of its family
    ObserveBucket(rec, quota, o);
    out.applied = true;
    return out;
  }
  if (o.model.empty()) {  // an account-level observation (tier, project, forbidden)
    out.applied = true;
    return out;
  }
  const ModelQuota seen{o.model, o.remaining_fraction, o.reset_time, o.observed};
  const absl::string_view family = families_->Of(o.model);
  auto q = std::find_if(rec.quotas.begin(), rec.quotas.end(), [&](const ModelQuota& m) { return m.model == o.model; });
  if (q == rec.quotas.end()) {
    rec.quotas.push_back(seen);
  } else {
    if (o.observed < q->observed) return out;  // late, older news
    if (q->from_outcome) {
      LearnLagFromSpent(QuotaReading{q->remaining_fraction, q->reset_time, q->observed}, o);
      if (o.observed - lag_ <= q->observed) return out;  // may predate the 429
    }
    if (!SourceLiesAbout(o.source, o.model) &&
        quota.usage.Learn(family, family, QuotaReading{q->remaining_fraction, q->reset_time, q->observed},
                          QuotaReading{o.remaining_fraction, o.reset_time, o.observed}, lag_)) {
      ShareLearnedCost(rec, quota, family);
    }
    *q = seen;
  }
  out.applied = true;
  if (SourceLiesAbout(o.source, o.model)) return out;
  auto mark = std::find_if(quota.marks.begin(), quota.marks.end(), [&](const QuotaMark& m) { return m.model == o.model; });
  if (mark != quota.marks.end() &&
      ObservationEndsExhaustion(*mark, o.remaining_fraction, o.reset_time, o.observed, lag_,
                                settings_.exhausted_threshold)) {
    out.ends_quota_cooldown = true;
    quota.marks.erase(mark);
  }
  return out;
}

void QuotaBook::ObserveBucket(AccountRecord& rec, AccountQuota& quota, const QuotaObservation& o) {
  std::vector<BucketQuota>& buckets = rec.buckets;
  const std::string family(families_->OfGroup(o.family));
  const QuotaReading seen{o.remaining_fraction, o.reset_time, o.observed};
  auto b = std::find_if(buckets.begin(), buckets.end(), [&](const BucketQuota& x) { return x.bucket == o.bucket; });
  if (b == buckets.end()) {
    if (buckets.size() >= AccountRecord::kMaxBuckets) return;  // the monitor names a bounded set
    buckets.push_back(BucketQuota{family, o.bucket, o.remaining_fraction, o.reset_time, o.observed});
    return;
  }
  if (o.observed < b->observed) return;  // late, older news
  if (b->from_outcome) {
    LearnLagFromSpent(QuotaReading{b->remaining_fraction, b->reset_time, b->observed}, o);
    if (o.observed - lag_ <= b->observed) return;  // may predate the 429
  }
  if (quota.usage.Learn(family, b->bucket, QuotaReading{b->remaining_fraction, b->reset_time, b->observed}, seen,
                        lag_)) {
    ShareLearnedCost(rec, quota, b->bucket);
  }
  *b = BucketQuota{family, o.bucket, o.remaining_fraction, o.reset_time, o.observed};
}

void QuotaBook::LearnLag(absl::Duration at_least) {
  // Such ages fall anywhere below the true lag, so their largest is taken half again as a margin.
  lag_ = std::min({std::max(lag_, at_least * 3 / 2), settings_.max_lag, settings_.cache_ttl / 2});
}

void QuotaBook::LearnLagFromSpent(const QuotaReading& spent, const QuotaObservation& o) {
  // The 429 showed the window spent at `spent.observed`; an answer taken later that still shows
  // quota left in that same window (the reset the 429 named) describes a moment before the 429.
  if (!spent.reset_time || !o.reset_time || o.observed <= spent.observed || o.remaining_fraction <= 0) return;
  if (absl::AbsDuration(*o.reset_time - *spent.reset_time) > absl::Seconds(1)) return;
  LearnLag(o.observed - spent.observed);
}

void QuotaBook::ForgetReported(AccountRecord& rec, AccountQuota& quota, const std::string& model) {
  // What reported 429s wrote into the quota estimate goes with them: those readings are forgotten
  // (unknown until the next observation), and so are the yardsticks of the lifted cooldowns.
  const absl::string_view family = model.empty() ? absl::string_view() : families_->Of(model);
  auto reported = [&](bool from_outcome, absl::string_view of) { return from_outcome && (family.empty() || of == family); };
  std::erase_if(rec.quotas, [&](const ModelQuota& q) { return reported(q.from_outcome, families_->Of(q.model)); });
  std::erase_if(rec.buckets, [&](const BucketQuota& b) { return reported(b.from_outcome, b.family); });
  std::erase_if(quota.marks, [&](const QuotaMark& m) { return model.empty() || m.model == model; });
}

}  // namespace tokenbroker
