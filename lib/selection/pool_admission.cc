#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/selection/account_pool.h"

// Fleet-wide admission (issue 16, docs/ARCHITECTURE.md §7): with a shared state up, a lease under
// --max_inflight_per_account is reserved fleet-wide before it is issued (one atomic round trip
// that counts every replica's live reservations), and the half-open probe after a cooldown is one
// probe for the fleet (a probe token per (account, scope)). Select runs this off the callers'
// threads (SelectHere answers "needs a round trip"). When the shared state does not answer, the
// local count decides (AdmissionFallbacks counts those leases).

namespace tokenbroker {
namespace {

// How soon a caller refused at the fleet's cap may try again: a report on any replica frees a
// reservation long before its expiry, and no event tells this replica of it.
constexpr absl::Duration kFleetRecheck = absl::Milliseconds(200);

}  // namespace

bool AccountPool::NeedsAdmissionLocked(size_t i, const SelectRequest& request, absl::Time now, Claim* claim) {
  SharedState* shared = shared_state();
  if (shared == nullptr || !shared->Up()) return false;
  const std::string& id = entries_[i].record.id;
  std::vector<std::string> probes =
      cooldowns_.ProbeScopes(id, request.model, now, FamilyRef{quota_.families().Of(request.model), request.quota_group});
  if (options_.max_inflight_per_account <= 0 && probes.empty()) return false;
  claim->admit = true;
  claim->candidate = id;
  claim->probe_scopes = std::move(probes);
  return true;
}

std::optional<size_t> AccountPool::AdmittedChoiceLocked(const SelectRequest& request, const Admitted& admitted,
                                                        const std::optional<std::string>& bound, absl::Time now,
                                                        bool* from_session) {
  auto it = index_.find(admitted.account);
  if (it == index_.end()) return std::nullopt;
  // A session's binding is claimed before admission: one that moved meanwhile is chosen afresh.
  if (!request.session_id.empty() && bound != admitted.account) return std::nullopt;
  const std::optional<std::string> previous = PreviousFor(request, bound);
  const Eligibility e = CheckLocked(it->second, ContextFor(request, previous, now), /*explain=*/false);
  // force_rotate's fallback (no other account) is admitted like any choice.
  if (!e.eligible() && !e.rotated_from) return std::nullopt;
  *from_session = bound.has_value() && !request.force_rotate;
  return it->second;
}

std::optional<absl::StatusOr<Selection>> AccountPool::AdmitAndCommit(SharedState& shared, SelectRequest& req,
                                                                     const Claim& claim, Refusals& refusals) {
  const absl::Time now = clock_.Now();
  AdmissionRequest ask;
  {
    absl::MutexLock lock(&mu_);
    ask.lease_id = leases_.NewId(req.caller);
  }
  ask.account = claim.candidate;
  ask.model = req.model;
  ask.cap = options_.max_inflight_per_account;
  ask.probe_scopes = claim.probe_scopes;
  ask.now = now;
  ask.expires = now + options_.lease_timeout;
  ask.probe_ttl = options_.cooldowns.probe_timeout;
  std::optional<AdmissionResult> answer = shared.Admit(ask);
  if (!answer) return std::nullopt;
  switch (answer->verdict) {
    case AdmissionVerdict::kAdmitted: {
      const Admitted admitted{claim.candidate, ask.lease_id};
      absl::StatusOr<Selection> sel = SelectOnce(req, nullptr, &admitted);
      // Not committed (the account changed here meanwhile): the reservation goes back.
      if (!sel.ok()) shared.ReleaseAdmission(ask.account, ask.model, ask.lease_id);
      return sel;
    }
    case AdmissionVerdict::kAtCap:
      ++refusals.at_cap;
      if (answer->frees && (!refusals.frees || *answer->frees < *refusals.frees)) refusals.frees = answer->frees;
      req.exclude.insert(claim.candidate);
      break;
    case AdmissionVerdict::kProbeElsewhere: {
      // Another replica's probe is out: the account is half-open here too, until its report
      // arrives or the probe token would have expired.
      absl::MutexLock lock(&mu_);
      cooldowns_.ProbeElsewhere(claim.candidate, req.model, now,
                                answer->frees.value_or(now + options_.cooldowns.probe_timeout),
                                FamilyRef{quota_.families().Of(req.model), req.quota_group});
      break;
    }
  }
  return absl::StatusOr<Selection>(absl::AbortedError("not admitted fleet-wide"));
}

absl::Status AccountPool::FleetCapError(const SelectRequest& request, const Refusals& refusals,
                                        const absl::Status& local) const {
  absl::Duration retry = kFleetRecheck;
  if (refusals.frees) retry = std::clamp(*refusals.frees - clock_.Now(), absl::ZeroDuration(), kFleetRecheck);
  // What is left here (`local`) was chosen with the refused accounts left out: its own counts would
  // name them "excluded", so only its delay is kept when it is sooner.
  if (std::optional<absl::Duration> sooner = RetryDelay(local); sooner && *sooner < retry) retry = *sooner;
  return NoAccountAvailableError(
      absl::StrCat("no account can serve model ", request.model, " now: ", refusals.at_cap,
                   refusals.at_cap == 1 ? " account" : " accounts", " tried at the fleet-wide lease cap",
                   " (max_inflight_per_account=", options_.max_inflight_per_account,
                   " across every replica), no other eligible here; a report on any replica frees a place: try "
                   "again in ", absl::FormatDuration(absl::Ceil(retry, absl::Milliseconds(1)))),
      request.model, retry);
}

}  // namespace tokenbroker
