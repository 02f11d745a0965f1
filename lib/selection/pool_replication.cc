#include "lib/selection/account_pool.h"

// What other replicas changed (SharedStateListener), applied to this replica's view by the same
// rules as local events, and the snapshot this replica re-uploads after the shared state was lost.

namespace tokenbroker {

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
  const UpstreamError parsed = ParseUpstreamError(o.http_status, o.retry_after, o.error_body, o.at);
  ApplyOutcomeLocked(it->second, o.model, parsed, /*lease_id=*/"", /*issued_at=*/std::nullopt, o.at);
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
  if (std::optional<std::string> message = SuspensionMessageOf(reason)) {
    rec.suspended = true;
    rec.suspension_message = *std::move(message);
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
  quota_.RecordUsage(entries_[it->second].quota, model, at, count);
  ReindexLocked(it->second, now);
}

void AccountPool::OnRemoteLeaseEnd(const std::string& lease_id) {
  Outbox out(shared_state());
  {
    absl::MutexLock lock(&mu_);
    if (std::optional<Lease> lease = leases_.End(lease_id)) EndLeaseLocked(*lease, out);
  }
  out.Send();
}

void AccountPool::OnRemoteReset(const std::string& account, const std::string& model, bool enabled) {
  absl::MutexLock lock(&mu_);
  if (auto it = index_.find(account); it != index_.end()) ResetLocked(it->second, model, enabled);
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
