#include "lib/quota/quota_estimate.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "lib/quota/family_map.h"

namespace tokenbroker {

namespace {

// `needle` is lower case. No allocation: this runs for every ranking of an account.
bool ContainsIgnoreCase(absl::string_view haystack, absl::string_view needle) {
  for (size_t i = 0; i + needle.size() <= haystack.size(); ++i) {
    size_t j = 0;
    while (j < needle.size() && absl::ascii_tolower(static_cast<unsigned char>(haystack[i + j])) == needle[j]) ++j;
    if (j == needle.size()) return true;
  }
  return false;
}

}  // namespace

bool IsThirdPartyModel(absl::string_view model) {
  return ContainsIgnoreCase(model, "claude") || ContainsIgnoreCase(model, "gpt");
}

absl::string_view ModelFamily(absl::string_view model) { return FamilyMap::Default()->Of(model); }

absl::string_view FamilyOfGroup(absl::string_view group_id) { return FamilyMap::Default()->OfGroup(group_id); }

QuotaUsage::Family* QuotaUsage::Find(absl::string_view family) {
  for (Family& f : families_) {
    if (f.name == family) return &f;
  }
  return nullptr;
}

const QuotaUsage::Family* QuotaUsage::Find(absl::string_view family) const {
  for (const Family& f : families_) {
    if (f.name == family) return &f;
  }
  return nullptr;
}

const QuotaUsage::CostSums* QuotaUsage::FindCost(absl::string_view key) const {
  for (const CostSums& c : costs_) {
    if (c.key == key) return &c;
  }
  return nullptr;
}

QuotaUsage::CostSums& QuotaUsage::CostFor(absl::string_view key) {
  for (CostSums& c : costs_) {
    if (c.key == key) return c;
  }
  if (costs_.size() >= kMaxCostKeys) costs_.erase(costs_.begin());  // the first learned goes
  costs_.push_back(CostSums{std::string(key)});
  return costs_.back();
}

void QuotaUsage::Compact(Family& f) {
  if (f.head > 0 && f.head * 2 >= f.issued.size()) {
    f.issued.erase(f.issued.begin(), f.issued.begin() + static_cast<std::ptrdiff_t>(f.head));
    f.head = 0;
  }
}

void QuotaUsage::Record(absl::string_view family, absl::Time at, int count) {
  Family* f = Find(family);
  if (f == nullptr) {
    families_.push_back(Family{std::string(family)});
    f = &families_.back();
  }
  count = std::min<int>(count, static_cast<int>(kMaxTimesPerFamily));
  for (int i = 0; i < count; ++i) {
    // Local leases come in time order; a late remote batch is put in its place.
    if (f->issued.size() == f->head || f->issued.back() <= at) {
      f->issued.push_back(at);
    } else {
      f->issued.insert(std::upper_bound(f->issued.begin() + static_cast<std::ptrdiff_t>(f->head), f->issued.end(), at),
                       at);
    }
    if (f->issued.size() - f->head > kMaxTimesPerFamily) ++f->head;
  }
  Compact(*f);
}

int64_t QuotaUsage::IssuedSince(absl::string_view family, absl::Time since) const {
  const Family* f = Find(family);
  if (f == nullptr) return 0;
  auto first = std::lower_bound(f->issued.begin() + static_cast<std::ptrdiff_t>(f->head), f->issued.end(), since);
  return f->issued.end() - first;
}

std::optional<double> QuotaUsage::Learn(absl::string_view family, absl::string_view cost_key,
                                        const QuotaReading& before, const QuotaReading& after, absl::Duration lag) {
  if (after.observed <= before.observed) return std::nullopt;
  // A reset between the two (or an unknown window) breaks the comparison.
  if (before.reset_time.has_value() != after.reset_time.has_value()) return std::nullopt;
  if (before.reset_time && absl::AbsDuration(*before.reset_time - *after.reset_time) > absl::Seconds(1)) {
    return std::nullopt;
  }
  if (const CostSums* c = FindCost(cost_key); c != nullptr && c->last_learned == after.observed) return std::nullopt;
  const int64_t calls = IssuedSince(family, before.observed - lag) - IssuedSince(family, after.observed - lag);
  const double drop = before.fraction - after.fraction;
  // No drop yet (the API has not caught up, or reports in coarse steps) prices nothing: a zero cost
  // would let the estimate never fall.
  if (calls <= 0 || drop <= 0) return std::nullopt;
  CostSums& c = CostFor(cost_key);
  c.last_learned = after.observed;
  // Older samples weigh half as much at each new one: the cost follows a changing model mix.
  c.sum_drop = c.sum_drop / 2 + drop;
  c.sum_calls = c.sum_calls / 2 + static_cast<double>(calls);
  return drop / static_cast<double>(calls);
}

std::optional<double> QuotaUsage::LearnExhausted(absl::string_view cost_key, double fraction, int64_t calls) {
  if (calls <= 0 || fraction <= 0) return std::nullopt;
  CostSums& c = CostFor(cost_key);
  c.sum_drop = c.sum_drop / 2 + fraction;
  c.sum_calls = c.sum_calls / 2 + static_cast<double>(calls);
  return fraction / static_cast<double>(calls);
}

void QuotaUsage::Forget(absl::string_view family, absl::Time at) {
  Family* f = Find(family);
  if (f == nullptr) return;
  auto it = std::lower_bound(f->issued.begin() + static_cast<std::ptrdiff_t>(f->head), f->issued.end(), at);
  if (it != f->issued.end() && *it == at) f->issued.erase(it);
}

std::optional<double> QuotaUsage::Cost(absl::string_view cost_key) const {
  const CostSums* c = FindCost(cost_key);
  if (c == nullptr || c->sum_calls <= 0) return std::nullopt;
  return c->sum_drop / c->sum_calls;
}

QuotaEstimate QuotaUsage::Estimate(absl::string_view family, absl::string_view cost_key, const QuotaReading& q,
                                   absl::Time now, absl::Duration lag, double prior) const {
  QuotaEstimate e;
  absl::Time since = q.observed - lag;
  e.observed = q.fraction;
  if (q.reset_time && *q.reset_time <= now) {
    // The quota has been full since its reset: only what was issued after it counts.
    e.reset_passed = true;
    e.observed = 1.0;
    since = *q.reset_time;
  }
  e.leases = IssuedSince(family, since);
  if (std::optional<double> cost = Cost(cost_key)) {
    e.cost = *cost;
    e.cost_learned = true;
  } else {
    e.cost = prior;
  }
  e.estimated = std::max(0.0, e.observed - static_cast<double>(e.leases) * e.cost);
  return e;
}

void QuotaUsage::Trim(absl::Time horizon) {
  for (Family& f : families_) {
    while (f.head < f.issued.size() && f.issued[f.head] < horizon) ++f.head;
    Compact(f);
  }
}

bool ObservationEndsExhaustion(const QuotaMark& mark, double fraction, std::optional<absl::Time> reset_time,
                               absl::Time observed, absl::Duration lag, double exhausted_threshold) {
  if (observed - lag <= mark.at) return false;  // it may show the quota from before the 429
  if (fraction < exhausted_threshold) return false;
  const bool reset_moved_on = mark.reset_time && reset_time && *reset_time > *mark.reset_time + absl::Seconds(1);
  const bool rose = mark.fraction && fraction > *mark.fraction;
  return reset_moved_on || rose;
}

}  // namespace tokenbroker
