#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "lib/upstream_error.h"

namespace tokenbroker {

enum class CooldownScope { kNone, kModel, kAccount };

// How long each kind of failure cools an account when the upstream named no delay.
struct CooldownPolicy {
  // Quota, rate-limit and 403 failures without an explicit delay, by failure streak: the n-th
  // failure in a row waits backoff[n-1]; past the end, the last step repeats. Explicit upstream
  // delays are honoured as given (up to kMaxUpstreamDelay), never capped by this ladder.
  std::vector<absl::Duration> backoff = {absl::Seconds(60), absl::Minutes(5), absl::Minutes(30), absl::Hours(2)};
  absl::Duration capacity = absl::Seconds(10);      // MODEL_CAPACITY_EXHAUSTED
  absl::Duration server_error = absl::Seconds(10);  // 5xx
  absl::Duration validation_block = absl::Hours(1); // 403 VALIDATION_REQUIRED
  // After a cooldown ends, one request probes the account; others wait this long for its report.
  absl::Duration probe_timeout = absl::Seconds(60);
};

// What one report did.
struct CooldownDecision {
  CooldownScope scope = CooldownScope::kNone;
  absl::Time until = absl::InfinitePast();  // end of the resulting (possibly longer, pre-existing) cooldown
  std::string reason;
  bool disable = false;           // invalid_grant: the account must be disabled
  bool invalidate_token = false;  // 401: refresh the token before the account is used again
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
  std::string model;  // empty for a whole-account cooldown
  absl::Time until;
  std::string reason;
  bool half_open = false;
};

// One account's cooldowns and streak as replicas share them (DESIGN §7).
struct CooldownState {
  struct Item {
    std::string model;  // empty: the whole account
    absl::Time until;
    std::string reason;
    bool quota = false;
  };
  std::vector<Item> items;
  int streak = 0;
  std::string validation_url;
};

// Cooldowns and failure streaks per account, with the rules of DESIGN §5: quota and capacity
// errors cool (account, model); 401/403 cool the account; a new cooldown never shortens a live
// one; a success ends the streak; once a cooldown has ended, exactly one request at a time probes
// the account (half-open) until a report closes or reopens it. Pure logic on a given time.
// Not thread-safe: the owner locks.
class Cooldowns {
 public:
  explicit Cooldowns(CooldownPolicy policy) : policy_(std::move(policy)) {}

  CooldownDecision Apply(const std::string& account, const std::string& model, const UpstreamError& error,
                         absl::Time now);

  // The block on (account, model) at `now`, if any: a live cooldown, or a probe in flight.
  std::optional<CooldownBlock> Check(const std::string& account, const std::string& model, absl::Time now) const;

  // Records that (account, model) was handed out at `now`: if a cooldown on it has ended, this
  // use is the probe, and others are held off until it reports or probe_timeout passes.
  void OnIssued(const std::string& account, const std::string& model, absl::Time now);

  int Streak(const std::string& account) const;
  // Whether the account has any cooldown, streak or validation URL on record.
  bool Has(const std::string& account) const { return accounts_.contains(account); }
  std::string ValidationUrl(const std::string& account) const;
  std::vector<CooldownView> List(const std::string& account, absl::Time now) const;
  // Ends a quota or rate-limit cooldown on (account, model): the monitor saw the quota come back.
  // Returns whether there was one.
  bool EndQuotaCooldown(const std::string& account, const std::string& model);
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
    bool quota = false;  // caused by a quota or rate limit (ends when quota comes back)
  };
  struct PerAccount {
    std::optional<Entry> whole;
    absl::flat_hash_map<std::string, Entry> models;
    int streak = 0;
    std::string validation_url;
  };

  absl::Duration Backoff(int streak) const;
  static std::optional<CooldownBlock> BlockOf(const Entry& e, CooldownScope scope, absl::Time now);

  const CooldownPolicy policy_;
  absl::flat_hash_map<std::string, PerAccount> accounts_;
};

}  // namespace tokenbroker
