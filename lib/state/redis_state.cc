#include "lib/state/redis_state.h"

#include <algorithm>
#include <map>

#include "absl/random/random.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "spdlog/spdlog.h"

#include "lib/state/redis_codec.h"

namespace tokenbroker {
namespace {

using namespace redis_internal;  // NOLINT: this file is their user

std::string NewReplicaId() {
  absl::BitGen gen;
  return absl::StrCat(absl::Hex(absl::Uniform<uint64_t>(gen), absl::kZeroPad16));
}


}  // namespace

RedisState::RedisState(RedisStateOptions options)
    : options_(std::move(options)),
      clock_(options_.clock != nullptr ? *options_.clock : Clock::Real()),
      replica_(NewReplicaId()), channel_(options_.prefix + "events") {}

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
  const absl::Time deadline = clock_.Now() + timeout;
  absl::MutexLock lock(&queue_mu_);
  while (!Up()) {
    if (clock_.Now() >= deadline || stopping_) return Up();
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
  s.admissions = admissions_.load();
  s.admissions_at_cap = admissions_at_cap_.load();
  s.admissions_probe_elsewhere = admissions_probe_elsewhere_.load();
  s.admissions_unanswered = admissions_unanswered_.load();
  s.caller_round_trips = caller_round_trips_.load();
  s.caller_unanswered = caller_unanswered_.load();
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
    Enqueue({"SET", Key("c", o.account), CooldownsToJson(*cooldowns).dump(), "PX", Ms(CooldownTtl(*cooldowns, clock_.Now()))});
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
    Enqueue({"SET", Key("c", account), CooldownsToJson(*cooldowns).dump(), "PX", Ms(CooldownTtl(*cooldowns, clock_.Now()))});
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
  return clock_.AwaitUntil(
      wait_mu_,
      absl::Condition(
          +[](Args* a) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return a->self->token_events_[*a->account] != a->seen || !a->self->Up();
          },
          &args),
      deadline) && Up();
}

std::string RedisState::ProbeKey(const std::string& account, const std::string& scope) const {
  return Key("p", absl::StrCat(account, "|", scope));
}

std::optional<AdmissionResult> RedisState::Admit(const AdmissionRequest& request) {
  Argv argv = {"EVAL", kAdmit, absl::StrCat(1 + request.probe_scopes.size()), AdmissionKey(request.account)};
  for (const std::string& scope : request.probe_scopes) argv.push_back(ProbeKey(request.account, scope));
  argv.push_back(absl::StrCat(Millis(request.now)));
  argv.push_back(absl::StrCat(Millis(request.expires)));
  argv.push_back(absl::StrCat(request.cap));
  argv.push_back(request.lease_id);
  argv.push_back(Ms(request.probe_ttl));
  argv.push_back(Ms(request.expires - request.now));
  absl::StatusOr<RedisReply> r = RoundTrip(argv);
  if (!r.ok() || r->type != RedisReply::Type::kArray || r->elements.size() < 2 ||
      r->elements[0].type != RedisReply::Type::kInteger || r->elements[1].type != RedisReply::Type::kInteger) {
    admissions_unanswered_.fetch_add(1);
    return std::nullopt;
  }
  AdmissionResult out;
  out.in_flight = static_cast<int>(r->elements[1].integer);
  const bool has_time = r->elements.size() > 2 && r->elements[2].type == RedisReply::Type::kInteger;
  switch (r->elements[0].integer) {
    case 1:
      out.verdict = AdmissionVerdict::kAdmitted;
      admissions_.fetch_add(1);
      break;
    case 0:
      out.verdict = AdmissionVerdict::kAtCap;
      if (has_time) out.frees = FromMillis(r->elements[2].integer);
      admissions_at_cap_.fetch_add(1);
      break;
    default:
      out.verdict = AdmissionVerdict::kProbeElsewhere;
      if (has_time && r->elements[2].integer > 0) {
        out.frees = request.now + absl::Milliseconds(r->elements[2].integer);
      }
      admissions_probe_elsewhere_.fetch_add(1);
      break;
  }
  return out;
}

void RedisState::ReleaseAdmission(const std::string& account, const std::string& model, const std::string& lease_id,
                                  const std::vector<std::string>& family_scopes) {
  std::vector<std::string> command = {"EVAL", kReleaseAdmission, absl::StrCat(3 + family_scopes.size()),
                                      AdmissionKey(account), ProbeKey(account, ""), ProbeKey(account, model)};
  for (const std::string& scope : family_scopes) command.push_back(ProbeKey(account, scope));
  command.push_back(lease_id);
  Enqueue(std::move(command));
}

void RedisState::BumpTokenEvent(const std::string& account) {
  absl::MutexLock lock(&wait_mu_);
  ++token_events_[account];
}


}  // namespace tokenbroker
