#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/common/safe_text.h"
#include "lib/selection/account_pool.h"

// What the upstream answered (ReportOutcome, here or on another replica) and an operator's undo
// (Reset). The cooldown rules are Cooldowns', the quota lessons QuotaBook's.

namespace tokenbroker {
namespace {

absl::Status ForeignLeaseError(const std::string& lease_id) {
  return absl::PermissionDeniedError(absl::StrCat(
      "lease_id ", SafeText(lease_id, 64), " was issued to another caller; only that caller may report it"));
}

absl::Status NamedAccountError() {
  return absl::PermissionDeniedError(
      "a report naming account_id and model without a lease of this caller needs the admin token; "
      "report with the lease_id GetToken returned");
}

}  // namespace

absl::StatusOr<OutcomeResult> AccountPool::ReportOutcome(const Outcome& outcome) {
  // Reports are untrusted (docs/ARCHITECTURE.md §5): a lease is reported only by the caller it was issued to,
  // checked before anything changes. Its id carries the caller's tag, so a lease of another
  // replica is checked before it is taken from the shared state.
  if (!outcome.lease_id.empty() && !outcome.may_report_any_lease) {
    if (std::optional<std::string> tag = CallerTagOfLease(outcome.lease_id); tag && *tag != CallerTag(outcome.caller)) {
      return ForeignLeaseError(outcome.lease_id);
    }
  }
  Outbox out(shared_state());
  if (out.active() && !outcome.lease_id.empty()) {
    bool here = false;
    {
      absl::ReaderMutexLock lock(&mu_);
      here = leases_.Contains(outcome.lease_id);
    }
    // A lease another replica issued: take it from the shared state and report by its account.
    if (!here) {
      if (std::optional<SharedLease> remote = shared_state()->TakeLease(outcome.lease_id)) {
        Outcome by_account = outcome;
        by_account.lease_id.clear();
        by_account.account_id = remote->account;
        by_account.model = remote->model;
        by_account.may_name_account = true;  // named by a lease of this caller
        // Its fleet-wide reservation frees now, not when its issuer hears of it (or never, if
        // the issuer is gone: then at its expiry).
        out.Add([remote = *remote](SharedState& s) { s.ReleaseAdmission(remote.account, remote.model, remote.id); });
        return ReportOutcomeHere(by_account, out);
      }
    }
  }
  return ReportOutcomeHere(outcome, out);
}

absl::StatusOr<OutcomeResult> AccountPool::ReportOutcomeHere(const Outcome& outcome, Outbox& out) {
  const absl::Time now = clock_.Now();
  absl::StatusOr<OutcomeResult> result;
  {
    absl::MutexLock lock(&mu_);
    result = ReportOutcomeLocked(outcome, now, out);
  }
  out.Send();
  return result;
}

absl::StatusOr<OutcomeResult> AccountPool::ReportOutcomeLocked(const Outcome& outcome, absl::Time now, Outbox& out) {
  ExpireLeasesLocked(now, out);
  OutcomeResult result;
  std::optional<absl::Time> issued_at;  // of the reported lease, when it was issued here
  std::string group;                    // the quota group the reported lease's request named
  if (!outcome.lease_id.empty()) {
    if (std::optional<Lease> mine = leases_.Find(outcome.lease_id);
        mine && !outcome.may_report_any_lease && mine->caller != outcome.caller) {
      return ForeignLeaseError(outcome.lease_id);
    }
    if (std::optional<Lease> lease = leases_.End(outcome.lease_id)) {
      EndLeaseLocked(*lease, out);
      out.Add([id = lease->id](SharedState& s) { s.LeaseEnded(id); });
      result.account_id = lease->account;
      result.model = lease->model;
      group = lease->group;
      issued_at = lease->expires - options_.lease_timeout;
    } else if (outcome.account_id.empty()) {
      return absl::NotFoundError(absl::StrCat(
          "lease_id ", outcome.lease_id, " is unknown or has timed out; report with account_id and model instead"));
    }
  }
  if (result.account_id.empty()) {
    if (!outcome.may_name_account) return NamedAccountError();
    result.account_id = outcome.account_id;
    result.model = outcome.model;
  }
  if (result.model.empty()) {
    return InvalidFieldError("model", "is required when no known lease_id is given");
  }
  auto it = index_.find(result.account_id);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat("account_id ", result.account_id, " is not loaded"));
  }
  const std::string& id = entries_[it->second].record.id;
  UpstreamError parsed = ParseUpstreamError(outcome.http_status, outcome.retry_after, outcome.error_body, now);
  // A success on an account with nothing on record changes nothing anywhere: not shared.
  const bool share = out.active() && (parsed.kind != FailureKind::kSuccess || cooldowns_.Has(id));
  const CooldownDecision d =
      ApplyOutcomeLocked(it->second, result.model, parsed, outcome.lease_id, issued_at, now, group);
  if (share) {
    out.Add([o = SharedOutcome{id, result.model, outcome.http_status, outcome.retry_after, outcome.error_body, now},
             state = cooldowns_.Export(id)](SharedState& s) { s.OutcomeApplied(o, state); });
    if (d.invalidate_token) out.Add([id](SharedState& s) { s.TokenDropped(id); });
  }
  result.family = std::string(quota_.families().Of(result.model));
  result.scope = d.scope;
  result.until = d.until;
  result.reason = d.reason;
  if (parsed.credits_exhausted) result.credits_exhausted_until = entries_[it->second].credits_until;
  return result;
}

CooldownDecision AccountPool::ApplyOutcomeLocked(size_t i, const std::string& model, const UpstreamError& parsed,
                                                 const std::string& lease_id, std::optional<absl::Time> issued_at,
                                                 absl::Time at, const std::string& group) {
  Entry& e = entries_[i];
  if (parsed.credits_exhausted) {
    // Credits, not quota: the account stays in service for requests that do not ask for credits
    // (the parser made it a client error, which cools nothing). Never shortened by a later answer.
    e.credits_until = std::max(e.credits_until, at + parsed.delay.value_or(options_.credits_exhausted_ttl));
  }
  const absl::string_view family = quota_.families().Of(model);
  CooldownDecision d = cooldowns_.Apply(e.record.id, model, parsed, at, lease_id, FamilyRef{family, group});
  if (d.scope == CooldownScope::kFamily) {
    absl::StrAppend(&d.reason, "; cools every model of family ", family, " on this account");
  }
  if (quota_.LearnFromOutcome(e.record, e.quota, model, parsed, issued_at, at)) ReindexLocked(i, at);
  if (d.invalidate_token) {
    e.record.access_token.clear();
    e.record.access_expiry = absl::InfinitePast();
  }
  return d;
}

ResetResult AccountPool::ResetLocked(size_t i, const std::string& model, bool enable) {
  Entry& e = entries_[i];
  AccountRecord& rec = e.record;
  ResetResult out;
  out.cooldown_lifted = cooldowns_.Lift(rec.id, model, model.empty() ? "" : quota_.families().Of(model));
  quota_.ForgetReported(rec, e.quota, model);
  ReindexLocked(i, clock_.Now());
  if (enable && (rec.disabled || rec.suspended)) {
    rec.disabled = false;
    rec.disabled_reason.clear();
    rec.suspended = false;
    rec.suspension_message.clear();
    out.enabled = true;
  }
  if (enable) runtime_disabled_.erase(rec.id);
  if (model.empty() && e.credits_until != absl::InfinitePast()) {
    e.credits_until = absl::InfinitePast();  // what a report said of the credits goes with it
    out.cooldown_lifted = true;
  }
  return out;
}

absl::StatusOr<ResetResult> AccountPool::Reset(const ResetRequest& request) {
  Outbox out(shared_state());
  ResetResult result;
  {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(request.account_id);
    if (it == index_.end()) {
      return absl::NotFoundError(absl::StrCat("account_id ", SafeText(request.account_id, 64), " is not loaded"));
    }
    result = ResetLocked(it->second, request.model, request.enable);
    out.Add([request, state = cooldowns_.Export(request.account_id)](SharedState& s) {
      s.AccountReset(request.account_id, request.model, request.enable, state);
    });
  }
  out.Send();
  return result;
}

}  // namespace tokenbroker
