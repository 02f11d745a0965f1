#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/upstream_error.h"

namespace tokenbroker {

enum class CooldownScope { kNone, kModel, kAccount, kFamily };

// What a request or a report is about besides its model: the model's quota family (the pool's
// FamilyMap) and the quota group the request named (GetTokenRequest.quota_group; empty: none).
// A family cooldown on either blocks the request.
struct FamilyRef {
  absl::string_view family;
  absl::string_view group;
};

// How long each kind of failure cools an account when the upstream named no delay.
struct CooldownPolicy {
  // Quota, rate-limit and 403 failures without an explicit delay, by failure streak: the n-th
  // failure in a row waits backoff[n-1]; past the end, the last step repeats. Explicit upstream
  // delays are honoured as given (up to kMaxUpstreamDelay), never capped by this ladder.
  std::vector<absl::Duration> backoff = {absl::Seconds(60), absl::Minutes(5), absl::Minutes(30), absl::Hours(2)};
  absl::Duration capacity = absl::Seconds(10);      // MODEL_CAPACITY_EXHAUSTED
  absl::Duration server_error = absl::Seconds(10);  // 5xx
  absl::Duration validation_block = absl::Hours(1); // 403 VALIDATION_REQUIRED
  // A reported Terms-of-Service 403: the account is blocked this long (growing with the streak)
  // while the broker's own quota poll confirms it; only a confirmed suspension is permanent.
  absl::Duration suspension_block = absl::Hours(1);
  // After a cooldown ends, one request probes the account; others wait this long for its report.
  absl::Duration probe_timeout = absl::Seconds(60);
};

// What one report did.
struct CooldownDecision {
  CooldownScope scope = CooldownScope::kNone;
  absl::Time until = absl::InfinitePast();  // end of the resulting (possibly longer, pre-existing) cooldown
  std::string reason;  // safe to log and to return (no raw upstream text)
  // 401, or a reported invalid_grant: refresh the token before the account is used again. A
  // report never disables an account: only the broker's own token refresh can (DESIGN §5).
  bool invalidate_token = false;
};

// Why (account, model) cannot be used now.
struct CooldownBlock {
  CooldownScope scope = CooldownScope::kModel;
  absl::Time until;    // when it may be tried again
  std::string reason;
  bool probe_in_flight = false;  // half-open: the cooldown ended and one probe is out
};

// A live (or half-open) cooldown, for operators.
struct CooldownView {
  std::string model;  // empty for a whole-account cooldown; the family's name for a family one
  bool family = false;
  absl::Time until;
  std::string reason;
  bool half_open = false;
};

// One account's cooldowns and streak as replicas share them (DESIGN §7).
struct CooldownState {
  struct Item {
    std::string model;  // empty: the whole account; with `family`, the family's name
    absl::Time until;
    std::string reason;
    bool quota = false;
    bool family = false;
  };
  std::vector<Item> items;
  int streak = 0;
  std::string validation_url;
};

// Cooldowns and failure streaks per account, with the rules of DESIGN §5: quota and capacity
// errors cool (account, model); 401/403 cool the account; a new cooldown never shortens a live
// one; a family-wide quota 429 cools (account, family) — every model of the family — and a quota 429
// on a request that named a quota group also cools (account, group); a success ends the streak but never a live cooldown (only one that has run out, and while
// a half-open probe is out, only the probe's own report closes it); once a cooldown has ended,
// exactly one request at a time probes the account (half-open) until a report closes or reopens
// it. Reports are untrusted: nothing here disables an account. At most kMaxModelsPerAccount
// models are tracked per account (callers choose model names): past that, the cooldown ending
// soonest makes room. Pure logic on a given time. Not thread-safe: the owner locks.
class Cooldowns {
 public:
  static constexpr size_t kMaxModelsPerAccount = 64;
  static constexpr size_t kMaxFamiliesPerAccount = 16;  // families and caller-named quota groups

  explicit Cooldowns(CooldownPolicy policy) : policy_(std::move(policy)) {}

  // Applies one upstream answer on (account, model). `lease_id` is the lease the report names
  // (empty when it names none, or when the answer comes from another replica): a success closes
  // a half-open cooldown only when it is the probe's lease.
  CooldownDecision Apply(const std::string& account, const std::string& model, const UpstreamError& error,
                         absl::Time now, absl::string_view lease_id = {}, FamilyRef family = {});

  // The block on (account, model) at `now`, if any: a live cooldown, or a probe in flight.
  std::optional<CooldownBlock> Check(const std::string& account, const std::string& model, absl::Time now,
                                     FamilyRef family = {}) const;

  // Cools the whole account until `until` for a fault of the broker's own way out (an egress that
  // cannot be reached): the streak is untouched; a live cooldown that ends later stays as it is.
  void Hold(const std::string& account, absl::Time until, const std::string& reason);

  // Records that (account, model) was handed out at `now` under `lease_id`: if a cooldown on it
  // has ended, this use is the probe, and others are held off until it reports or probe_timeout
  // passes.
  void OnIssued(const std::string& account, const std::string& model, absl::Time now,
                absl::string_view lease_id = {}, FamilyRef family = {});
  // Fleet-wide half-open (issue 16): the cooldowns on (account, model, its family or group) whose
  // use at `now` would be a probe — "" for the whole account, the model's name, or "@<family>" for a
  // family or quota group (model names cannot hold '@'). Empty when the use would be no probe.
  std::vector<std::string> ProbeScopes(const std::string& account, const std::string& model, absl::Time now,
                                       FamilyRef family = {}) const;
  // Another replica holds the fleet's probe of (account, model): held off here until `until`, or
  // until a report from another replica (a lease-less success closes it, a failure reopens it).
  void ProbeElsewhere(const std::string& account, const std::string& model, absl::Time now, absl::Time until,
                      FamilyRef family = {});
  // Whether `lease_id` is the probe in flight of (account, model), its family or group, or of the
  // whole account.
  bool IsProbe(const std::string& account, const std::string& model, absl::string_view lease_id,
               FamilyRef family = {}) const;
  // A lease ended without a report (released because its token could not be had or nobody was
  // there to take it, or timed out): if it was the probe, another request may probe at once.
  void OnLeaseEnded(const std::string& account, const std::string& model, absl::string_view lease_id,
                    FamilyRef family = {});
  // An operator lifts what reports caused: the cooldown on (account, model), or with `model`
  // empty every cooldown of the account, its streak and validation URL. Returns whether there
  // was anything to lift.
  // A model's reset also lifts its family's cooldown (`family`).
  bool Lift(const std::string& account, const std::string& model, absl::string_view family = {});

  int Streak(const std::string& account) const;
  // Whether the account has any cooldown, streak or validation URL on record.
  bool Has(const std::string& account) const { return accounts_.contains(account); }
  std::string ValidationUrl(const std::string& account) const;
  std::vector<CooldownView> List(const std::string& account, absl::Time now) const;
  // Ends a quota or rate-limit cooldown on (account, model): the monitor saw the quota come back.
  // Returns whether there was one.
  bool EndQuotaCooldown(const std::string& account, const std::string& model);
  // The same for a family's quota cooldown: a bucket of the family was seen back.
  bool EndFamilyQuotaCooldown(const std::string& account, absl::string_view family);
  // The account's cooldowns and streak; unset when it has none.
  std::optional<CooldownState> Export(const std::string& account) const;
  // Folds in what another replica knows: the later end of each cooldown and the longer streak win
  // (never shortens or forgets a cooldown).
  void Merge(const std::string& account, const CooldownState& state);
  // Forgets an account (it left the pool).
  void Forget(const std::string& account) { accounts_.erase(account); }

 private:
  struct Entry {
    absl::Time until;
    std::string reason;
    std::optional<absl::Time> probe_until;
    std::string probe_lease;  // the lease of the probe in flight, when known
    bool probe_remote = false;  // the probe in flight is another replica's (fleet-wide half-open)
    bool quota = false;  // caused by a quota or rate limit (ends when quota comes back)
  };
  struct PerAccount {
    std::optional<Entry> whole;
    absl::flat_hash_map<std::string, Entry> models;
    absl::flat_hash_map<std::string, Entry> families;  // family or quota group → its cooldown
    int streak = 0;
    std::string validation_url;
  };

  absl::Duration Backoff(int streak) const;
  // A success closes `e` at `now` (it has run out, and it is not half-open with another probe).
  static bool SuccessCloses(const Entry& e, absl::Time now, absl::string_view lease_id);
  // The entry for `model`, made (room made first when the account tracks too many) if missing.
  static Entry& ModelEntry(PerAccount& acc, const std::string& model);
  static Entry& FamilyEntry(PerAccount& acc, absl::string_view family);
  bool Empty(const PerAccount& acc) const {
    return !acc.whole && acc.models.empty() && acc.families.empty() && acc.validation_url.empty();
  }
  static std::optional<CooldownBlock> BlockOf(const Entry& e, CooldownScope scope, absl::Time now);

  const CooldownPolicy policy_;
  absl::flat_hash_map<std::string, PerAccount> accounts_;
};

}  // namespace tokenbroker
