#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/account.h"
#include "lib/common/upstream_error.h"
#include "lib/quota/family_map.h"
#include "lib/quota/quota.h"
#include "lib/quota/quota_estimate.h"

namespace tokenbroker {

// What one account knows of its quota besides the readings in its record (AccountRecord::quotas,
// ::buckets): the leases counted against it and the yardsticks of its quota cooldowns.
struct AccountQuota {
  QuotaUsage usage;              // leases per model family, learned call cost
  std::vector<QuotaMark> marks;  // quota cooldowns' yardsticks, one per model, at most kMaxMarks
  static constexpr size_t kMaxMarks = 16;
};

// What quota validation says about one (account, model) now. The model's own observation and
// every bucket of its family are estimated; the lowest estimate is the one that binds.
struct QuotaView {
  bool fresh = false;                    // validation on and some observation within cache_ttl
  QuotaEstimate estimate;                // of the binding quota, when fresh
  QuotaReading reading;                  // its last observation
  absl::string_view cost_key;            // its cost key (the family, or a bucket id): valid while the record is
  QuotaDecision decision = QuotaDecision::kUnknown;
  std::optional<double> fraction;        // to rank by: the estimate, or (validation off) the hint
  std::optional<absl::Time> reset_time;  // of the binding quota, while it lies ahead
};

// The quota rules of docs/ARCHITECTURE.md "Quota": the settings, what the pool has learned across
// accounts (the quota API's lag, the cost of one call by family/bucket and tier), and every rule
// that reads or changes an account's quota knowledge. Not thread-safe: its owner (AccountPool)
// serialises access.
class QuotaBook {
 public:
  void set_settings(const QuotaSettings& settings) { settings_ = settings; }
  const QuotaSettings& settings() const { return settings_; }
  // The model → family map (FamilyMap::Default unless an operator's file replaced it).
  void set_families(std::shared_ptr<const FamilyMap> families) { families_ = std::move(families); }
  const FamilyMap& families() const { return *families_; }
  const std::shared_ptr<const FamilyMap>& families_ptr() const { return families_; }
  bool enabled() const { return settings_.enabled; }
  // How far behind the quota API's answers are taken to be (learned; at most max_lag).
  absl::Duration lag() const { return lag_; }

  QuotaView View(const AccountRecord& rec, const AccountQuota& quota, absl::string_view model, absl::Time now) const;
  // Not to be handed out for `model`: the quota API forbids the account, or the binding estimate
  // is EXHAUSTED (or below half a call). Always false with validation off.
  bool Exhausted(const AccountRecord& rec, const AccountQuota& quota, absl::string_view model, absl::Time now) const;
  // The quota API answered 403 for the account within cache_ttl (validation on).
  bool Forbidden(const AccountRecord& rec, absl::Time now) const;
  // Why `model` is exhausted on the account, and when it resets (for Explain and errors).
  std::string ExhaustedDetail(const AccountRecord& rec, const AccountQuota& quota, absl::string_view model,
                              absl::Time now, std::optional<absl::Time>* resets) const;
  // When the account's rank for `model` changes by itself (a reading turning stale, a quota
  // resetting); InfiniteFuture when never.
  absl::Time NextChange(const AccountRecord& rec, absl::string_view model, absl::Time now) const;

  // Counts `count` leases for `model` issued at `at` (validation on only).
  void RecordUsage(AccountQuota& quota, absl::string_view model, absl::Time at, int count);
  // A lease given back unused (issued at `issued_at`) spent no quota.
  void ForgetLease(AccountQuota& quota, absl::string_view model, absl::Time issued_at);
  // What a reported failure teaches: a failed call spent nothing (its lease, issued at `issued_at`
  // here, is un-counted), and a quota 429 prices the calls since the last observation and is
  // itself a reading: the binding quota, and every model of the family, spent at `now` until
  // `now + delay` (or their known reset). Quota 429s and rate limits also remember the yardstick
  // their cooldown began against (QuotaMark). Returns whether the account's rank may have changed.
  bool LearnFromOutcome(AccountRecord& rec, AccountQuota& quota, absl::string_view model,
                        const UpstreamError& parsed, std::optional<absl::Time> issued_at, absl::Time now);

  // What one observation (from the monitor) changes.
  struct Observed {
    bool applied = false;            // the account's rank may have changed
    bool ends_quota_cooldown = false;  // the model's quota cooldown may end now
  };
  // Applies `o` to the account: late (older) news and readings that may predate a reported 429 are
  // ignored; a newer reading teaches the cost of one call and the lag. A quota cooldown ends only as
  // ObservationEndsExhaustion allows, and never on a source known to lie about the model.
  Observed Observe(AccountRecord& rec, AccountQuota& quota, const QuotaObservation& o);
  // An operator's reset: forgets what reported 429s wrote (readings from outcomes of the model's
  // family, or all when `model` is empty) and the yardsticks of the lifted cooldowns.
  void ForgetReported(AccountRecord& rec, AccountQuota& quota, const std::string& model);

 private:
  // The cost of one call taken for an account that has not learned its own yet.
  double CostPrior(absl::string_view cost_key, Tier tier) const;
  void ShareLearnedCost(const AccountRecord& rec, const AccountQuota& quota, absl::string_view cost_key);
  void MarkExhaustion(const AccountRecord& rec, AccountQuota& quota, absl::string_view model, absl::Time at);
  void LearnLag(absl::Duration at_least);
  void LearnLagFromSpent(const QuotaReading& spent, const QuotaObservation& o);
  void ObserveBucket(AccountRecord& rec, AccountQuota& quota, const QuotaObservation& o);

  QuotaSettings settings_;
  std::shared_ptr<const FamilyMap> families_ = FamilyMap::Default();
  absl::Duration lag_ = absl::ZeroDuration();
  // The cost of one call last learned by any account, by "cost key/tier" and by cost key: the prior
  // of accounts that have not learned theirs (bounded: families are a fixed set, buckets at most
  // AccountRecord::kMaxBuckets per account and named alike across accounts).
  absl::flat_hash_map<std::string, double> learned_cost_;
};

}  // namespace tokenbroker
