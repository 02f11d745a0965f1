#include "lib/broker/caller_admission.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/quota/quota_estimate.h"

namespace tokenbroker {

// --- LocalCallerLedger ---

CallerUsage LocalCallerLedger::UsageOf(const Record& r, bool with_accounts) {
  CallerUsage u;
  u.in_flight = r.leases + r.pending;
  u.pending = r.pending;
  u.waiting = r.waiting;
  u.accounts = static_cast<int>(r.accounts.size());
  if (!with_accounts) return u;  // the per-call path of a policy without shares: O(1)
  for (const auto& [account, held] : r.accounts) {
    ++u.tier_accounts[held.first];
    u.held.insert(account);
  }
  return u;
}

void LocalCallerLedger::EndLocked(const Held& held) {
  auto rec = records_.find(held.entry);
  if (rec == records_.end()) return;
  --rec->second.leases;
  if (auto a = rec->second.accounts.find(held.account); a != rec->second.accounts.end() && --a->second.second <= 0) {
    rec->second.accounts.erase(a);
  }
  DropIfIdleLocked(held.entry);
}

void LocalCallerLedger::DropIfIdleLocked(const std::string& entry) {
  auto rec = records_.find(entry);
  if (rec != records_.end() && rec->second.leases <= 0 && rec->second.pending <= 0 && rec->second.waiting <= 0) {
    records_.erase(rec);
  }
}

void LocalCallerLedger::ExpireLocked(absl::Time now) {
  while (!by_expiry_.empty() && by_expiry_.begin()->first <= now) {
    auto it = leases_.find(by_expiry_.begin()->second);
    by_expiry_.erase(by_expiry_.begin());
    if (it == leases_.end()) continue;
    EndLocked(it->second);
    leases_.erase(it);
  }
}

AdmissionDecision LocalCallerLedger::Reserve(const std::string& entry, int /*max_inflight*/, absl::Time now,
                                             bool with_accounts,
                                             const std::function<AdmissionDecision(const CallerUsage&)>& decide) {
  absl::MutexLock lock(&mu_);
  ExpireLocked(now);
  Record& r = records_[entry];
  AdmissionDecision d = decide(UsageOf(r, with_accounts));
  if (d.refused_limit) {
    DropIfIdleLocked(entry);
  } else {
    ++r.pending;
  }
  return d;
}

void LocalCallerLedger::RecordLocked(Record& r, const std::string& entry, const std::string& lease_id,
                                     const std::string& account, Tier tier, absl::Time expires) {
  if (leases_.contains(lease_id)) return;  // never counted twice
  ++r.leases;
  auto& held = r.accounts[account];
  held.first = tier;
  ++held.second;
  leases_.emplace(lease_id, Held{entry, account, tier, expires});
  by_expiry_.emplace(expires, lease_id);
}

LedgerCommit LocalCallerLedger::Commit(const std::string& entry, const std::string& lease_id,
                                       const std::string& account, Tier tier, absl::Time /*now*/, absl::Time expires,
                                       const CommitLimits& /*limits*/) {
  absl::MutexLock lock(&mu_);
  Record& r = records_[entry];
  if (r.pending > 0) --r.pending;
  RecordLocked(r, entry, lease_id, account, tier, expires);
  LedgerCommit out;
  out.in_flight = r.leases + r.pending;
  return out;
}

void LocalCallerLedger::RecordLease(const std::string& entry, const std::string& lease_id, const std::string& account,
                               Tier tier, absl::Time expires) {
  absl::MutexLock lock(&mu_);
  RecordLocked(records_[entry], entry, lease_id, account, tier, expires);
}

void LocalCallerLedger::Cancel(const std::string& entry) {
  absl::MutexLock lock(&mu_);
  auto rec = records_.find(entry);
  if (rec == records_.end()) return;
  if (rec->second.pending > 0) --rec->second.pending;
  DropIfIdleLocked(entry);
}

std::optional<std::string> LocalCallerLedger::Release(const std::string& lease_id) {
  absl::MutexLock lock(&mu_);
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) return std::nullopt;
  std::string entry = it->second.entry;
  by_expiry_.erase({it->second.expires, lease_id});
  EndLocked(it->second);
  leases_.erase(it);
  return entry;
}

bool LocalCallerLedger::StartWaiting(const std::string& entry, int max) {
  absl::MutexLock lock(&mu_);
  Record& r = records_[entry];
  if (r.waiting >= max) {
    DropIfIdleLocked(entry);
    return false;
  }
  ++r.waiting;
  return true;
}

void LocalCallerLedger::StopWaiting(const std::string& entry) {
  absl::MutexLock lock(&mu_);
  auto rec = records_.find(entry);
  if (rec == records_.end()) return;
  if (rec->second.waiting > 0) --rec->second.waiting;
  DropIfIdleLocked(entry);
}

int LocalCallerLedger::Waiting(const std::string& entry) {
  absl::MutexLock lock(&mu_);
  auto rec = records_.find(entry);
  return rec == records_.end() ? 0 : rec->second.waiting;
}

std::map<std::string, CallerUsage> LocalCallerLedger::Usage(absl::Time now) {
  absl::MutexLock lock(&mu_);
  ExpireLocked(now);
  std::map<std::string, CallerUsage> out;
  for (const auto& [entry, r] : records_) out.emplace(entry, UsageOf(r));
  return out;
}

// --- CallerAdmission ---

CallerAdmission::CallerAdmission(const Clock& clock, absl::Duration lease_timeout,
                                 std::unique_ptr<CallerLedger> ledger)
    : clock_(clock), lease_timeout_(lease_timeout), ledger_(std::move(ledger)) {}

void CallerAdmission::SetPolicies(std::shared_ptr<const CallerPolicies> policies) {
  absl::MutexLock lock(&mu_);
  policies_ = std::move(policies);
  // Counters of entries no longer configured go (their names came from an older file).
  auto configured = [this](const std::string& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return entry == kUnlisted || (policies_ != nullptr && policies_->entries().contains(entry));
  };
  for (auto it = issued_.begin(); it != issued_.end();) it = configured(it->first) ? std::next(it) : issued_.erase(it);
  for (auto it = refused_.begin(); it != refused_.end();) {
    it = configured(it->first.first) ? std::next(it) : refused_.erase(it);
  }
}

bool CallerAdmission::enabled() const {
  absl::MutexLock lock(&mu_);
  return policies_ != nullptr;
}

void CallerAdmission::SetPoolShape(PoolShape shape) {
  absl::MutexLock lock(&mu_);
  shape_ = std::move(shape);
}

void CallerAdmission::CountRefusal(const std::string& entry, absl::string_view limit) {
  absl::MutexLock lock(&mu_);
  ++refused_[{entry, std::string(limit)}];
}

absl::StatusOr<std::optional<CallerGrant>> CallerAdmission::Admit(const std::string& caller,
                                                                  const std::string& model) {
  std::shared_ptr<const CallerPolicies> policies;
  std::shared_ptr<const FamilyMap> families;
  {
    absl::MutexLock lock(&mu_);
    policies = policies_;
    families = families_;
  }
  if (policies == nullptr) return std::optional<CallerGrant>();
  const CallerPolicy* policy = policies->Find(caller);
  if (policy == nullptr) {
    CountRefusal(std::string(kUnlisted), "no_policy");
    return absl::PermissionDeniedError(absl::StrCat(
        "caller ", caller, " has no entry in the caller policy file, and the file has no \"default\" entry"));
  }
  if (absl::Status allowed = CheckCallerModel(*policy, model, families->Of(model)); !allowed.ok()) {
    CountRefusal(policy->name, "model");
    return allowed;
  }
  return std::optional<CallerGrant>(CallerGrant{std::move(policies), policy});
}

absl::Status CallerAdmission::LimitError(const CallerPolicy& policy, absl::string_view limit,
                                         absl::string_view detail) {
  CountRefusal(policy.name, limit);
  return CallerLimitError(detail, policy.name, limit, policy.retry_after);
}

absl::StatusOr<std::shared_ptr<const CallerShare>> CallerAdmission::Reserve(const CallerPolicy& policy) {
  const bool shares = policy.max_accounts.set() || !policy.max_tier_accounts.empty();
  PoolShape shape;  // only shares resolve against it
  if (shares) {
    absl::MutexLock lock(&mu_);
    shape = shape_;
  }
  AdmissionDecision d =
      ledger_->Reserve(policy.name, policy.max_inflight, clock_.Now(), shares, [&](const CallerUsage& usage) {
    return DecideAdmission(policy, usage, shape);
  });
  if (d.refused_limit) return LimitError(policy, *d.refused_limit, d.detail);
  return std::shared_ptr<const CallerShare>(std::move(d.share));
}

CallerAdmission::Committed CallerAdmission::Commit(const CallerPolicy& policy, const std::string& lease_id,
                                                  const std::string& account, Tier tier) {
  CommitLimits limits;
  if (policy.max_accounts.set() || policy.max_tier_accounts.contains(tier)) {
    absl::MutexLock lock(&mu_);
    if (policy.max_accounts.set()) limits.max_accounts = policy.max_accounts.Resolve(shape_.accounts);
    if (auto t = policy.max_tier_accounts.find(tier); t != policy.max_tier_accounts.end()) {
      auto size = shape_.by_tier.find(tier);
      limits.max_tier_accounts = t->second.Resolve(size == shape_.by_tier.end() ? 0 : size->second);
    }
  }
  const absl::Time now = clock_.Now();
  LedgerCommit c = ledger_->Commit(policy.name, lease_id, account, tier, now, now + lease_timeout_, limits);
  Committed out;
  if (!c.committed) {
    out.refused_limit = c.refused_limit;
    out.detail = absl::StrCat("caller ", policy.name, " holds leases on as many accounts as its ", c.refused_limit,
                              " allows across the fleet; report outcomes to free them");
    auto share = std::make_shared<CallerShare>();
    share->caller = policy.name;
    if (c.refused_limit == "max_accounts") {
      share->all = true;
    } else {
      share->tiers.push_back(tier);
    }
    share->held = std::move(c.held);
    out.retry_share = std::move(share);
    return out;
  }
  {
    absl::MutexLock lock(&mu_);
    ++issued_[policy.name];
  }
  if (policy.max_inflight > 0) out.leases_left = std::max(0, policy.max_inflight - c.in_flight);
  return out;
}

bool CallerAdmission::StartWaiting(const CallerPolicy& policy) {
  return ledger_->StartWaiting(policy.name, policy.max_waiting);
}

std::map<std::string, CallerStats> CallerAdmission::Stats() {
  std::map<std::string, CallerUsage> usage = ledger_->Usage(clock_.Now());
  std::map<std::string, CallerStats> out;
  absl::MutexLock lock(&mu_);
  if (policies_ != nullptr) {
    for (const auto& [name, policy] : policies_->entries()) {
      CallerStats& s = out[name];
      if (auto u = usage.find(name); u != usage.end()) s.usage = std::move(u->second);
    }
  }
  for (const auto& [entry, n] : issued_) out[entry].issued = n;
  for (const auto& [key, n] : refused_) out[key.first].refused[key.second] = n;
  return out;
}

}  // namespace tokenbroker
