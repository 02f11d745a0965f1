#include "lib/selection/session_binder.h"

namespace tokenbroker {

SessionBinder::SessionBinder(absl::Duration idle_ttl, size_t capacity)
    : idle_ttl_(idle_ttl), capacity_(capacity == 0 ? 1 : capacity) {}

std::optional<std::string> SessionBinder::Lookup(const std::string& session, absl::Time now, absl::Time* previous_use) {
  auto it = index_.find(session);
  if (it == index_.end()) return std::nullopt;
  List::iterator node = it->second;
  if (now - node->last_used > idle_ttl_) {
    Erase(node);
    return std::nullopt;
  }
  if (previous_use != nullptr) *previous_use = node->last_used;
  node->last_used = now;
  lru_.splice(lru_.begin(), lru_, node);
  return node->account;
}

std::optional<std::string> SessionBinder::Peek(const std::string& session, absl::Time now) const {
  auto it = index_.find(session);
  if (it == index_.end() || now - it->second->last_used > idle_ttl_) return std::nullopt;
  return it->second->account;
}

void SessionBinder::Bind(const std::string& session, const std::string& account, absl::Time now) {
  if (auto it = index_.find(session); it != index_.end()) Erase(it->second);
  EvictExpired(now);
  while (index_.size() >= capacity_) Erase(std::prev(lru_.end()));
  lru_.push_front(Binding{session, account, now});
  index_.emplace(session, lru_.begin());
  ++per_account_[account];
}

std::vector<std::pair<std::string, std::string>> SessionBinder::Snapshot(absl::Time now) const {
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(index_.size());
  for (const Binding& b : lru_) {
    if (now - b.last_used > idle_ttl_) break;  // the rest are older still
    out.emplace_back(b.session, b.account);
  }
  return out;
}

int SessionBinder::CountFor(const std::string& account) const {
  auto it = per_account_.find(account);
  return it == per_account_.end() ? 0 : it->second;
}

void SessionBinder::Erase(List::iterator it) {
  auto count = per_account_.find(it->account);
  if (count != per_account_.end() && --count->second <= 0) per_account_.erase(count);
  index_.erase(it->session);
  lru_.erase(it);
}

void SessionBinder::EvictExpired(absl::Time now) {
  // The list is ordered by last use, so expired bindings sit at the tail.
  while (!lru_.empty() && now - lru_.back().last_used > idle_ttl_) Erase(std::prev(lru_.end()));
}

}  // namespace tokenbroker
