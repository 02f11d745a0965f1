#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "lib/common/account.h"

namespace simdjson::dom {
class parser;
}  // namespace simdjson::dom

namespace tokenbroker {

// Parses one account file's JSON text in Antigravity-Manager's format. `id` becomes the record's
// id. Errors are INVALID_ARGUMENT naming the offending field; the message never quotes secrets.
// A member given twice counts with its last value; unknown members are ignored.
absl::StatusOr<AccountRecord> ParseAccountJson(const std::string& id, absl::string_view text);

// The same parse for many files in a row (AccountStore::LoadAll): keeps simdjson's buffers between
// files. Not thread-safe: one per thread.
class AccountJsonParser {
 public:
  // simdjson reads up to this many bytes past the end of the text (never using them).
  static constexpr size_t kPadding = 64;

  AccountJsonParser();
  ~AccountJsonParser();
  AccountJsonParser(const AccountJsonParser&) = delete;
  AccountJsonParser& operator=(const AccountJsonParser&) = delete;

  // As ParseAccountJson; `text.data()` must be followed by kPadding readable bytes.
  absl::StatusOr<AccountRecord> ParsePadded(const std::string& id, absl::string_view text);
  // As ParseAccountJson, for any text (copied into a padded buffer first).
  absl::StatusOr<AccountRecord> Parse(const std::string& id, absl::string_view text);

 private:
  std::unique_ptr<simdjson::dom::parser> parser_;
  std::string padded_;
};

}  // namespace tokenbroker
