#include "lib/selection/account_pool.h"

// Issuing leases (Select, with the session claim protocol when replicas share state), Explain, and
// ending leases without an outcome. Which account is chosen is pool_choose.cc's.

namespace tokenbroker {

absl::StatusOr<Selection> AccountPool::Select(const SelectRequest& request) {
  SharedState* shared = shared_state();
  if (shared == nullptr) return SelectOnce(request, nullptr);
  // With replicas sharing state, a choice may need two round trips before it is committed: a
  // session binding made here is claimed in the shared state first (when another replica's claim
  // came first, that account is used when it is eligible here), and under a fleet-wide lease cap or
  // a half-open probe the account is admitted fleet-wide (pool_admission.cc); an account refused
  // there is left out and the next one tried. Bounded: kMaxSelectRounds.
  SelectRequest req = request;
  Refusals refusals;
  int session_claims = 0;
  bool decide_here = false;  // the shared state did not answer: the local count decides
  for (int round = 0; round < kMaxSelectRounds && shared->Up(); ++round) {
    Claim claim;
    absl::StatusOr<Selection> sel = SelectOnce(req, &claim);
    if (!sel.ok()) {
      if (refusals.at_cap > 0 && absl::IsResourceExhausted(sel.status())) {
        return FleetCapError(req, refusals, sel.status());
      }
      return sel;
    }
    if (!claim.needed && !claim.admit) return sel;
    if (claim.admit) {
      std::optional<absl::StatusOr<Selection>> admitted = AdmitAndCommit(*shared, req, claim, refusals);
      if (!admitted) {
        decide_here = true;  // the shared state did not answer: decide here, by the local count
        break;
      }
      if (!absl::IsAborted(admitted->status())) return *std::move(admitted);
      continue;
    }
    if (++session_claims > 3) break;
    std::optional<std::string> winner = shared->ClaimSession(req.session_id, claim.expected, claim.candidate);
    if (!winner) {
      decide_here = true;  // the shared state is unreachable: decide here
      break;
    }
    {
      absl::MutexLock lock(&mu_);
      if (index_.contains(*winner)) sessions_.Bind(req.session_id, *winner, clock_.Now());
      if (*winner == claim.candidate) ++rebinds_[claim.reason];
    }
    // The session has moved (here or elsewhere): rotating again would move it twice.
    req.force_rotate = false;
  }
  if (!decide_here && shared->Up() && (refusals.at_cap > 0 || options_.max_inflight_per_account > 0)) {
    // Every round was spent on accounts the fleet has no room on (or on sessions moving): never
    // past the fleet's cap while the shared state answers.
    return FleetCapError(req, refusals, absl::OkStatus());
  }
  return SelectOnce(req, nullptr);
}

std::optional<absl::StatusOr<Selection>> AccountPool::SelectHere(const SelectRequest& request) {
  SharedState* shared = shared_state();
  if (shared == nullptr || !shared->Up()) return SelectOnce(request, nullptr);
  Claim claim;
  absl::StatusOr<Selection> sel = SelectOnce(request, &claim);
  if (!sel.ok() || (!claim.needed && !claim.admit)) return sel;
  return std::nullopt;  // nothing was committed
}

absl::StatusOr<Selection> AccountPool::SelectOnce(const SelectRequest& request, Claim* claim,
                                                  const Admitted* admitted) {
  const absl::Time now = clock_.Now();
  Outbox out(shared_state());
  absl::StatusOr<Selection> sel;
  {
    absl::MutexLock lock(&mu_);
    sel = SelectLocked(request, claim, now, out, admitted);
  }
  out.Send();
  return sel;
}

absl::StatusOr<Selection> AccountPool::SelectLocked(const SelectRequest& request, Claim* claim, absl::Time now,
                                                    Outbox& out, const Admitted* admitted) {
  if (entries_.empty()) {
    return absl::UnavailableError("no accounts are loaded; add account files to the accounts directory");
  }
  ExpireLeasesLocked(now, out);
  std::optional<std::string> bound;
  absl::Time previous_use = absl::InfinitePast();
  if (!request.session_id.empty()) bound = sessions_.Lookup(request.session_id, now, &previous_use);
  bool from_session = false;
  if (admitted != nullptr) {
    std::optional<size_t> chosen = AdmittedChoiceLocked(request, *admitted, bound, now, &from_session);
    if (!chosen) return absl::AbortedError("the admitted account is no longer eligible here");
    return CommitLocked(request, *chosen, from_session, bound, previous_use, now, out, admitted);
  }
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
  if (claim != nullptr && NeedsAdmissionLocked(*chosen, request, now, claim)) return Selection{};
  if (shared_state() != nullptr && options_.max_inflight_per_account > 0) {
    admission_fallbacks_.fetch_add(1, std::memory_order_relaxed);
  }
  return CommitLocked(request, *chosen, from_session, bound, previous_use, now, out, nullptr);
}

absl::StatusOr<Selection> AccountPool::CommitLocked(const SelectRequest& request, size_t chosen, bool from_session,
                                                    const std::optional<std::string>& bound, absl::Time previous_use,
                                                    absl::Time now, Outbox& out, const Admitted* admitted) {
  const char* rebind_reason = !bound ? "new" : request.force_rotate ? "force_rotate" : "ineligible";
  Entry& entry = entries_[chosen];
  entry.last_used = now;
  ++entry.in_flight;
  // The decision this lease was admitted on (before it counts against the estimate).
  const QuotaView admitted_on = quota_.View(entry.record, entry.quota, request.model, now);
  quota_.RecordUsage(entry.quota, request.model, now, 1);
  ReindexLocked(chosen, now);
  if (std::optional<Lease> evicted = leases_.MakeRoom()) {
    // The table is full: the biggest holder's oldest lease ends as if it had timed out.
    leases_evicted_.fetch_add(1, std::memory_order_relaxed);
    EndUnreportedLeaseLocked(*evicted, out);
  }
  IssuedLease lease = admitted != nullptr ? leases_.IssueAs(admitted->lease_id, entry.record.id, request.model, now,
                                                            request.caller, request.quota_group)
                                          : leases_.Issue(entry.record.id, request.model, now, request.caller,
                                                          request.quota_group);
  if (out.active()) {
    out.Add([id = lease.id, account = entry.record.id, model = request.model](SharedState& s) {
      s.LeaseIssued(id, account, model);
    });
  }
  const absl::string_view family = quota_.families().Of(request.model);
  cooldowns_.OnIssued(entry.record.id, request.model, now, lease.id, FamilyRef{family, request.quota_group});
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
  sel.model_family = std::string(family);
  sel.egress_id = entry.record.egress_id;
  sel.from_session = from_session;
  sel.lease_id = std::move(lease.id);
  sel.quota_decision = admitted_on.decision;
  sel.remaining_fraction = admitted_on.fraction;
  if (entry.credits_until > now) sel.credits_exhausted_until = entry.credits_until;
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

void AccountPool::EndLeaseLocked(const Lease& lease, Outbox& out) {
  // Its fleet-wide reservation and probe token (issue 16) go with it; a probe is released whether
  // or not a cap is set.
  const FamilyRef family{quota_.families().Of(lease.model), lease.group};
  if (out.active() &&
      (options_.max_inflight_per_account > 0 || cooldowns_.IsProbe(lease.account, lease.model, lease.id, family))) {
    std::vector<std::string> family_scopes;
    for (absl::string_view f : {family.family, family.group}) {
      if (!f.empty()) family_scopes.push_back(absl::StrCat("@", f));
    }
    out.Add([account = lease.account, model = lease.model, id = lease.id,
             family_scopes = std::move(family_scopes)](SharedState& s) {
      s.ReleaseAdmission(account, model, id, family_scopes);
    });
  }
  // A lease that ends without a report (released, timed out) frees the half-open probe it held.
  cooldowns_.OnLeaseEnded(lease.account, lease.model, lease.id, family);
  if (auto it = index_.find(lease.account); it != index_.end() && entries_[it->second].in_flight > 0) {
    --entries_[it->second].in_flight;
    ReindexLocked(it->second, clock_.Now());
  }
}

void AccountPool::EndUnreportedLeaseLocked(const Lease& lease, Outbox& out) {
  EndLeaseLocked(lease, out);
  if (out.active()) out.Add([id = lease.id](SharedState& s) { s.LeaseEnded(id); });
}

void AccountPool::ExpireLeasesLocked(absl::Time now, Outbox& out) {
  for (const Lease& lease : leases_.Expire(now)) EndUnreportedLeaseLocked(lease, out);
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
    EndUnreportedLeaseLocked(*lease, out);
  }
  out.Send();
}

}  // namespace tokenbroker
