#include "lib/selection/account_pool.h"

// Issuing leases (Select, with the session claim protocol when replicas share state), Explain, and
// ending leases without an outcome. Which account is chosen is pool_choose.cc's.

namespace tokenbroker {

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

std::optional<absl::StatusOr<Selection>> AccountPool::SelectHere(const SelectRequest& request) {
  SharedState* shared = shared_state();
  if (shared == nullptr || request.session_id.empty() || !shared->Up()) return SelectOnce(request, nullptr);
  Claim claim;
  absl::StatusOr<Selection> sel = SelectOnce(request, &claim);
  if (!sel.ok() || !claim.needed) return sel;
  return std::nullopt;  // nothing was committed
}

absl::StatusOr<Selection> AccountPool::SelectOnce(const SelectRequest& request, Claim* claim) {
  const absl::Time now = clock_.Now();
  Outbox out(shared_state());
  absl::StatusOr<Selection> sel;
  {
    absl::MutexLock lock(&mu_);
    sel = SelectLocked(request, claim, now, out);
  }
  out.Send();
  return sel;
}

absl::StatusOr<Selection> AccountPool::SelectLocked(const SelectRequest& request, Claim* claim, absl::Time now,
                                                    Outbox& out) {
  if (entries_.empty()) {
    return absl::UnavailableError("no accounts are loaded; add account files to the accounts directory");
  }
  ExpireLeasesLocked(now, out);
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
  const QuotaView admitted = quota_.View(entry.record, entry.quota, request.model, now);
  quota_.RecordUsage(entry.quota, request.model, now, 1);
  ReindexLocked(*chosen, now);
  IssuedLease lease = leases_.Issue(entry.record.id, request.model, now, request.caller);
  if (out.active()) {
    out.Add([id = lease.id, account = entry.record.id, model = request.model](SharedState& s) {
      s.LeaseIssued(id, account, model);
    });
  }
  cooldowns_.OnIssued(entry.record.id, request.model, now, lease.id);
  // Models come from callers: past kMaxTrackedModels an arbitrary one is forgotten (it only loses
  // its fill_first / round_robin position).
  if (last_for_model_.size() >= kMaxTrackedModels && !last_for_model_.contains(request.model)) {
    last_for_model_.erase(last_for_model_.begin());
  }
  last_for_model_[request.model] = entry.record.id;
  // The binding's TTL in the shared state restarts now and then, not on every use: its idle
  // expiry there lags the local one by at most a twentieth of the TTL.
  if (from_session && now - previous_use > options_.session_idle_ttl / 20 && out.active()) {
    out.Add([session = request.session_id](SharedState& s) { s.TouchSession(session); });
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
  sel.egress_id = entry.record.egress_id;
  sel.from_session = from_session;
  sel.lease_id = std::move(lease.id);
  sel.quota_decision = admitted.decision;
  sel.remaining_fraction = admitted.fraction;
  return sel;
}

Explanation AccountPool::Explain(const SelectRequest& request) {
  const absl::Time now = clock_.Now();
  Outbox outbox(shared_state());
  Explanation out;
  {
    absl::MutexLock lock(&mu_);
    ExpireLeasesLocked(now, outbox);
    std::optional<std::string> bound;
    if (!request.session_id.empty()) bound = sessions_.Peek(request.session_id, now);
    Evaluation ev = Evaluate(request, now, bound);
    out.policy = options_.policy;
    out.from_session = ev.from_session;
    if (ev.chosen) out.chosen_account_id = entries_[*ev.chosen].record.id;
    for (size_t i : ev.ranked) out.accounts.push_back(ev.verdicts[i]);
    for (AccountVerdict& v : ev.verdicts) {
      if (v.rank == 0) out.accounts.push_back(std::move(v));
    }
  }
  outbox.Send();
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

void AccountPool::ExpireLeasesLocked(absl::Time now, Outbox& out) {
  for (const Lease& lease : leases_.Expire(now)) {
    EndLeaseLocked(lease);
    if (out.active()) out.Add([id = lease.id](SharedState& s) { s.LeaseEnded(id); });
  }
}

void AccountPool::ReleaseLease(const std::string& lease_id) {
  Outbox out(shared_state());
  {
    absl::MutexLock lock(&mu_);
    std::optional<Lease> lease = leases_.End(lease_id);
    if (!lease) return;
    // Given back unused: it spent no quota.
    if (auto it = index_.find(lease->account); it != index_.end()) {
      quota_.ForgetLease(entries_[it->second].quota, lease->model, lease->expires - options_.lease_timeout);
    }
    EndLeaseLocked(*lease);
    out.Add([lease_id](SharedState& s) { s.LeaseEnded(lease_id); });
  }
  out.Send();
}

}  // namespace tokenbroker
