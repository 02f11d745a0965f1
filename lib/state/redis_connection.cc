#include "lib/state/redis_connection.h"

#include <poll.h>
#include <sys/time.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "hiredis.h"
#include "lib/common/errors.h"

namespace tokenbroker {
namespace {


RedisReply Copy(const redisReply* r) {
  RedisReply out;
  switch (r->type) {
    case REDIS_REPLY_STRING:
      out.type = RedisReply::Type::kString;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_STATUS:
      out.type = RedisReply::Type::kStatus;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_ERROR:
      out.type = RedisReply::Type::kError;
      out.str.assign(r->str, r->len);
      break;
    case REDIS_REPLY_INTEGER:
      out.type = RedisReply::Type::kInteger;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = RedisReply::Type::kArray;
      out.elements.reserve(r->elements);
      for (size_t i = 0; i < r->elements; ++i) out.elements.push_back(Copy(r->element[i]));
      break;
    default:
      out.type = RedisReply::Type::kNil;
  }
  return out;
}

}  // namespace

absl::StatusOr<RedisAddress> ParseRedisUrl(absl::string_view url, absl::string_view field) {
  auto bad = [&](absl::string_view why) {
    return InvalidFieldError(std::string(field),
                             absl::StrCat("is '", url, "': ", why, "; use memory or redis://host:port[/db]"));
  };
  constexpr absl::string_view kScheme = "redis://";
  if (!absl::StartsWith(url, kScheme)) return bad("not a redis:// URL");
  absl::string_view rest = url.substr(kScheme.size());
  RedisAddress out;
  if (size_t slash = rest.find('/'); slash != absl::string_view::npos) {
    absl::string_view db = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
    if (!db.empty() && (!absl::SimpleAtoi(db, &out.db) || out.db < 0 || out.db > 15)) {
      return bad("the database must be a number from 0 to 15");
    }
  }
  if (rest.find('@') != absl::string_view::npos) return bad("credentials in the URL are not supported");
  if (size_t colon = rest.rfind(':'); colon != absl::string_view::npos) {
    if (!absl::SimpleAtoi(rest.substr(colon + 1), &out.port) || out.port <= 0 || out.port > 65535) {
      return bad("the port must be a number from 1 to 65535");
    }
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) return bad("the host is missing");
  out.host = std::string(rest);
  return out;
}

absl::StatusOr<std::unique_ptr<RedisConnection>> RedisConnection::Connect(const RedisAddress& address,
                                                                          absl::Duration timeout) {
  redisContext* c = redisConnectWithTimeout(address.host.c_str(), address.port, absl::ToTimeval(timeout));
  if (c == nullptr) return absl::UnavailableError("redis: out of memory");
  if (c->err != 0) {
    absl::Status s = absl::UnavailableError(
        absl::StrCat("redis ", address.host, ":", address.port, " unreachable: ", c->errstr));
    redisFree(c);
    return s;
  }
  redisSetTimeout(c, absl::ToTimeval(timeout));
  redisEnableKeepAlive(c);
  std::unique_ptr<RedisConnection> conn(new RedisConnection(c));
  if (!address.password.empty()) {
    absl::StatusOr<RedisReply> r = conn->Command({"AUTH", address.password});
    // Redis's answer ("WRONGPASS ...", "ERR AUTH <password> called without any password configured")
    // never repeats the password.
    if (!r.ok()) return absl::PermissionDeniedError(absl::StrCat("redis AUTH refused: ", r.status().message()));
  }
  if (address.db != 0) {
    absl::StatusOr<RedisReply> r = conn->Command({"SELECT", absl::StrCat(address.db)});
    if (!r.ok()) return r.status();
  }
  return conn;
}

RedisConnection::~RedisConnection() { redisFree(context_); }

absl::Status RedisConnection::IoError(absl::string_view what) {
  broken_ = true;
  return absl::UnavailableError(absl::StrCat("redis ", what, ": ", context_->err != 0 ? context_->errstr : "broken"));
}

absl::Status RedisConnection::Append(const std::vector<std::string>& argv) {
  std::vector<const char*> ptrs;
  std::vector<size_t> lens;
  ptrs.reserve(argv.size());
  lens.reserve(argv.size());
  for (const std::string& a : argv) {
    ptrs.push_back(a.data());
    lens.push_back(a.size());
  }
  if (redisAppendCommandArgv(context_, static_cast<int>(argv.size()), ptrs.data(), lens.data()) != REDIS_OK) {
    return IoError("write");
  }
  return absl::OkStatus();
}

absl::StatusOr<RedisReply> RedisConnection::ReadReply() {
  void* raw = nullptr;
  if (redisGetReply(context_, &raw) != REDIS_OK || raw == nullptr) return IoError("read");
  RedisReply out = Copy(static_cast<redisReply*>(raw));
  freeReplyObject(raw);
  return out;
}

absl::StatusOr<RedisReply> RedisConnection::Command(const std::vector<std::string>& argv) {
  if (broken_) return absl::UnavailableError("redis connection is broken");
  if (absl::Status s = Append(argv); !s.ok()) return s;
  absl::StatusOr<RedisReply> r = ReadReply();
  if (r.ok() && r->type == RedisReply::Type::kError) {
    return absl::InternalError(absl::StrCat("redis ", argv.empty() ? "" : argv[0], ": ", r->str));
  }
  return r;
}

absl::StatusOr<std::vector<RedisReply>> RedisConnection::Pipeline(
    const std::vector<std::vector<std::string>>& commands) {
  if (broken_) return absl::UnavailableError("redis connection is broken");
  for (const auto& argv : commands) {
    if (absl::Status s = Append(argv); !s.ok()) return s;
  }
  std::vector<RedisReply> out;
  out.reserve(commands.size());
  for (size_t i = 0; i < commands.size(); ++i) {
    absl::StatusOr<RedisReply> r = ReadReply();
    if (!r.ok()) return r.status();
    out.push_back(*std::move(r));
  }
  return out;
}

absl::Status RedisConnection::Send(const std::vector<std::string>& argv) {
  if (broken_) return absl::UnavailableError("redis connection is broken");
  if (absl::Status s = Append(argv); !s.ok()) return s;
  int done = 0;
  while (done == 0) {
    if (redisBufferWrite(context_, &done) != REDIS_OK) return IoError("write");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<RedisReply>> RedisConnection::Receive(absl::Duration wait) {
  if (broken_) return absl::UnavailableError("redis connection is broken");
  void* raw = nullptr;
  // A reply already read into hiredis's buffer comes first.
  if (redisGetReplyFromReader(context_, &raw) != REDIS_OK) return IoError("read");
  if (raw == nullptr) {
    pollfd p{context_->fd, POLLIN, 0};
    int n = poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(wait)));
    if (n == 0) return std::optional<RedisReply>();
    if (n < 0) return errno == EINTR ? absl::StatusOr<std::optional<RedisReply>>(std::optional<RedisReply>()) : IoError("poll");
    if (redisBufferRead(context_) != REDIS_OK) return IoError("read");
    if (redisGetReplyFromReader(context_, &raw) != REDIS_OK) return IoError("read");
    if (raw == nullptr) return std::optional<RedisReply>();  // a partial message: the rest comes later
  }
  RedisReply out = Copy(static_cast<redisReply*>(raw));
  freeReplyObject(raw);
  return std::optional<RedisReply>(std::move(out));
}

}  // namespace tokenbroker
