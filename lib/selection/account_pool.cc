#include "lib/selection/account_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

// The pool's registry: loading, listing, credentials, quota settings and observations. Selection
// is in pool_selection.cc, leases and outcomes in pool_outcomes.cc, what other replicas change in
// pool_replication.cc; the rules themselves in eligibility, ranking and lib/quota/quota_book.

namespace tokenbroker {

AccountPool::AccountPool(PoolOptions options, const Clock& clock)
    : options_(options),
      clock_(clock),
      sessions_(options.session_idle_ttl, options.max_sessions),
      cooldowns_(options.cooldowns),
      leases_(options.lease_timeout, options.max_leases) {}

void AccountPool::Load(std::vector<AccountRecord> records) {
  auto by_id = [](const AccountRecord& a, const AccountRecord& b) { return a.id < b.id; };
  // AccountStore::LoadAll hands them sorted: sorting again would move every record (start-up).
  if (!std::is_sorted(records.begin(), records.end(), by_id)) std::sort(records.begin(), records.end(), by_id);
  absl::MutexLock lock(&mu_);
  std::vector<Entry> next;
  next.reserve(records.size());
  for (AccountRecord& rec : records) {
    Entry entry;
    if (auto it = index_.find(rec.id); it != index_.end()) {
      const Entry& old = entries_[it->second];
      entry.last_used = old.last_used;
      entry.in_flight = old.in_flight;
      entry.quota = old.quota;
      entry.credits_until = old.credits_until;
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
      // Until the monitor's onboarding finds a project (the file may have been given one since).
      if (rec.project_id.empty()) rec.no_project_reason = old.record.no_project_reason;
      // A disable decided at run time stands even if the file could not record it.
      if (old.record.disabled && !rec.disabled) {
        rec.disabled = true;
        rec.disabled_reason = old.record.disabled_reason;
        rec.suspended = old.record.suspended;
        rec.suspension_message = old.record.suspension_message;
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
    return !e.record.disabled && !e.record.proxy_disabled && e.record.egress_problem.empty();
  }));
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
    v.disabled = e.record.disabled || !e.record.egress_problem.empty();
    v.disabled_reason = e.record.disabled || e.record.egress_problem.empty() ? e.record.disabled_reason
                                                                             : e.record.egress_problem;
    v.suspended = e.record.suspended;
    v.suspension_message = e.record.suspension_message;
    v.egress_id = e.record.egress_id;
    v.proxy_disabled = e.record.proxy_disabled;
    v.protected_models = e.record.protected_models;
    if (!e.record.access_token.empty()) v.token_expiry = e.record.access_expiry;
    if (e.last_used != absl::InfinitePast()) v.last_used = e.last_used;
    v.quotas = e.record.quotas;
    v.buckets = e.record.buckets;
    v.quota_forbidden = e.record.quota_forbidden;
    v.bound_sessions = sessions_.CountFor(e.record.id);
    v.cooldowns = cooldowns_.List(e.record.id, now);
    v.validation_url = cooldowns_.ValidationUrl(e.record.id);
    v.in_flight = e.in_flight;
    v.failure_streak = cooldowns_.Streak(e.record.id);
    if (e.credits_until > now) v.credits_exhausted_until = e.credits_until;
    v.no_project_reason = e.record.no_project_reason;
    out.push_back(std::move(v));
  }
  return out;
}

absl::StatusOr<Credentials> AccountPool::GetCredentials(const std::string& account_id) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = index_.find(account_id);
  if (it == index_.end()) return absl::NotFoundError(absl::StrCat("no account ", account_id));
  const AccountRecord& rec = entries_[it->second].record;
  return Credentials{rec.refresh_token, rec.access_token, rec.access_expiry, rec.disabled, rec.egress_id};
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

bool AccountPool::Suspend(const std::string& account_id, const std::string& message) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(account_id);
  if (it == index_.end()) return false;
  AccountRecord& rec = entries_[it->second].record;
  if (rec.suspended) return false;
  rec.suspended = true;
  rec.suspension_message = message;
  rec.disabled = true;
  rec.disabled_reason = SuspendedReason(message);
  runtime_disabled_[account_id] = rec.disabled_reason;
  return true;
}

void AccountPool::SetFamilies(std::shared_ptr<const FamilyMap> families) {
  absl::MutexLock lock(&mu_);
  quota_.set_families(std::move(families));
  model_index_.clear();  // ranks read the families; rebuilt on next use
}

std::shared_ptr<const FamilyMap> AccountPool::families() const {
  absl::ReaderMutexLock lock(&mu_);
  return quota_.families_ptr();
}

std::vector<std::string> AccountPool::ExpiringBefore(absl::Time deadline) const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const Entry& e : entries_) {
    if (e.record.disabled || e.record.proxy_disabled || !e.record.egress_problem.empty()) continue;
    if (e.record.access_expiry < deadline) out.push_back(e.record.id);
  }
  return out;
}

void AccountPool::HoldAccount(const std::string& account_id, absl::Time until, const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (index_.contains(account_id)) cooldowns_.Hold(account_id, until, reason);
}

void AccountPool::SetQuotaSettings(const QuotaSettings& settings) {
  absl::MutexLock lock(&mu_);
  quota_.set_settings(settings);
  model_index_.clear();  // every rank may change; rebuilt on next use
}

QuotaSettings AccountPool::quota_settings() const {
  absl::ReaderMutexLock lock(&mu_);
  return quota_.settings();
}

void AccountPool::UpdateQuota(const std::vector<QuotaObservation>& observations) {
  const absl::Time now = clock_.Now();
  absl::MutexLock lock(&mu_);
  std::vector<std::pair<const std::string*, size_t>> touched;  // (model, entry) whose rank may change
  for (const QuotaObservation& o : observations) {
    auto it = index_.find(o.account_id);
    if (it == index_.end()) continue;
    Entry& entry = entries_[it->second];
    const QuotaBook::Observed seen = quota_.Observe(entry.record, entry.quota, o);
    if (seen.ends_quota_cooldown) {
      if (o.bucket.empty()) {
        cooldowns_.EndQuotaCooldown(entry.record.id, o.model);
      } else {
        cooldowns_.EndFamilyQuotaCooldown(entry.record.id, quota_.families().OfGroup(o.family));
      }
    }
    if (!seen.applied) continue;
    if (o.bucket.empty() && !o.model.empty()) {
      touched.emplace_back(&o.model, it->second);
    } else {  // a bucket, or the account's tier or project: every model's rank may change
      ReindexLocked(it->second, now);
    }
  }
  for (const auto& [model, i] : touched) {
    if (auto idx = model_index_.find(*model); idx != model_index_.end()) ReindexOne(*idx->second, *model, i, now);
  }
}

size_t AccountPool::TrackedModels() const {
  absl::ReaderMutexLock lock(&mu_);
  return last_for_model_.size();
}

absl::Duration AccountPool::quota_lag() const {
  absl::ReaderMutexLock lock(&mu_);
  return quota_.lag();
}

std::map<std::string, int64_t> AccountPool::RebindCounts() const {
  absl::ReaderMutexLock lock(&mu_);
  return rebinds_;
}

}  // namespace tokenbroker
