#include "lib/selection/cooldowns.h"

#include <algorithm>
#include <tuple>

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
  // Another replica's probe reports through the shared state without a lease id.
  return !probe_out || (!lease_id.empty() && e.probe_lease == lease_id) || (lease_id.empty() && e.probe_remote);
}

namespace {

// The entry for `key` in `map`, made if missing; past `bound` entries, the one ending soonest makes
// room (model names and quota groups come from callers: the tables stay bounded; run-out entries
// end before any live one).
template <typename Map>
typename Map::mapped_type& BoundedEntry(Map& map, absl::string_view key, size_t bound) {
  if (auto it = map.find(key); it != map.end()) return it->second;
  if (map.size() >= bound) {
    auto victim = std::min_element(map.begin(), map.end(),
                                   [](const auto& a, const auto& b) { return a.second.until < b.second.until; });
    map.erase(victim);
  }
  return map[key];
}

}  // namespace

Cooldowns::Entry& Cooldowns::ModelEntry(PerAccount& acc, const std::string& model) {
  return BoundedEntry(acc.models, model, kMaxModelsPerAccount);
}

Cooldowns::Entry& Cooldowns::FamilyEntry(PerAccount& acc, absl::string_view family) {
  return BoundedEntry(acc.families, family, kMaxFamiliesPerAccount);
}

CooldownDecision Cooldowns::Apply(const std::string& account, const std::string& model,
                                  const UpstreamError& error, absl::Time now, absl::string_view lease_id,
                                  FamilyRef family) {
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
      for (absl::string_view f : {family.family, family.group}) {
        if (auto it = acc.families.find(f); !f.empty() && it != acc.families.end() && SuccessCloses(it->second, now, lease_id)) {
          acc.families.erase(it);
        }
      }
      d.reason = "success: failure streak reset";
      if (std::optional<CooldownBlock> left = Check(account, model, now, family)) {
        d.scope = left->scope;
        d.until = left->until;
        absl::StrAppend(&d.reason, "; a success never ends a live cooldown, this one stays: ", left->reason);
      }
      if (Empty(acc)) accounts_.erase(account);
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
      // A family-wide limit spends every model of the family on this account (and nothing of
      // the other families).
      d.scope = error.family_wide && !family.family.empty() ? CooldownScope::kFamily : CooldownScope::kModel;
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
    case FailureKind::kSuspended:
      // A caller's word is not Google's: blocked while the broker's own quota poll confirms.
      ++acc.streak;
      d.scope = CooldownScope::kAccount;
      wait = policy_.suspension_block;
      why = absl::StrCat(summary, " reported",
                         error.message.empty() ? "" : absl::StrCat(" (\"", error.message, "\")"),
                         ": blocked until the quota poll confirms or an operator resets it");
      break;
    case FailureKind::kForbidden:
      ++acc.streak;
      d.scope = CooldownScope::kAccount;
      wait = error.delay ? *error.delay : Backoff(acc.streak);
      why = error.delay ? summary : absl::StrCat(summary, ", backoff step ", acc.streak);
      break;
  }

  const bool quota = error.kind == FailureKind::kQuotaExhausted || error.kind == FailureKind::kRateLimited;
  const absl::Time proposed = now + wait;
  // A quota 429 on a request that named a quota group spends the group too (its models share quota,
  // the caller said): the group is cooled alongside, never instead.
  if (error.kind == FailureKind::kQuotaExhausted && !family.group.empty() && family.group != family.family &&
      wait > absl::ZeroDuration()) {
    Entry& g = FamilyEntry(acc, family.group);
    g.probe_until.reset();
    g.probe_lease.clear();
    if (proposed > g.until) g = Entry{.until = proposed, .reason = why, .quota = true};
  }
  Entry* existing = nullptr;
  if (d.scope == CooldownScope::kAccount) {
    if (acc.whole) existing = &*acc.whole;
  } else if (d.scope == CooldownScope::kFamily) {
    if (auto it = acc.families.find(family.family); it != acc.families.end()) existing = &it->second;
  } else if (auto it = acc.models.find(model); it != acc.models.end()) {
    existing = &it->second;
  }
  if (existing == nullptr && wait <= absl::ZeroDuration()) {
    d.until = now;
    d.reason = why;
    return d;
  }
  if (existing == nullptr) {
    const Entry fresh{.until = proposed, .reason = why, .quota = quota};
    if (d.scope == CooldownScope::kAccount) {
      acc.whole = fresh;
    } else if (d.scope == CooldownScope::kFamily) {
      FamilyEntry(acc, family.family) = fresh;
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
  existing->probe_remote = false;
  if (proposed > existing->until) {
    existing->until = proposed;
    existing->reason = why;
    existing->quota = quota;
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
                                              absl::Time now, FamilyRef family) const {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return std::nullopt;
  const PerAccount& acc = it->second;
  std::optional<CooldownBlock> block;
  auto consider = [&](const Entry& e, CooldownScope scope) {
    std::optional<CooldownBlock> b = BlockOf(e, scope, now);
    if (b && (!block || b->until > block->until)) block = std::move(b);
  };
  if (acc.whole) consider(*acc.whole, CooldownScope::kAccount);
  if (auto m = acc.models.find(model); m != acc.models.end()) consider(m->second, CooldownScope::kModel);
  if (!acc.families.empty()) {
    for (absl::string_view f : {family.family, family.group}) {
      if (auto m = acc.families.find(f); !f.empty() && m != acc.families.end()) {
        consider(m->second, CooldownScope::kFamily);
      }
    }
  }
  return block;
}

void Cooldowns::OnIssued(const std::string& account, const std::string& model, absl::Time now,
                         absl::string_view lease_id, FamilyRef family) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return;
  auto mark = [&](Entry& e) {
    if (e.until <= now) {
      e.probe_until = now + policy_.probe_timeout;
      e.probe_lease = std::string(lease_id);
      e.probe_remote = false;
    }
  };
  PerAccount& acc = it->second;
  if (acc.whole) mark(*acc.whole);
  if (auto m = acc.models.find(model); m != acc.models.end()) mark(m->second);
  for (absl::string_view f : {family.family, family.group}) {
    if (auto m = acc.families.find(f); !f.empty() && m != acc.families.end()) mark(m->second);
  }
}

std::vector<std::string> Cooldowns::ProbeScopes(const std::string& account, const std::string& model,
                                                absl::Time now, FamilyRef family) const {
  std::vector<std::string> out;
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return out;
  auto half_open = [&](const Entry& e) { return e.until <= now && !(e.probe_until && now < *e.probe_until); };
  if (it->second.whole && half_open(*it->second.whole)) out.emplace_back();
  if (auto m = it->second.models.find(model); m != it->second.models.end() && half_open(m->second)) {
    out.push_back(model);
  }
  for (absl::string_view f : {family.family, family.group}) {
    if (auto m = it->second.families.find(f); !f.empty() && m != it->second.families.end() && half_open(m->second)) {
      out.push_back(absl::StrCat("@", f));
    }
  }
  return out;
}

void Cooldowns::ProbeElsewhere(const std::string& account, const std::string& model, absl::Time now,
                               absl::Time until, FamilyRef family) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return;
  auto mark = [&](Entry& e) {
    if (e.until <= now && !(e.probe_until && now < *e.probe_until)) {
      e.probe_until = until;
      e.probe_lease.clear();
      e.probe_remote = true;
    }
  };
  if (it->second.whole) mark(*it->second.whole);
  if (auto m = it->second.models.find(model); m != it->second.models.end()) mark(m->second);
  for (absl::string_view f : {family.family, family.group}) {
    if (auto m = it->second.families.find(f); !f.empty() && m != it->second.families.end()) mark(m->second);
  }
}

bool Cooldowns::IsProbe(const std::string& account, const std::string& model, absl::string_view lease_id,
                        FamilyRef family) const {
  auto it = accounts_.find(account);
  if (it == accounts_.end() || lease_id.empty()) return false;
  auto holds = [&](const Entry& e) { return e.probe_until && e.probe_lease == lease_id; };
  if (it->second.whole && holds(*it->second.whole)) return true;
  if (auto m = it->second.models.find(model); m != it->second.models.end() && holds(m->second)) return true;
  for (absl::string_view f : {family.family, family.group}) {
    if (auto m = it->second.families.find(f); !f.empty() && m != it->second.families.end() && holds(m->second)) {
      return true;
    }
  }
  return false;
}

void Cooldowns::OnLeaseEnded(const std::string& account, const std::string& model, absl::string_view lease_id,
                             FamilyRef family) {
  if (lease_id.empty()) return;
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return;
  auto release = [&](Entry& e) {
    if (e.probe_until && e.probe_lease == lease_id) {
      e.probe_until.reset();
      e.probe_lease.clear();
      e.probe_remote = false;
    }
  };
  PerAccount& acc = it->second;
  if (acc.whole) release(*acc.whole);
  if (auto m = acc.models.find(model); m != acc.models.end()) release(m->second);
  for (absl::string_view f : {family.family, family.group}) {
    if (auto m = acc.families.find(f); !f.empty() && m != acc.families.end()) release(m->second);
  }
}

void Cooldowns::Hold(const std::string& account, absl::Time until, const std::string& reason) {
  PerAccount& acc = accounts_[account];
  if (acc.whole && acc.whole->until >= until) return;
  Entry e;
  e.until = until;
  e.reason = reason;
  acc.whole = std::move(e);
}

bool Cooldowns::Lift(const std::string& account, const std::string& model, absl::string_view family) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return false;
  if (model.empty()) {
    accounts_.erase(it);
    return true;
  }
  bool had = it->second.models.erase(model) > 0;
  if (auto f = it->second.families.find(family); !family.empty() && f != it->second.families.end()) {
    it->second.families.erase(f);
    had = true;
  }
  if (Empty(it->second)) {
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

bool Cooldowns::EndFamilyQuotaCooldown(const std::string& account, absl::string_view family) {
  auto it = accounts_.find(account);
  if (it == accounts_.end()) return false;
  auto f = it->second.families.find(family);
  if (f == it->second.families.end() || !f->second.quota) return false;
  it->second.families.erase(f);
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
    out.push_back({"", false, it->second.whole->until, it->second.whole->reason, it->second.whole->until <= now});
  }
  for (const auto& [model, e] : it->second.models) out.push_back({model, false, e.until, e.reason, e.until <= now});
  for (const auto& [family, e] : it->second.families) out.push_back({family, true, e.until, e.reason, e.until <= now});
  std::sort(out.begin(), out.end(), [](const CooldownView& a, const CooldownView& b) {
    return std::tie(a.family, a.model) < std::tie(b.family, b.model);
  });
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
  for (const auto& [family, e] : acc.families) out.items.push_back({family, e.until, e.reason, e.quota, true});
  return out;
}

void Cooldowns::Merge(const std::string& account, const CooldownState& state) {
  PerAccount& acc = accounts_[account];
  acc.streak = std::max(acc.streak, state.streak);
  if (!state.validation_url.empty()) acc.validation_url = state.validation_url;
  for (const CooldownState::Item& item : state.items) {
    auto newer = [&](std::optional<Entry>& slot) {
      if (!slot || slot->until < item.until) {
        Entry e;
        e.until = item.until;
        e.reason = item.reason;
        e.quota = item.quota;
        slot = e;
      }
    };
    if (item.model.empty()) {
      newer(acc.whole);
      continue;
    }
    auto& map = item.family ? acc.families : acc.models;
    std::optional<Entry> entry;
    if (auto m = map.find(item.model); m != map.end()) entry = m->second;
    newer(entry);
    (item.family ? FamilyEntry(acc, item.model) : ModelEntry(acc, item.model)) = *entry;
  }
}

}  // namespace tokenbroker
