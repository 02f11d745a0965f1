#include "lib/selection/cooldowns.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace tokenbroker {

absl::Duration Cooldowns::Backoff(int streak) const {
  if (policy_.backoff.empty()) return absl::Seconds(60);
  size_t i = static_cast<size_t>(std::max(1, streak)) - 1;
  return policy_.backoff[std::min(i, policy_.backoff.size() - 1)];
}

bool Cooldowns::SuccessCloses(const Entry& e, absl::Time now, absl::string_view lease_id) {
  if (e.until > now) return false;  // live: a success elsewhere says nothing about this quota
  const bool probe_out = e.probe_until && now < *e.probe_until;
  return !probe_out || (!lease_id.empty() && e.probe_lease == lease_id);
}

Cooldowns::Entry& Cooldowns::ModelEntry(PerAccount& acc, const std::string& model) {
  if (auto it = acc.models.find(model); it != acc.models.end()) return it->second;
  if (acc.models.size() >= kMaxModelsPerAccount) {
    // Model names come from callers: the table stays bounded. What ends soonest is lost first
    // (run-out entries end before any live one).
    auto victim = std::min_element(acc.models.begin(), acc.models.end(),
                                   [](const auto& a, const auto& b) { return a.second.until < b.second.until; });
    acc.models.erase(victim);
  }
  return acc.models[model];
}

CooldownDecision Cooldowns::Apply(const std::string& account, const std::string& model,
                                  const UpstreamError& error, absl::Time now, absl::string_view lease_id) {
  CooldownDecision d;
  PerAccount& acc = accounts_[account];
  const std::string summary = error.Summary();
  absl::Duration wait = absl::ZeroDuration();
  std::string why;
  switch (error.kind) {
    case FailureKind::kSuccess: {
      acc.streak = 0;
      // A success ends only what has run out (DESIGN §5): a live cooldown came from an answer
      // about quota this request did not touch (a lease issued before it, another replica's view).
      if (auto it = acc.models.find(model); it != acc.models.end() && SuccessCloses(it->second, now, lease_id)) {
        acc.models.erase(it);
      }
      if (acc.whole && SuccessCloses(*acc.whole, now, lease_id)) {
        acc.whole.reset();
        acc.validation_url.clear();
      }
      d.reason = "success: failure streak reset";
      if (std::optional<CooldownBlock> left = Check(account, model, now)) {
        d.scope = left->scope;
        d.until = left->until;
        absl::StrAppend(&d.reason, "; a success never ends a live cooldown, this one stays: ", left->reason);
      }
      if (!acc.whole && acc.models.empty() && acc.validation_url.empty()) accounts_.erase(account);
      return d;
    }
    case FailureKind::kInvalidGrant:
      // A caller's word is not Google's: the account cools down and its token is dropped, so the
      // broker's own refresh runs before the next use — and disables the account only if Google
      // answers it invalid_grant.
      ++acc.streak;
      d.scope = CooldownScope::kAccount;
      d.invalidate_token = true;
      wait = error.delay ? *error.delay : Backoff(acc.streak);
      why = absl::StrCat(summary, " reported: cooling down, backoff step ", acc.streak,
                         "; the broker's own token refresh decides whether the account is disabled");
      break;
    case FailureKind::kClientError:
      d.reason = absl::StrCat(summary, ": the request's fault, no cooldown");
      return d;
    case FailureKind::kQuotaExhausted:
    case FailureKind::kRateLimited:
      ++acc.streak;
      d.scope = CooldownScope::kModel;
      wait = error.delay ? *error.delay : Backoff(acc.streak);
      why = error.delay ? summary : absl::StrCat(summary, ", backoff step ", acc.streak);
      break;
    case FailureKind::kCapacityExhausted:
      d.scope = CooldownScope::kModel;
      wait = error.delay ? *error.delay : policy_.capacity;
      why = summary;
      break;
    case FailureKind::kServerError:
      d.scope = CooldownScope::kModel;
      wait = error.delay ? *error.delay : policy_.server_error;
      why = summary;
      break;
    case FailureKind::kUnauthorized:
      ++acc.streak;
      d.scope = CooldownScope::kAccount;
      d.invalidate_token = true;
      // The first 401 only needs a fresh token; repeated ones back off.
      wait = error.delay ? *error.delay : acc.streak == 1 ? absl::ZeroDuration() : Backoff(acc.streak - 1);
      why = absl::StrCat(summary, ", token will be refreshed before the next use");
      break;
    case FailureKind::kValidationRequired:
      ++acc.streak;
      d.scope = CooldownScope::kAccount;
      wait = error.delay ? *error.delay : policy_.validation_block;
      if (!error.validation_url.empty()) acc.validation_url = error.validation_url;
      why = absl::StrCat(summary, acc.validation_url.empty() ? "" : ", verify at " + acc.validation_url);
      break;
    case FailureKind::kForbidden:
      ++acc.streak;
      d.scope = CooldownScope::kAccount;
      wait = error.delay ? *error.delay : Backoff(acc.streak);
      why = error.delay ? summary : absl::StrCat(summary, ", backoff step ", acc.streak);
      break;
  }

  std::optional<Entry>* slot_whole = d.scope == CooldownScope::kAccount ? &acc.whole : nullptr;
  Entry* existing = nullptr;
  if (slot_whole != nullptr) {
    if (*slot_whole) existing = &**slot_whole;
  } else if (auto it = acc.models.find(model); it != acc.models.end()) {
    existing = &it->second;
  }
  const absl::Time proposed = now + wait;
  if (existing == nullptr && wait <= absl::ZeroDuration()) {
    d.until = now;
    d.reason = why;
    return d;
  }
  if (existing == nullptr) {
    Entry fresh{proposed, why, std::nullopt, "",
                error.kind == FailureKind::kQuotaExhausted || error.kind == FailureKind::kRateLimited};
    if (slot_whole != nullptr) {
      *slot_whole = fresh;
    } else {
      ModelEntry(acc, model) = fresh;
    }
    d.until = proposed;
    d.reason = why;
    return d;
  }
  // A failure ends any probe; a new cooldown never shortens a live one.
  existing->probe_until.reset();
  existing->probe_lease.clear();
  if (proposed > existing->until) {
    existing->until = proposed;
    existing->reason = why;
    existing->quota = error.kind == FailureKind::kQuotaExhausted || error.kind == FailureKind::kRateLimited;
  }
  d.until = existing->until;
  d.reason = existing->reason;
  return d;
}

std::optional<CooldownBlock> Cooldowns::BlockOf(const Entry& e, CooldownScope scope, absl::Time now) {
  if (now < e.until) return CooldownBlock{scope, e.until, e.reason, false};
  if (e.probe_until && now < *e.probe_until) {
    return CooldownBlock{scope, *e.probe_until,
                         absl::StrCat("half-open after ", e.reason, ": one probe is in flight"), true};
  }
  return std::nullopt;
}

std::optional<CooldownBlock> Cooldowns::Check(const std::string& account, const std::string& model,
                                              absl::Time now) const {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return std::nullopt;
  std::optional<CooldownBlock> block;
  if (it->second.whole) block = BlockOf(*it->second.whole, CooldownScope::kAccount, now);
  if (auto m = it->second.models.find(model); m != it->second.models.end()) {
    std::optional<CooldownBlock> mb = BlockOf(m->second, CooldownScope::kModel, now);
    if (mb && (!block || mb->until > block->until)) block = mb;
  }
  return block;
}

void Cooldowns::OnIssued(const std::string& account, const std::string& model, absl::Time now,
                         absl::string_view lease_id) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return;
  auto mark = [&](Entry& e) {
    if (e.until <= now) {
      e.probe_until = now + policy_.probe_timeout;
      e.probe_lease = std::string(lease_id);
    }
  };
  if (it->second.whole) mark(*it->second.whole);
  if (auto m = it->second.models.find(model); m != it->second.models.end()) mark(m->second);
}

void Cooldowns::OnLeaseEnded(const std::string& account, const std::string& model, absl::string_view lease_id) {
  if (lease_id.empty()) return;
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return;
  auto release = [&](Entry& e) {
    if (e.probe_until && e.probe_lease == lease_id) {
      e.probe_until.reset();
      e.probe_lease.clear();
    }
  };
  if (it->second.whole) release(*it->second.whole);
  if (auto m = it->second.models.find(model); m != it->second.models.end()) release(m->second);
}

void Cooldowns::Hold(const std::string& account, absl::Time until, const std::string& reason) {
  PerAccount& acc = accounts_[account];
  if (acc.whole && acc.whole->until >= until) return;
  Entry e;
  e.until = until;
  e.reason = reason;
  acc.whole = std::move(e);
}

bool Cooldowns::Lift(const std::string& account, const std::string& model) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return false;
  if (model.empty()) {
    accounts_.erase(it);
    return true;
  }
  const bool had = it->second.models.erase(model) > 0;
  if (!it->second.whole && it->second.models.empty() && it->second.validation_url.empty()) {
    // Nothing left but the streak: the account starts afresh.
    accounts_.erase(it);
  }
  return had;
}

bool Cooldowns::EndQuotaCooldown(const std::string& account, const std::string& model) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return false;
  auto m = it->second.models.find(model);
  if (m == it->second.models.end() || !m->second.quota) return false;
  it->second.models.erase(m);
  return true;
}

int Cooldowns::Streak(const std::string& account) const {
  auto it = accounts_.find(account);
  return it == accounts_.end() ? 0 : it->second.streak;
}

std::string Cooldowns::ValidationUrl(const std::string& account) const {
  auto it = accounts_.find(account);
  return it == accounts_.end() ? "" : it->second.validation_url;
}

std::vector<CooldownView> Cooldowns::List(const std::string& account, absl::Time now) const {
  std::vector<CooldownView> out;
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return out;
  if (it->second.whole) {
    out.push_back({"", it->second.whole->until, it->second.whole->reason, it->second.whole->until <= now});
  }
  for (const auto& [model, e] : it->second.models) out.push_back({model, e.until, e.reason, e.until <= now});
  std::sort(out.begin(), out.end(), [](const CooldownView& a, const CooldownView& b) { return a.model < b.model; });
  return out;
}

std::optional<CooldownState> Cooldowns::Export(const std::string& account) const {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return std::nullopt;
  const PerAccount& acc = it->second;
  CooldownState out;
  out.streak = acc.streak;
  out.validation_url = acc.validation_url;
  if (acc.whole) out.items.push_back({"", acc.whole->until, acc.whole->reason, acc.whole->quota});
  for (const auto& [model, e] : acc.models) out.items.push_back({model, e.until, e.reason, e.quota});
  return out;
}

void Cooldowns::Merge(const std::string& account, const CooldownState& state) {
  PerAccount& acc = accounts_[account];
  acc.streak = std::max(acc.streak, state.streak);
  if (!state.validation_url.empty()) acc.validation_url = state.validation_url;
  for (const CooldownState::Item& item : state.items) {
    std::optional<Entry>* slot = nullptr;
    std::optional<Entry> model_entry;
    if (item.model.empty()) {
      slot = &acc.whole;
    } else if (auto m = acc.models.find(item.model); m != acc.models.end()) {
      model_entry = m->second;
      slot = &model_entry;
    } else {
      slot = &model_entry;
    }
    if (!*slot || (*slot)->until < item.until) {
      Entry e;
      e.until = item.until;
      e.reason = item.reason;
      e.quota = item.quota;
      *slot = e;
    }
    if (!item.model.empty()) {
      ModelEntry(acc, item.model) = *model_entry;
    }
  }
}

}  // namespace tokenbroker
