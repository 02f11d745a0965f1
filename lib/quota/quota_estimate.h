#pragma once

// Predictive admission (docs/ARCHITECTURE.md §6): between two observations of an account's quota the
// broker keeps handing out leases against it, so the last observed fraction overstates what is
// left. QuotaUsage counts an account's leases per model family and learns from successive
// observations what one call costs, so that
//
//   estimated remaining = observed − (leases issued since the observation) × (cost of one call)
//
// and the quota decision is taken on the estimate. Pure logic on given times.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/account.h"

namespace tokenbroker {

// The quota family a model draws from by the built-in rules (FamilyMap::Default: "3p" for
// third-party models, "image" for image models, else "gemini"). Models of one family share their
// account's buckets. The pool asks its QuotaBook's map, which an operator may override.
absl::string_view ModelFamily(absl::string_view model);

// A third-party (Claude, GPT) model by its name, whatever family a map puts it in.
bool IsThirdPartyModel(absl::string_view model);

// The family a bucket of retrieveUserQuotaSummary limits by the built-in rules, from its group id
// ("gemini", "3p", or a name ModelFamily understands).
absl::string_view FamilyOfGroup(absl::string_view group_id);

// One observation of a quota (a model's, or a bucket's): what was seen, and when.
struct QuotaReading {
  double fraction = 0;
  std::optional<absl::Time> reset_time;
  absl::Time observed = absl::InfinitePast();
};

// One account's estimate of one quota's remaining fraction, with what it is made of.
struct QuotaEstimate {
  double observed = 0;      // the last observed fraction (1.0 when its reset time has passed)
  double estimated = 0;     // observed − leases × cost, never below 0
  int64_t leases = 0;       // leases counted against the observation
  double cost = 0;          // fraction of the quota one call is taken to cost
  bool cost_learned = false;  // false: the cautious prior
  bool reset_passed = false;  // the observation's reset time has passed: counted from the reset
};

// Lease counts and learned call costs of one account. Leases are counted per model family (every
// quota of a family is spent by the same calls); costs are learned per quota ("cost key": the
// family, for per-model observations, or a bucket id such as "gemini-weekly": one call is a larger
// share of a 5-hour bucket than of a weekly one). Not thread-safe: the owner locks. Memory is
// bounded: at most kMaxTimesPerFamily lease times per family (the oldest go first), one entry per
// family (ModelFamily has a fixed set of answers) and at most kMaxCostKeys costs.
class QuotaUsage {
 public:
  static constexpr size_t kMaxTimesPerFamily = 4096;
  static constexpr size_t kMaxCostKeys = 32;

  // `count` leases for a model of `family` were issued at `at` (here, or on another replica:
  // times may arrive out of order).
  void Record(absl::string_view family, absl::Time at, int count = 1);

  // Leases of the family issued at or after `since`.
  int64_t IssuedSince(absl::string_view family, absl::Time since) const;

  // Learns the cost of one call against quota `cost_key` from two readings of it: `before` and
  // `after` must be in the same window (same reset time) and `after` later; the drop in fraction
  // is divided by the family's leases issued between them (each shifted back by `lag`, the quota
  // API's delay); a pair without leases between them or without a drop teaches nothing. Returns
  // the sample when one was taken. Readings taken at one moment teach once per cost key.
  std::optional<double> Learn(absl::string_view family, absl::string_view cost_key, const QuotaReading& before,
                              const QuotaReading& after, absl::Duration lag);

  // Learns from a quota 429: the `calls` leases issued since a reading at `fraction` spent all of
  // it, so one call costs at most fraction / calls (the cautious end is taken).
  std::optional<double> LearnExhausted(absl::string_view cost_key, double fraction, int64_t calls);

  // Un-counts one lease issued at `at` (its call never reached the upstream, or failed without
  // spending quota). Nothing when no lease of the family was counted at that time.
  void Forget(absl::string_view family, absl::Time at);

  // The learned cost of one call against `cost_key`, unset until a sample was taken.
  std::optional<double> Cost(absl::string_view cost_key) const;

  // The estimate of quota `cost_key` (of a model of `family`) read as `q`, at `now`: the observed
  // fraction minus the leases issued since `q.observed − lag`, or, once q's reset time has passed,
  // a full quota minus the leases since the reset. `prior` is the cost used until one is learned.
  QuotaEstimate Estimate(absl::string_view family, absl::string_view cost_key, const QuotaReading& q,
                         absl::Time now, absl::Duration lag, double prior) const;

  // Forgets lease times before `horizon` (no observation still in use is that old).
  void Trim(absl::Time horizon);

 private:
  struct Family {
    std::string name;
    std::vector<absl::Time> issued;  // sorted; [head, end) are live
    size_t head = 0;
  };
  struct CostSums {
    std::string key;
    double sum_drop = 0;  // decayed sums of observed drops and of the leases that made them
    double sum_calls = 0;
    absl::Time last_learned = absl::InfinitePast();
  };
  Family* Find(absl::string_view family);
  const Family* Find(absl::string_view family) const;
  const CostSums* FindCost(absl::string_view key) const;
  CostSums& CostFor(absl::string_view key);
  static void Compact(Family& f);

  std::vector<Family> families_;
  std::vector<CostSums> costs_;
};

// When a quota cooldown began on (account, model), and what the quota looked like then: the
// yardstick an observation must beat to end it early (docs/ARCHITECTURE.md §5 "no stale clears").
struct QuotaMark {
  std::string model;
  absl::Time at;                          // when the 429 was applied
  std::optional<double> fraction;         // last observed fraction at that moment
  std::optional<absl::Time> reset_time;   // last observed reset time at that moment
};

// Whether an observation of (fraction, reset_time) taken at `observed` from a source that tells
// the truth about the model may end the quota cooldown described by `mark`: it was taken after the
// cooldown began (allowing for the quota API's `lag`), it is not itself exhausted, and it shows a
// real reset — its reset time moved on past the one known at the 429, or its fraction rose above
// the one known then. With nothing on record at the 429 there is no yardstick: false (the
// cooldown ends by itself).
bool ObservationEndsExhaustion(const QuotaMark& mark, double fraction, std::optional<absl::Time> reset_time,
                               absl::Time observed, absl::Duration lag, double exhausted_threshold);

}  // namespace tokenbroker
