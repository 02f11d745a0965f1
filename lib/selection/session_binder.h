#pragma once

#include <cstddef>
#include <list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Binds session ids to account ids. A binding expires after `idle_ttl` without use; past
// `capacity` bindings the least recently used one is evicted. Not thread-safe: the owner locks.
class SessionBinder {
 public:
  SessionBinder(absl::Duration idle_ttl, size_t capacity);

  // The account bound to `session`, if the binding is live at `now`; touches it.
  // `previous_use`, when given, receives the binding's last use before this one.
  std::optional<std::string> Lookup(const std::string& session, absl::Time now, absl::Time* previous_use = nullptr);
  // Like Lookup, but changes nothing.
  std::optional<std::string> Peek(const std::string& session, absl::Time now) const;
  // Binds (or rebinds) `session` to `account` at `now`.
  void Bind(const std::string& session, const std::string& account, absl::Time now);
  // Number of live-or-not-yet-evicted bindings pointing at `account`.
  int CountFor(const std::string& account) const;
  size_t size() const { return index_.size(); }
  // Every live binding at `now`: (session, account).
  std::vector<std::pair<std::string, std::string>> Snapshot(absl::Time now) const;

 private:
  struct Binding {
    std::string session;
    std::string account;
    absl::Time last_used;
  };
  using List = std::list<Binding>;  // most recently used first

  void Erase(List::iterator it);
  void EvictExpired(absl::Time now);

  absl::Duration idle_ttl_;
  size_t capacity_;
  List lru_;
  absl::flat_hash_map<std::string, List::iterator> index_;
  absl::flat_hash_map<std::string, int> per_account_;
};

}  // namespace tokenbroker
