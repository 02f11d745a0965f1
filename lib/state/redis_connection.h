#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

struct redisContext;

namespace tokenbroker {

// Where a Redis server is: from `redis://host:port[/db]`.
struct RedisAddress {
  std::string host;
  int port = 6379;
  int db = 0;
  std::string password;  // secret: sent with AUTH when set (never in the URL)
};

// Parses `redis://host:port[/db]` (port defaults to 6379, db to 0). INVALID_ARGUMENT naming
// `field` and the accepted form otherwise.
absl::StatusOr<RedisAddress> ParseRedisUrl(absl::string_view url, absl::string_view field);

// One reply, copied out of hiredis.
struct RedisReply {
  enum class Type { kNil, kString, kStatus, kInteger, kArray, kError };
  Type type = Type::kNil;
  std::string str;  // string, status and error replies
  long long integer = 0;
  std::vector<RedisReply> elements;

  bool is_nil() const { return type == Type::kNil; }
};

// A blocking connection to one Redis server with connect and command timeouts. After any I/O
// error or timeout it is broken() for good: drop it and connect again. Not thread-safe.
class RedisConnection {
 public:
  // Connects and SELECTs the database. UNAVAILABLE when the server cannot be reached in `timeout`.
  static absl::StatusOr<std::unique_ptr<RedisConnection>> Connect(const RedisAddress& address,
                                                                  absl::Duration timeout);
  ~RedisConnection();
  RedisConnection(const RedisConnection&) = delete;
  RedisConnection& operator=(const RedisConnection&) = delete;

  // Runs one command. An error reply is INTERNAL with Redis's message; I/O trouble is UNAVAILABLE.
  absl::StatusOr<RedisReply> Command(const std::vector<std::string>& argv);
  // Sends every command, then reads every reply (error replies stay in the vector).
  absl::StatusOr<std::vector<RedisReply>> Pipeline(const std::vector<std::vector<std::string>>& commands);
  // Sends one command without reading its reply (for a subscribed connection, whose replies
  // arrive among the pushed messages).
  absl::Status Send(const std::vector<std::string>& argv);
  // For a subscribed connection: the next pushed message, or nullopt when none came in `wait`.
  absl::StatusOr<std::optional<RedisReply>> Receive(absl::Duration wait);

  bool broken() const { return broken_; }

 private:
  explicit RedisConnection(redisContext* context) : context_(context) {}
  absl::Status IoError(absl::string_view what);
  absl::Status Append(const std::vector<std::string>& argv);
  absl::StatusOr<RedisReply> ReadReply();

  redisContext* context_;
  bool broken_ = false;
};

}  // namespace tokenbroker
