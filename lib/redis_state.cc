#include "lib/redis_state.h"

#include <algorithm>
#include <map>

#include "absl/random/random.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

using json = nlohmann::json;

// Binds the session unless another account holds it; returns the holder. Publishes a change.
// KEYS[1] session key. ARGV: expected ("" = unbound), want, ttl ms, channel, event.
constexpr char kClaimSession[] = R"lua(
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
constexpr char kTakeLease[] = R"lua(
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return v
)lua";

// KEYS: token, lock, fence counter. ARGV: min expiry ms, lock ttl ms.
// -1: a token good past the minimum is stored; 0: another replica holds the lock; else the fence.
constexpr char kLockRefresh[] = R"lua(
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
constexpr char kStoreToken[] = R"lua(
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
constexpr char kUnlock[] = R"lua(
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
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
    items.push_back({{"m", i.model}, {"u", Millis(i.until)}, {"why", i.reason}, {"q", i.quota}});
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
      s.items.push_back(
          {i.value("m", ""), FromMillis(i.value("u", int64_t{0})), i.value("why", ""), i.value("q", false)});
    }
    return s;
  } catch (const json::exception&) {
    return std::nullopt;
  }
}

// How long an account's cooldown state stays in Redis: a day past its last cooldown (so a streak
// is remembered a while), at most 30 days.
absl::Duration CooldownTtl(const CooldownState& state) {
  const absl::Time now = absl::Now();
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

std::string NewReplicaId() {
  absl::BitGen gen;
  return absl::StrCat(absl::Hex(absl::Uniform<uint64_t>(gen), absl::kZeroPad16));
}

}  // namespace

RedisState::RedisState(RedisStateOptions options)
    : options_(std::move(options)), replica_(NewReplicaId()), channel_(options_.prefix + "events") {}

RedisState::~RedisState() { Stop(); }

std::string RedisState::Key(absl::string_view kind, absl::string_view id) const {
  return absl::StrCat(options_.prefix, kind, ":", id);
}

void RedisState::Start(SharedStateListener* listener) {
  listener_ = listener;
  subscriber_ = std::thread([this] { SubscriberLoop(); });
  writer_ = std::thread([this] { WriterLoop(); });
}

void RedisState::Stop() {
  {
    absl::MutexLock lock(&queue_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (subscriber_.joinable()) subscriber_.join();
  if (writer_.joinable()) writer_.join();
  up_.store(false);
}

bool RedisState::WaitUntilUp(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&queue_mu_);
  while (!Up()) {
    if (absl::Now() >= deadline || stopping_) return Up();
    queue_mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(10));
  }
  return true;
}

SharedStateStats RedisState::stats() const {
  SharedStateStats s;
  s.up = Up();
  s.errors = errors_.load();
  s.resyncs = resyncs_.load();
  s.events_received = events_received_.load();
  s.writes = writes_.load();
  s.writes_dropped = writes_dropped_.load();
  return s;
}

void RedisState::MarkDown(const absl::Status& why) {
  errors_.fetch_add(1);
  if (up_.exchange(false)) {
    spdlog::warn("state backend redis {}:{} is down ({}); carrying on with this replica's view",
                 options_.address.host, options_.address.port, std::string(why.message()));
  }
  reconnect_.store(true);
}

absl::StatusOr<RedisReply> RedisState::RoundTrip(const Argv& argv) {
  if (!Up()) return absl::UnavailableError("state backend is down");
  std::unique_ptr<RedisConnection> conn;
  {
    absl::MutexLock lock(&pool_mu_);
    if (!idle_.empty()) {
      conn = std::move(idle_.back());
      idle_.pop_back();
    }
  }
  if (conn == nullptr) {
    absl::StatusOr<std::unique_ptr<RedisConnection>> c =
        RedisConnection::Connect(options_.address, options_.command_timeout);
    if (!c.ok()) {
      MarkDown(c.status());
      return c.status();
    }
    conn = *std::move(c);
  }
  absl::StatusOr<RedisReply> reply = conn->Command(argv);
  if (!reply.ok()) {
    if (conn->broken()) {
      MarkDown(reply.status());
    } else {
      errors_.fetch_add(1);
      spdlog::error("state backend: {}", std::string(reply.status().message()));
    }
  }
  if (!conn->broken()) {
    absl::MutexLock lock(&pool_mu_);
    idle_.push_back(std::move(conn));
  }
  return reply;
}

void RedisState::Enqueue(Argv argv) {
  if (!Up()) {
    writes_dropped_.fetch_add(1);
    return;
  }
  absl::MutexLock lock(&queue_mu_);
  queue_.push_back(std::move(argv));
}

std::optional<std::string> RedisState::ClaimSession(const std::string& session, const std::string& expected,
                                                    const std::string& want) {
  const std::string event = json{{"r", replica_}, {"k", "s"}, {"s", session}, {"a", want}}.dump();
  absl::StatusOr<RedisReply> r = RoundTrip({"EVAL", kClaimSession, "1", Key("s", session), expected, want,
                                            Ms(options_.session_ttl), channel_, event});
  if (!r.ok() || r->type != RedisReply::Type::kString) return std::nullopt;
  return r->str;
}

void RedisState::TouchSession(const std::string& session) {
  if (!Up()) return;
  absl::MutexLock lock(&queue_mu_);
  touches_.insert(session);
}

std::string RedisState::LeaseKey(const std::string& lease_id) const {
  // "l-" + 16 hex digits of the table's prefix + 16 of the counter.
  return Key("l", lease_id.size() > 18 ? absl::string_view(lease_id).substr(2, 16) : absl::string_view(lease_id));
}

void RedisState::LeaseIssued(const std::string& lease_id, const std::string& account, const std::string& model) {
  if (!Up()) {
    writes_dropped_.fetch_add(1);
    return;
  }
  std::string value;
  value.reserve(account.size() + model.size() + 1);
  value.append(account).push_back('\t');
  value.append(model);
  absl::MutexLock lock(&queue_mu_);
  lease_adds_.emplace_back(lease_id, std::move(value));
}

void RedisState::LeaseEnded(const std::string& lease_id) {
  if (!Up()) return;
  absl::MutexLock lock(&queue_mu_);
  lease_dels_.push_back(lease_id);
}

std::optional<SharedLease> RedisState::TakeLease(const std::string& lease_id) {
  const std::string event = json{{"r", replica_}, {"k", "l"}, {"id", lease_id}}.dump();
  absl::StatusOr<RedisReply> r = RoundTrip({"EVAL", kTakeLease, "1", LeaseKey(lease_id), lease_id, channel_, event});
  if (!r.ok() || r->type != RedisReply::Type::kString) return std::nullopt;
  std::vector<std::string> parts = absl::StrSplit(r->str, absl::MaxSplits('\t', 1));
  if (parts.size() != 2) return std::nullopt;
  return SharedLease{lease_id, parts[0], parts[1]};
}

void RedisState::OutcomeApplied(const SharedOutcome& o, const std::optional<CooldownState>& cooldowns) {
  if (!Up()) {
    writes_dropped_.fetch_add(1);
    return;
  }
  json event = {{"r", replica_}, {"k", "o"},           {"a", o.account},   {"m", o.model},
                {"st", o.http_status}, {"ra", o.retry_after}, {"b", o.error_body}, {"at", Millis(o.at)}};
  Enqueue({"PUBLISH", channel_, event.dump()});
  if (cooldowns) {
    Enqueue({"SET", Key("c", o.account), CooldownsToJson(*cooldowns).dump(), "PX", Ms(CooldownTtl(*cooldowns))});
  } else {
    Enqueue({"DEL", Key("c", o.account)});
  }
}

void RedisState::AccountDisabled(const std::string& account, const std::string& reason) {
  Enqueue({"SET", Key("d", account), reason, "PX", Ms(options_.disable_ttl)});
  Enqueue({"PUBLISH", channel_, json{{"r", replica_}, {"k", "d"}, {"a", account}, {"why", reason}}.dump()});
}

void RedisState::TokenDropped(const std::string& account) { Enqueue({"DEL", Key("t", account)}); }

void RedisState::AccountReset(const std::string& account, const std::string& model, bool enabled,
                              const std::optional<CooldownState>& cooldowns) {
  if (cooldowns) {
    Enqueue({"SET", Key("c", account), CooldownsToJson(*cooldowns).dump(), "PX", Ms(CooldownTtl(*cooldowns))});
  } else {
    Enqueue({"DEL", Key("c", account)});
  }
  if (enabled) Enqueue({"DEL", Key("d", account)});
  Enqueue({"PUBLISH", channel_,
           json{{"r", replica_}, {"k", "x"}, {"a", account}, {"m", model}, {"e", enabled}}.dump()});
}

std::optional<SharedToken> RedisState::FetchToken(const std::string& account, absl::Time min_expiry) {
  absl::StatusOr<RedisReply> r = RoundTrip({"HGETALL", Key("t", account)});
  if (!r.ok()) return std::nullopt;
  return TokenFromHash(*r, min_expiry);
}

absl::StatusOr<int64_t> RedisState::LockRefresh(const std::string& account, absl::Time min_expiry) {
  absl::StatusOr<RedisReply> r =
      RoundTrip({"EVAL", kLockRefresh, "3", Key("t", account), Key("lock", account), Key("f", account),
                 absl::StrCat(Millis(min_expiry)), Ms(options_.refresh_lock_ttl)});
  if (!r.ok()) return r.status();
  if (r->type != RedisReply::Type::kInteger) return absl::InternalError("state backend: unexpected lock reply");
  return static_cast<int64_t>(r->integer);
}

bool RedisState::StoreToken(const std::string& account, const SharedToken& token, int64_t fence) {
  json event = {{"r", replica_}, {"k", "t"}, {"a", account}, {"tok", token.access_token}, {"exp", Millis(token.expiry)}};
  if (token.refresh_token) event["rt"] = *token.refresh_token;
  absl::StatusOr<RedisReply> r =
      RoundTrip({"EVAL", kStoreToken, "2", Key("t", account), Key("lock", account), absl::StrCat(fence),
                 token.access_token, absl::StrCat(Millis(token.expiry)), token.refresh_token.value_or(""),
                 channel_, event.dump()});
  return r.ok() && r->type == RedisReply::Type::kInteger && r->integer == 1;
}

void RedisState::UnlockRefresh(const std::string& account, int64_t fence) {
  (void)RoundTrip({"EVAL", kUnlock, "1", Key("lock", account), absl::StrCat(fence)});
}

bool RedisState::WaitForToken(const std::string& account, absl::Time deadline) {
  absl::MutexLock lock(&wait_mu_);
  const uint64_t seen = token_events_[account];
  struct Args {
    RedisState* self;
    const std::string* account;
    uint64_t seen;
  } args{this, &account, seen};
  // Wakes on a token or disable event for the account, or when the backend goes down.
  return wait_mu_.AwaitWithDeadline(
      absl::Condition(
          +[](Args* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return a->self->token_events_[*a->account] != a->seen || !a->self->Up();
          },
          &args),
      deadline) && Up();
}

void RedisState::BumpTokenEvent(const std::string& account) {
  absl::MutexLock lock(&wait_mu_);
  ++token_events_[account];
}

void RedisState::Dispatch(const std::string& message) {
  json j = json::parse(message, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return;
  std::string kind;
  try {
    if (j.value("r", "") == replica_) return;
    kind = j.value("k", "");
    events_received_.fetch_add(1);
    if (kind == "s") {
      listener_->OnRemoteSession(j.at("s").get<std::string>(), j.at("a").get<std::string>());
    } else if (kind == "o") {
      SharedOutcome o;
      o.account = j.at("a").get<std::string>();
      o.model = j.at("m").get<std::string>();
      o.http_status = j.at("st").get<int>();
      o.retry_after = j.value("ra", "");
      o.error_body = j.value("b", "");
      o.at = absl::FromUnixMillis(j.at("at").get<int64_t>());
      listener_->OnRemoteOutcome(o);
    } else if (kind == "d") {
      const std::string account = j.at("a").get<std::string>();
      listener_->OnRemoteDisable(account, j.value("why", "disabled by another replica"));
      BumpTokenEvent(account);
    } else if (kind == "t") {
      const std::string account = j.at("a").get<std::string>();
      SharedToken t;
      t.access_token = j.at("tok").get<std::string>();
      t.expiry = absl::FromUnixMillis(j.at("exp").get<int64_t>());
      if (j.contains("rt")) t.refresh_token = j.at("rt").get<std::string>();
      listener_->OnRemoteToken(account, t);
      BumpTokenEvent(account);
    } else if (kind == "c") {
      if (std::optional<CooldownState> c = CooldownsFromJson(j.at("c"))) {
        listener_->OnRemoteCooldowns(j.at("a").get<std::string>(), *c);
      }
    } else if (kind == "l") {
      listener_->OnRemoteLeaseEnd(j.at("id").get<std::string>());
    } else if (kind == "x") {
      listener_->OnRemoteReset(j.at("a").get<std::string>(), j.value("m", ""), j.value("e", false));
    } else if (kind == "u") {
      const absl::Time at = absl::FromUnixMillis(j.at("at").get<int64_t>());
      for (const json& u : j.at("u")) {
        listener_->OnRemoteLeasesIssued(u.at(0).get<std::string>(), u.at(1).get<std::string>(), u.at(2).get<int>(), at);
      }
    }
  } catch (const json::exception& e) {
    // Another version's event, or a stray publisher: never fatal.
    spdlog::warn("state backend: ignoring a malformed '{}' event: {}", kind, e.what());
  }
}

absl::Status RedisState::Resync(RedisConnection& conn) {
  // 1. Merge in what the other replicas know: cooldowns and runtime disables.
  for (absl::string_view kind : {"c", "d"}) {
    std::string cursor = "0";
    do {
      absl::StatusOr<RedisReply> page =
          conn.Command({"SCAN", cursor, "MATCH", Key(kind, "*"), "COUNT", "1000"});
      if (!page.ok()) return page.status();
      if (page->elements.size() != 2) return absl::InternalError("state backend: unexpected SCAN reply");
      cursor = page->elements[0].str;
      const std::vector<RedisReply>& keys = page->elements[1].elements;
      if (keys.empty()) continue;
      Argv mget = {"MGET"};
      for (const RedisReply& k : keys) mget.push_back(k.str);
      absl::StatusOr<RedisReply> values = conn.Command(mget);
      if (!values.ok()) return values.status();
      const size_t skip = Key(kind, "").size();
      for (size_t i = 0; i < keys.size() && i < values->elements.size(); ++i) {
        if (values->elements[i].is_nil()) continue;
        const std::string account = keys[i].str.substr(skip);
        if (kind == "c") {
          json j = json::parse(values->elements[i].str, nullptr, false);
          if (std::optional<CooldownState> s = CooldownsFromJson(j)) listener_->OnRemoteCooldowns(account, *s);
        } else {
          listener_->OnRemoteDisable(account, values->elements[i].str);
        }
      }
    } while (cursor != "0");
  }
  // 2. Upload this replica's view: merged cooldowns, disables, and sessions (a binding Redis
  //    already has wins; this replica adopts it).
  LocalState local = listener_->SnapshotForResync();
  std::vector<Argv> batch;
  //    What was uploaded is also published: replicas that resynced earlier learn it too.
  for (const auto& [account, state] : local.cooldowns) {
    json c = CooldownsToJson(state);
    batch.push_back({"SET", Key("c", account), c.dump(), "PX", Ms(CooldownTtl(state))});
    batch.push_back({"PUBLISH", channel_, json{{"r", replica_}, {"k", "c"}, {"a", account}, {"c", c}}.dump()});
  }
  for (const auto& [account, reason] : local.disabled) {
    batch.push_back({"SET", Key("d", account), reason, "PX", Ms(options_.disable_ttl), "NX"});
    batch.push_back({"PUBLISH", channel_, json{{"r", replica_}, {"k", "d"}, {"a", account}, {"why", reason}}.dump()});
  }
  if (!batch.empty()) {
    absl::StatusOr<std::vector<RedisReply>> r = conn.Pipeline(batch);
    if (!r.ok()) return r.status();
  }
  constexpr size_t kBatch = 1000;
  for (size_t start = 0; start < local.sessions.size(); start += kBatch) {
    batch.clear();
    const size_t end = std::min(local.sessions.size(), start + kBatch);
    for (size_t i = start; i < end; ++i) {
      const auto& [session, account] = local.sessions[i];
      const std::string event = json{{"r", replica_}, {"k", "s"}, {"s", session}, {"a", account}}.dump();
      batch.push_back({"EVAL", kClaimSession, "1", Key("s", session), account, account, Ms(options_.session_ttl),
                       channel_, event});
    }
    absl::StatusOr<std::vector<RedisReply>> r = conn.Pipeline(batch);
    if (!r.ok()) return r.status();
    for (size_t i = start; i < end; ++i) {
      const RedisReply& reply = (*r)[i - start];
      if (reply.type == RedisReply::Type::kString && reply.str != local.sessions[i].second) {
        listener_->OnRemoteSession(local.sessions[i].first, reply.str);
      }
    }
  }
  // 3. Tokens other replicas refreshed.
  std::vector<std::string> ids = listener_->AccountIds();
  for (size_t start = 0; start < ids.size(); start += kBatch) {
    batch.clear();
    const size_t end = std::min(ids.size(), start + kBatch);
    for (size_t i = start; i < end; ++i) batch.push_back({"HGETALL", Key("t", ids[i])});
    absl::StatusOr<std::vector<RedisReply>> r = conn.Pipeline(batch);
    if (!r.ok()) return r.status();
    for (size_t i = start; i < end; ++i) {
      if (std::optional<SharedToken> t = TokenFromHash((*r)[i - start], absl::Now())) {
        listener_->OnRemoteToken(ids[i], *t);
      }
    }
  }
  return absl::OkStatus();
}

void RedisState::SubscriberLoop() {
  absl::Duration backoff = absl::Milliseconds(50);
  auto stopping = [this] {
    absl::MutexLock lock(&queue_mu_);
    return stopping_;
  };
  auto pause = [this](absl::Duration d) {
    absl::MutexLock lock(&queue_mu_);
    queue_mu_.AwaitWithTimeout(absl::Condition(&stopping_), d);
  };
  bool reported = false;
  while (!stopping()) {
    absl::StatusOr<std::unique_ptr<RedisConnection>> sub =
        RedisConnection::Connect(options_.address, options_.connect_timeout);
    absl::Status status = sub.status();
    if (status.ok()) status = (*sub)->Command({"SUBSCRIBE", channel_}).status();
    // The resync runs on its own connection: the subscribed one only listens.
    std::unique_ptr<RedisConnection> sync;
    if (status.ok()) {
      absl::StatusOr<std::unique_ptr<RedisConnection>> c =
          RedisConnection::Connect(options_.address, options_.connect_timeout);
      status = c.status();
      if (c.ok()) sync = *std::move(c);
    }
    if (status.ok()) {
      reconnect_.store(false);
      status = Resync(*sync);
    }
    if (!status.ok()) {
      errors_.fetch_add(1);
      if (!reported) {
        spdlog::warn("state backend redis {}:{} unavailable ({}); carrying on with this replica's view and retrying",
                     options_.address.host, options_.address.port, std::string(status.message()));
        reported = true;
      }
      pause(backoff);
      backoff = std::min(backoff * 2, absl::Seconds(1));
      continue;
    }
    {
      // Connections from before the outage are dead: start the pool afresh.
      absl::MutexLock lock(&pool_mu_);
      idle_.clear();
    }
    resyncs_.fetch_add(1);
    up_.store(true, std::memory_order_release);
    spdlog::info("state backend redis {}:{} connected and resynced (replica {})", options_.address.host,
                 options_.address.port, replica_);
    reported = false;
    backoff = absl::Milliseconds(50);
    // A server that dies closes the connection at once; one that hangs is caught by a PING that
    // goes unanswered for connect_timeout.
    absl::Time next_ping = absl::Now() + options_.connect_timeout;
    std::optional<absl::Time> ping_sent;
    while (!stopping() && !reconnect_.load()) {
      const absl::Time now = absl::Now();
      if (ping_sent && now - *ping_sent > options_.connect_timeout) {
        MarkDown(absl::DeadlineExceededError("PING unanswered"));
        break;
      }
      if (!ping_sent && now >= next_ping) {
        if (absl::Status s = (*sub)->Send({"PING"}); !s.ok()) {
          MarkDown(s);
          break;
        }
        ping_sent = now;
      }
      absl::StatusOr<std::optional<RedisReply>> msg = (*sub)->Receive(absl::Milliseconds(100));
      if (!msg.ok()) {
        MarkDown(msg.status());
        break;
      }
      if (!msg->has_value()) continue;
      const RedisReply& m = **msg;
      if (m.type == RedisReply::Type::kArray && m.elements.size() == 3 && m.elements[0].str == "message") {
        Dispatch(m.elements[2].str);
      } else if (m.type == RedisReply::Type::kArray && !m.elements.empty() && m.elements[0].str == "pong") {
        ping_sent.reset();
        next_ping = absl::Now() + options_.connect_timeout;
      }
    }
    up_.store(false);
  }
}

void RedisState::WriterLoop() {
  std::unique_ptr<RedisConnection> conn;
  while (true) {
    std::vector<Argv> batch;
    {
      absl::MutexLock lock(&queue_mu_);
      queue_mu_.Await(absl::Condition(
          +[](RedisState* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return self->stopping_ || !self->queue_.empty() || !self->touches_.empty() ||
                   !self->lease_adds_.empty() || !self->lease_dels_.empty();
          },
          this));
      if (stopping_) return;
      // Lease and session-TTL writes (one per request on a busy replica) linger a moment so they go
      // out as a few large batches; anything else (outcomes, disables: what other replicas must see
      // soon) ends the wait at once.
      if (queue_.empty()) {
        queue_mu_.AwaitWithTimeout(absl::Condition(
                                       +[](RedisState* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                         return self->stopping_ || !self->queue_.empty();
                                       },
                                       this),
                                   options_.write_linger);
      }
      if (stopping_) return;
      batch.reserve(queue_.size() + touches_.size() + 3);
      for (Argv& a : queue_) batch.push_back(std::move(a));
      queue_.clear();
      for (const std::string& s : touches_) batch.push_back({"PEXPIRE", Key("s", s), Ms(options_.session_ttl)});
      touches_.clear();
      // One HSET (and one PEXPIRE) per lease hash for all new leases, one HDEL for all ended ones.
      // An id issued and ended within the batch is neither written nor deleted.
      absl::flat_hash_set<absl::string_view> ended(lease_dels_.begin(), lease_dels_.end());
      // Ids of one table share their hash: the command is looked up once per run of them.
      std::map<std::string, Argv> sets, dels;
      auto command_for = [this](std::map<std::string, Argv>& by_key, const char* verb, const std::string& id,
                                Argv*& last, std::string& last_prefix) -> Argv& {
        absl::string_view prefix = absl::string_view(id).substr(0, 18);
        if (last == nullptr || prefix != last_prefix) {
          std::string key = LeaseKey(id);
          Argv& cmd = by_key[key];
          if (cmd.empty()) cmd = {verb, std::move(key)};
          last = &cmd;
          last_prefix = std::string(prefix);
        }
        return *last;
      };
      // The other replicas count these leases against the accounts' quota estimates: one event per
      // batch, (account, model, count) each.
      if (!lease_adds_.empty()) {
        std::map<absl::string_view, int> issued;
        for (const auto& [id, value] : lease_adds_) ++issued[value];
        json usage = json::array();
        for (const auto& [value, count] : issued) {
          std::vector<std::string> parts = absl::StrSplit(value, absl::MaxSplits('\t', 1));
          if (parts.size() == 2) usage.push_back({parts[0], parts[1], count});
        }
        batch.push_back({"PUBLISH", channel_,
                         json{{"r", replica_}, {"k", "u"}, {"u", usage}, {"at", Millis(absl::Now())}}.dump()});
      }
      Argv* last = nullptr;
      std::string last_prefix;
      for (auto& [id, value] : lease_adds_) {
        if (ended.erase(id) > 0) continue;
        Argv& cmd = command_for(sets, "HSET", id, last, last_prefix);
        cmd.push_back(std::move(id));
        cmd.push_back(std::move(value));
      }
      last = nullptr;
      for (std::string& id : lease_dels_) {
        if (!ended.contains(id)) continue;
        Argv& cmd = command_for(dels, "HDEL", id, last, last_prefix);
        cmd.push_back(id);  // copied: `ended` still views these strings
      }
      for (auto& [key, cmd] : sets) {
        batch.push_back(std::move(cmd));
        batch.push_back({"PEXPIRE", key, Ms(options_.lease_ttl)});
      }
      for (auto& [key, cmd] : dels) batch.push_back(std::move(cmd));
      lease_adds_.clear();
      lease_dels_.clear();
    }
    if (!Up()) {
      writes_dropped_.fetch_add(static_cast<int64_t>(batch.size()));
      conn.reset();
      continue;
    }
    if (conn == nullptr || conn->broken()) {
      // Batches can be large: the writer waits longer than a request-path round trip would.
      absl::StatusOr<std::unique_ptr<RedisConnection>> c =
          RedisConnection::Connect(options_.address, options_.connect_timeout);
      if (!c.ok()) {
        writes_dropped_.fetch_add(static_cast<int64_t>(batch.size()));
        MarkDown(c.status());
        continue;
      }
      conn = *std::move(c);
    }
    absl::StatusOr<std::vector<RedisReply>> r = conn->Pipeline(batch);
    if (!r.ok()) {
      writes_dropped_.fetch_add(static_cast<int64_t>(batch.size()));
      MarkDown(r.status());
      conn.reset();
      continue;
    }
    writes_.fetch_add(static_cast<int64_t>(batch.size()));
  }
}

}  // namespace tokenbroker
