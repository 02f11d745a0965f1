#include "lib/state/redis_codec.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace tokenbroker::redis_internal {


using json = nlohmann::json;

// Binds the session unless another account holds it; returns the holder. Publishes a change.
// KEYS[1] session key. ARGV: expected ("" = unbound), want, ttl ms, channel, event.
const char kClaimSession[] = R"lua(
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] and cur ~= ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return cur
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if cur ~= ARGV[2] then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return ARGV[2]
)lua";

// Ends a lease for whoever reports it and tells its owner. KEYS[1] the lease hash. ARGV: lease id,
// channel, event.
const char kTakeLease[] = R"lua(
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return v
)lua";

// KEYS: token, lock, fence counter. ARGV: min expiry ms, lock ttl ms.
// -1: a token good past the minimum is stored; 0: another replica holds the lock; else the fence.
const char kLockRefresh[] = R"lua(
local exp = tonumber(redis.call('HGET', KEYS[1], 'exp') or '0')
if exp >= tonumber(ARGV[1]) then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local f = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], 2592000000)
redis.call('SET', KEYS[2], f, 'PX', ARGV[2])
return f
)lua";

// KEYS: token, lock. ARGV: fence, token, expiry ms, refresh token ("" = unchanged), channel, event.
// Refuses a writer whose fence is older than the stored token's (it came too late).
const char kStoreToken[] = R"lua(
local old = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local f = tonumber(ARGV[1])
if f < old then return 0 end
redis.call('HSET', KEYS[1], 'tok', ARGV[2], 'exp', ARGV[3], 'fence', ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'rt', ARGV[4]) end
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
)lua";

// KEYS[1] lock. ARGV[1] fence.
const char kUnlock[] = R"lua(
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
)lua";

// Fleet-wide admission (issue 16): a sorted set per account of lease ids scored by their expiry.
// Expired ones are dropped, the rest counted, this one added if below the cap; then every probe
// token is taken unless one is held. One script: no replica can slip in between count and add.
// KEYS[1] the account's lease set; KEYS[2..] probe tokens. ARGV: now ms, expiry ms, cap, lease id,
// probe ttl ms, set ttl ms. Returns {1, count} admitted; {0, count, earliest expiry ms} at the cap;
// {2, 0, probe's remaining ms} when another replica holds a probe token.
const char kAdmit[] = R"lua(
local cap = tonumber(ARGV[3])
local n = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  n = redis.call('ZCARD', KEYS[1])
  if n >= cap then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, n, tonumber(first[2])}
  end
end
for i = 2, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= ARGV[4] then return {2, 0, redis.call('PTTL', KEYS[i])} end
end
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[4], 'PX', ARGV[5]) end
if cap > 0 then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  n = n + 1
end
return {1, n}
)lua";

// KEYS[1] the account's lease set; KEYS[2..] probe tokens it may hold. ARGV[1] lease id.
const char kReleaseAdmission[] = R"lua(
redis.call('ZREM', KEYS[1], ARGV[1])
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return 1
)lua";

int64_t Millis(absl::Time t) { return absl::ToUnixMillis(t); }
absl::Time FromMillis(int64_t ms) {
  if (ms == std::numeric_limits<int64_t>::max()) return absl::InfiniteFuture();
  return absl::FromUnixMillis(ms);
}
std::string Ms(absl::Duration d) { return absl::StrCat(std::max<int64_t>(1, absl::ToInt64Milliseconds(d))); }

json CooldownsToJson(const CooldownState& s) {
  json items = json::array();
  for (const CooldownState::Item& i : s.items) {
    json item = {{"m", i.model}, {"u", Millis(i.until)}, {"why", i.reason}, {"q", i.quota}};
    if (i.family) item["f"] = true;  // a family's cooldown: "m" names the family
    items.push_back(std::move(item));
  }
  return {{"items", items}, {"streak", s.streak}, {"vu", s.validation_url}};
}

// Unset for anything that is not what CooldownsToJson wrote (another version, a stray writer).
std::optional<CooldownState> CooldownsFromJson(const json& j) {
  if (!j.is_object()) return std::nullopt;
  try {
    CooldownState s;
    s.streak = j.value("streak", 0);
    s.validation_url = j.value("vu", "");
    for (const json& i : j.value("items", json::array())) {
      if (!i.is_object()) continue;
      s.items.push_back({i.value("m", ""), FromMillis(i.value("u", int64_t{0})), i.value("why", ""),
                         i.value("q", false), i.value("f", false)});
    }
    return s;
  } catch (const json::exception&) {
    return std::nullopt;
  }
}

// How long an account's cooldown state stays in Redis: a day past its last cooldown (so a streak
// is remembered a while), at most 30 days.
absl::Duration CooldownTtl(const CooldownState& state, absl::Time now) {
  absl::Time last = now;
  for (const CooldownState::Item& i : state.items) last = std::max(last, i.until);
  return std::min(last - now + absl::Hours(24), absl::Hours(24 * 30));
}

// A token hash (`t:<account>`, as kStoreToken writes it); unset when empty, malformed, or not valid
// past `min_expiry`.
std::optional<SharedToken> TokenFromHash(const RedisReply& reply, absl::Time min_expiry) {
  if (reply.type != RedisReply::Type::kArray) return std::nullopt;
  SharedToken t;
  int64_t exp = 0;
  for (size_t i = 0; i + 1 < reply.elements.size(); i += 2) {
    const std::string& field = reply.elements[i].str;
    const std::string& value = reply.elements[i + 1].str;
    if (field == "tok") t.access_token = value;
    if (field == "exp") (void)absl::SimpleAtoi(value, &exp);
    if (field == "rt") t.refresh_token = value;
  }
  t.expiry = absl::FromUnixMillis(exp);
  if (t.access_token.empty() || t.expiry < min_expiry) return std::nullopt;
  return t;
}


}  // namespace tokenbroker::redis_internal
