// Fleet-wide caller budgets (issue 16.2, docs/ARCHITECTURE.md §7). Per caller policy entry: a
// sorted set `<prefix>a:caller:<entry>` of its live reservations ("r\t<id>") and leases
// ("l\t<lease id>\t<tier>\t<account>"), each scored by its expiry in ms, and a hash
// `<prefix>a:caller-accounts:<entry>` of the accounts its leases are on ("<tier>\t<account>" ->
// leases); per lease a pointer `<prefix>a:caller-lease:<lease id>` to both, so any replica can
// end it by id. Every script first drops the expired members (and their accounts): a replica that
// dies leaves nothing that outlives the lease timeout. The set holds at most max_inflight members
// (Reserve refuses beyond) and the hash at most max_accounts fields (Commit refuses beyond); entry
// names come from the operator's policy file (at most 1000 entries). Costs: Reserve O(log n), plus
// the accounts held when they are asked for; Commit O(log n), plus the accounts held under an
// account limit.
#include <map>
#include <string>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "lib/state/redis_codec.h"
#include "lib/state/redis_state.h"

namespace tokenbroker {
namespace {

using redis_internal::Millis;
using redis_internal::Ms;

// Shared by the scripts: drops the members of set `z` that expired by `now`, and their accounts
// from hash `h`.
const char kPurge[] = R"lua(
local function purge(z, h, now)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #gone == 0 then return end
  for _, m in ipairs(gone) do
    local t, a = string.match(m, '^l\t[^\t]*\t([^\t]*)\t(.*)$')
    if a then
      local f = t .. '\t' .. a
      if redis.call('HINCRBY', h, f, -1) <= 0 then redis.call('HDEL', h, f) end
    end
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
end
)lua";

// KEYS: the entry's set, its accounts. ARGV: now ms, expiry ms, max_inflight (0: none), member,
// key ttl ms, "1" to list the accounts held. Returns {admitted 0/1, live members before this one,
// accounts held ("<tier>\t<account>")...}.
const char kReserveBody[] = R"lua(
purge(KEYS[1], KEYS[2], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[3])
local admitted = 0
if cap <= 0 or n < cap then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  admitted = 1
end
local out = {admitted, n}
if ARGV[6] == '1' then
  for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do table.insert(out, f) end
end
return out
)lua";

// KEYS: the entry's set, its accounts, the lease's pointer. ARGV: now ms, reservation member,
// lease member, expiry ms, max_accounts (0: none), tier, max accounts of that tier (0: none),
// account, key ttl ms. Returns {1, live members} committed, or {0, limit, accounts held...}
// refused (the reservation stays).
const char kCommitBody[] = R"lua(
purge(KEYS[1], KEYS[2], ARGV[1])
local field = ARGV[6] .. '\t' .. ARGV[8]
local maxa, maxt = tonumber(ARGV[5]), tonumber(ARGV[7])
if (maxa > 0 or maxt > 0) and redis.call('HEXISTS', KEYS[2], field) == 0 then
  local held = redis.call('HKEYS', KEYS[2])
  local tier = 0
  for _, f in ipairs(held) do
    if string.sub(f, 1, #ARGV[6] + 1) == ARGV[6] .. '\t' then tier = tier + 1 end
  end
  local limit = nil
  if maxa > 0 and #held >= maxa then limit = 'max_accounts'
  elseif maxt > 0 and tier >= maxt then limit = 'max_tier_accounts' end
  if limit then
    local out = {0, limit}
    for _, f in ipairs(held) do table.insert(out, f) end
    return out
  end
end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('HINCRBY', KEYS[2], field, 1)
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('SET', KEYS[3], KEYS[1] .. '\n' .. KEYS[2] .. '\n' .. ARGV[3], 'PX', ARGV[9])
return {1, redis.call('ZCARD', KEYS[1])}
)lua";

// KEYS[1] the lease's pointer. Removes the member it points at (and its account), and itself.
const char kReleaseCaller[] = R"lua(
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
redis.call('DEL', KEYS[1])
local z, h, m = string.match(v, '^([^\n]*)\n([^\n]*)\n(.*)$')
if not z or redis.call('ZREM', z, m) == 0 then return 0 end
local t, a = string.match(m, '^l\t[^\t]*\t([^\t]*)\t(.*)$')
if a then
  local f = t .. '\t' .. a
  if redis.call('HINCRBY', h, f, -1) <= 0 then redis.call('HDEL', h, f) end
end
return 1
)lua";

const std::string& ReserveScript() {
  static const std::string* script = new std::string(absl::StrCat(kPurge, kReserveBody));
  return *script;
}

const std::string& CommitScript() {
  static const std::string* script = new std::string(absl::StrCat(kPurge, kCommitBody));
  return *script;
}

std::string ReservationMember(const std::string& id) { return absl::StrCat("r\t", id); }

std::string LeaseMember(const CallerLeaseRecord& lease) {
  return absl::StrCat("l\t", lease.lease_id, "\t", static_cast<int>(lease.tier), "\t", lease.account);
}

// The accounts ("<tier>\t<account>") of a reply from index `first` on (anything else is skipped).
std::map<std::string, Tier> AccountsOf(const RedisReply& reply, size_t first) {
  std::map<std::string, Tier> out;
  for (size_t i = first; i < reply.elements.size(); ++i) {
    std::pair<std::string, std::string> parts = absl::StrSplit(reply.elements[i].str, absl::MaxSplits('\t', 1));
    int tier = 0;
    if (parts.second.empty() || !absl::SimpleAtoi(parts.first, &tier)) continue;
    out.emplace(std::move(parts.second), static_cast<Tier>(tier));
  }
  return out;
}

bool IsInteger(const RedisReply& r) { return r.type == RedisReply::Type::kInteger; }

}  // namespace

std::optional<CallerReserveResult> RedisState::ReserveCaller(const CallerReserveRequest& request) {
  absl::StatusOr<RedisReply> r = RoundTrip(
      {"EVAL", ReserveScript(), "2", CallerKey(request.entry), CallerAccountsKey(request.entry),
       absl::StrCat(Millis(request.now)), absl::StrCat(Millis(request.expires)), absl::StrCat(request.max_inflight),
       ReservationMember(request.reservation), Ms(request.expires - request.now), request.with_accounts ? "1" : "0"});
  if (!r.ok() || r->type != RedisReply::Type::kArray || r->elements.size() < 2 || !IsInteger(r->elements[0]) ||
      !IsInteger(r->elements[1])) {
    caller_unanswered_.fetch_add(1);
    return std::nullopt;
  }
  caller_round_trips_.fetch_add(1);
  CallerReserveResult out;
  out.admitted = r->elements[0].integer == 1;
  out.in_flight = static_cast<int>(r->elements[1].integer);
  out.accounts = AccountsOf(*r, 2);
  return out;
}

std::optional<CallerCommitResult> RedisState::CommitCaller(const CallerCommitRequest& request) {
  absl::StatusOr<RedisReply> r = RoundTrip(
      {"EVAL", CommitScript(), "3", CallerKey(request.entry), CallerAccountsKey(request.entry),
       CallerLeaseKey(request.lease.lease_id), absl::StrCat(Millis(request.now)),
       ReservationMember(request.reservation), LeaseMember(request.lease), absl::StrCat(Millis(request.expires)),
       absl::StrCat(request.max_accounts), absl::StrCat(static_cast<int>(request.lease.tier)),
       absl::StrCat(request.max_tier_accounts), request.lease.account, Ms(request.expires - request.now)});
  if (!r.ok() || r->type != RedisReply::Type::kArray || r->elements.size() < 2 || !IsInteger(r->elements[0])) {
    caller_unanswered_.fetch_add(1);
    return std::nullopt;
  }
  caller_round_trips_.fetch_add(1);
  CallerCommitResult out;
  out.committed = r->elements[0].integer == 1;
  if (out.committed) {
    out.in_flight = static_cast<int>(r->elements[1].integer);
  } else {
    out.refused_limit = r->elements[1].str;
    out.accounts = AccountsOf(*r, 2);
  }
  return out;
}

void RedisState::CancelCaller(const std::string& entry, const std::string& reservation) {
  Enqueue({"ZREM", CallerKey(entry), ReservationMember(reservation)});
}

void RedisState::ReleaseCaller(const std::string& lease_id) {
  Enqueue({"EVAL", kReleaseCaller, "1", CallerLeaseKey(lease_id)});
}

}  // namespace tokenbroker
