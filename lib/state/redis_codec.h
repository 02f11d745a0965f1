#pragma once

// Internal to lib/state: the Lua scripts RedisState runs and the encodings it stores (shared by
// redis_state.cc, the request-path API, and redis_sync.cc, the subscriber and writer threads).

#include <cstdint>
#include <optional>
#include <string>

#include "absl/time/time.h"
#include "lib/selection/shared_state.h"
#include "lib/state/redis_connection.h"
#include "nlohmann/json.hpp"

namespace tokenbroker::redis_internal {

using json = nlohmann::json;

extern const char kClaimSession[];
extern const char kTakeLease[];
extern const char kLockRefresh[];
extern const char kStoreToken[];
extern const char kUnlock[];
extern const char kAdmit[];
extern const char kReleaseAdmission[];

int64_t Millis(absl::Time t);
absl::Time FromMillis(int64_t ms);
// A duration in whole milliseconds (at least 1), as Redis takes PX arguments.
std::string Ms(absl::Duration d);
json CooldownsToJson(const CooldownState& s);
// Unset for anything that is not what CooldownsToJson wrote (another version, a stray writer).
std::optional<CooldownState> CooldownsFromJson(const json& j);
// How long an account's cooldown state stays in Redis.
absl::Duration CooldownTtl(const CooldownState& state, absl::Time now);
// A token hash (`t:<account>`, as kStoreToken writes it); unset when empty, malformed, or not valid
// past `min_expiry`.
std::optional<SharedToken> TokenFromHash(const RedisReply& reply, absl::Time min_expiry);

}  // namespace tokenbroker::redis_internal
