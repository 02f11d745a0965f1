#include "lib/broker/fleet_caller_ledger.h"

#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

std::string RandomPrefix() {
  absl::BitGen gen;
  return absl::StrCat(absl::Hex(absl::Uniform<uint64_t>(gen), absl::kZeroPad16));
}

// The usage a decision sees: the fleet's live leases and reservations, and the accounts its
// leases hold. Pending reservations are not counted as accounts here: Commit checks the account
// limits atomically, so a pending call elsewhere cannot take the entry past them.
CallerUsage FleetUsage(const CallerReserveResult& r, int waiting) {
  CallerUsage u;
  u.in_flight = r.in_flight;
  u.waiting = waiting;
  u.accounts = static_cast<int>(r.accounts.size());
  for (const auto& [account, tier] : r.accounts) {
    ++u.tier_accounts[tier];
    u.held.insert(account);
  }
  return u;
}

}  // namespace

FleetCallerLedger::FleetCallerLedger(SharedState& state, absl::Duration lease_timeout)
    : state_(state), lease_timeout_(lease_timeout), prefix_(RandomPrefix()) {}

void FleetCallerLedger::Answered(bool fleet) {
  if (fleet_.exchange(fleet) == fleet) return;
  if (fleet) {
    spdlog::info("caller budgets: counted across the fleet again (the state backend answers)");
  } else {
    spdlog::warn("caller budgets: the state backend does not answer; counting this replica's leases only");
  }
}

void FleetCallerLedger::PushReservation(const std::string& entry, std::string id) {
  absl::MutexLock lock(&mu_);
  reserved_[entry].push_back(std::move(id));
}

std::optional<std::string> FleetCallerLedger::PopReservation(const std::string& entry) {
  absl::MutexLock lock(&mu_);
  auto it = reserved_.find(entry);
  if (it == reserved_.end()) return std::nullopt;
  std::string id = std::move(it->second.front());
  it->second.pop_front();
  if (it->second.empty()) reserved_.erase(it);
  return id;
}

AdmissionDecision FleetCallerLedger::Reserve(const std::string& entry, int max_inflight, absl::Time now,
                                             bool with_accounts,
                                             const std::function<AdmissionDecision(const CallerUsage&)>& decide) {
  std::string id = absl::StrCat(prefix_, "-", next_id_.fetch_add(1));
  std::optional<CallerReserveResult> r =
      state_.ReserveCaller({entry, id, max_inflight, with_accounts, now, now + lease_timeout_});
  Answered(r.has_value());
  if (!r) return local_.Reserve(entry, max_inflight, now, with_accounts, decide);
  AdmissionDecision d = decide(FleetUsage(*r, local_.Waiting(entry)));
  if (r->admitted && !d.refused_limit) {
    PushReservation(entry, std::move(id));
  } else if (r->admitted) {
    state_.CancelCaller(entry, id);
  } else if (!d.refused_limit) {
    // The script's count and the rule's disagree only if the limit changed in between.
    d.refused_limit = "max_inflight";
    d.detail = absl::StrCat("caller ", entry, " has ", r->in_flight, " leases in flight across the fleet, its max_inflight is ",
                            max_inflight, "; report outcomes to free them");
    d.share.reset();
  }
  return d;
}

LedgerCommit FleetCallerLedger::Commit(const std::string& entry, const std::string& lease_id,
                                       const std::string& account, Tier tier, absl::Time now, absl::Time expires,
                                       const CommitLimits& limits) {
  std::optional<std::string> id = PopReservation(entry);
  if (!id) return local_.Commit(entry, lease_id, account, tier, now, expires, limits);  // reserved locally
  std::optional<CallerCommitResult> r =
      state_.CommitCaller({entry, *id, {lease_id, account, tier}, limits.max_accounts, limits.max_tier_accounts, now,
                           expires});
  Answered(r.has_value());
  LedgerCommit out;
  if (r && !r->committed) {
    out.committed = false;
    out.refused_limit = r->refused_limit;
    for (const auto& [held, tier] : r->accounts) out.held.insert(held);
    PushReservation(entry, *std::move(id));
    return out;
  }
  // This replica's leases are counted here too: they are what it falls back to.
  local_.RecordLease(entry, lease_id, account, tier, expires);
  if (!r) {
    state_.CancelCaller(entry, *id);  // in case the backend is only slow; else it expires
    out.in_flight = local_.Usage(now)[entry].in_flight;
    return out;
  }
  out.in_flight = r->in_flight;
  return out;
}

void FleetCallerLedger::Cancel(const std::string& entry) {
  if (std::optional<std::string> id = PopReservation(entry)) {
    state_.CancelCaller(entry, *id);
  } else {
    local_.Cancel(entry);
  }
}

std::optional<std::string> FleetCallerLedger::Release(const std::string& lease_id) {
  state_.ReleaseCaller(lease_id);  // whichever replica issued it
  return local_.Release(lease_id);
}

}  // namespace tokenbroker
