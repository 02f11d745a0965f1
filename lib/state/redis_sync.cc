#include <algorithm>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "lib/state/redis_codec.h"
#include "lib/state/redis_state.h"
#include "spdlog/spdlog.h"

// RedisState's background side: what other replicas publish (Dispatch), the full resync after a
// (re)connection, the subscriber and the batching writer threads.

namespace tokenbroker {

using namespace redis_internal;  // NOLINT: this file is their user

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
    batch.push_back({"SET", Key("c", account), c.dump(), "PX", Ms(CooldownTtl(state, clock_.Now()))});
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
      if (std::optional<SharedToken> t = TokenFromHash((*r)[i - start], clock_.Now())) {
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
    absl::Time next_ping = clock_.Now() + options_.connect_timeout;
    std::optional<absl::Time> ping_sent;
    while (!stopping() && !reconnect_.load()) {
      const absl::Time now = clock_.Now();
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
        next_ping = clock_.Now() + options_.connect_timeout;
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
                         json{{"r", replica_}, {"k", "u"}, {"u", usage}, {"at", Millis(clock_.Now())}}.dump()});
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
