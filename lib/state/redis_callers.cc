// Fleet-wide caller budgets (issue 16.2, docs/ARCHITECTURE.md §7): one sorted set per caller policy
// entry, `<prefix>a:caller:<entry>`, of its live reservations ("r\t<id>") and leases
// ("l\t<lease id>\t<tier>\t<account>"), each scored by its expiry in ms; and per lease a pointer
// `<prefix>a:caller-lease:<lease id>` to its member, so any replica can end it by id. Every script
// drops the expired members first: a replica that dies leaves nothing that outlives the lease
// timeout. The set holds at most max_inflight members (Reserve refuses beyond), and the entry names
// come from the operator's policy file (at most 1000 entries).
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

// KEYS[1] the entry's set. ARGV: now ms, expiry ms, max_inflight (0: none), member, key ttl ms.
// Returns {admitted 0/1, live members before this one, reservations among them, lease members...}.
const char kReserveCaller[] = R"lua(
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local cap = tonumber(ARGV[3])
local admitted = 0
if cap <= 0 or #members < cap then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  admitted = 1
end
local out = {admitted, #members, 0}
for _, m in ipairs(members) do
  if string.sub(m, 1, 2) == 'l\t' then table.insert(out, m) else out[3] = out[3] + 1 end
end
return out
)lua";

// KEYS[1] the entry's set, KEYS[2] the lease's pointer. ARGV: now ms, reservation member, lease
// member, expiry ms, max_accounts (0: none), tier, max accounts of that tier (0: none), account,
// key ttl ms. Returns {1, live members} committed, or {0, limit, lease members...} refused (the
// reservation stays).
const char kCommitCaller[] = R"lua(
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local seen, accounts, tier_accounts, held, leases = {}, 0, 0, false, {}
for _, m in ipairs(members) do
  local t, a = string.match(m, '^l\t[^\t]*\t([^\t]*)\t(.*)$')
  if a then
    table.insert(leases, m)
    if a == ARGV[8] then held = true end
    if not seen[a] then
      seen[a] = true
      accounts = accounts + 1
      if t == ARGV[6] then tier_accounts = tier_accounts + 1 end
    end
  end
end
local limit = nil
if not held then
  if tonumber(ARGV[5]) > 0 and accounts >= tonumber(ARGV[5]) then limit = 'max_accounts'
  elseif tonumber(ARGV[7]) > 0 and tier_accounts >= tonumber(ARGV[7]) then limit = 'max_tier_accounts' end
end
if limit then
  local out = {0, limit}
  for _, m in ipairs(leases) do table.insert(out, m) end
  return out
end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('SET', KEYS[2], KEYS[1] .. '\n' .. ARGV[3], 'PX', ARGV[9])
return {1, redis.call('ZCARD', KEYS[1])}
)lua";

// KEYS[1] the lease's pointer. Removes the member it points at, and itself.
const char kReleaseCaller[] = R"lua(
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local k, m = string.match(v, '^([^\n]*)\n(.*)$')
if k then redis.call('ZREM', k, m) end
redis.call('DEL', KEYS[1])
return 1
)lua";

std::string ReservationMember(const std::string& id) { return absl::StrCat("r\t", id); }

std::string LeaseMember(const CallerLeaseRecord& lease) {
  return absl::StrCat("l\t", lease.lease_id, "\t", static_cast<int>(lease.tier), "\t", lease.account);
}

// The lease members of a reply from index `first` on (anything else is skipped).
std::vector<CallerLeaseRecord> LeasesOf(const RedisReply& reply, size_t first) {
  std::vector<CallerLeaseRecord> out;
  for (size_t i = first; i < reply.elements.size(); ++i) {
    std::vector<std::string> parts = absl::StrSplit(reply.elements[i].str, absl::MaxSplits('\t', 3));
    int tier = 0;
    if (parts.size() != 4 || parts[0] != "l" || !absl::SimpleAtoi(parts[2], &tier)) continue;
    out.push_back({std::move(parts[1]), std::move(parts[3]), static_cast<Tier>(tier)});
  }
  return out;
}

bool IsInteger(const RedisReply& r) { return r.type == RedisReply::Type::kInteger; }

}  // namespace

std::optional<CallerReserveResult> RedisState::ReserveCaller(const CallerReserveRequest& request) {
  absl::StatusOr<RedisReply> r =
      RoundTrip({"EVAL", kReserveCaller, "1", CallerKey(request.entry), absl::StrCat(Millis(request.now)),
                 absl::StrCat(Millis(request.expires)), absl::StrCat(request.max_inflight),
                 ReservationMember(request.reservation), Ms(request.expires - request.now)});
  if (!r.ok() || r->type != RedisReply::Type::kArray || r->elements.size() < 3 || !IsInteger(r->elements[0]) ||
      !IsInteger(r->elements[1]) || !IsInteger(r->elements[2])) {
    caller_unanswered_.fetch_add(1);
    return std::nullopt;
  }
  caller_round_trips_.fetch_add(1);
  CallerReserveResult out;
  out.admitted = r->elements[0].integer == 1;
  out.in_flight = static_cast<int>(r->elements[1].integer);
  out.pending = static_cast<int>(r->elements[2].integer);
  out.leases = LeasesOf(*r, 3);
  return out;
}

std::optional<CallerCommitResult> RedisState::CommitCaller(const CallerCommitRequest& request) {
  absl::StatusOr<RedisReply> r = RoundTrip(
      {"EVAL", kCommitCaller, "2", CallerKey(request.entry), CallerLeaseKey(request.lease.lease_id),
       absl::StrCat(Millis(request.now)), ReservationMember(request.reservation), LeaseMember(request.lease),
       absl::StrCat(Millis(request.expires)), absl::StrCat(request.max_accounts),
       absl::StrCat(static_cast<int>(request.lease.tier)), absl::StrCat(request.max_tier_accounts),
       request.lease.account, Ms(request.expires - request.now)});
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
    out.leases = LeasesOf(*r, 2);
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
