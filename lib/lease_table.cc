#include "lib/lease_table.h"


namespace tokenbroker {

namespace {

void AppendHex(uint64_t v, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int shift = 60; shift >= 0; shift -= 4) out->push_back(kHex[(v >> shift) & 15]);
}

}  // namespace

std::string LeaseTable::IdOf(uint64_t counter) const {
  std::string id;
  id.reserve(34);
  id.append("l-");
  AppendHex(prefix_, &id);
  AppendHex(counter, &id);
  return id;
}

std::optional<uint64_t> LeaseTable::CounterOf(const std::string& id) const {
  if (id.size() != 34 || id[0] != 'l' || id[1] != '-') return std::nullopt;
  uint64_t prefix = 0, counter = 0;
  for (size_t i = 2; i < 34; ++i) {
    const char c = id[i];
    uint64_t digit;
    if (c >= '0' && c <= '9') {
      digit = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      digit = static_cast<uint64_t>(c - 'a' + 10);
    } else {
      return std::nullopt;
    }
    uint64_t& part = i < 18 ? prefix : counter;
    part = (part << 4) | digit;
  }
  if (prefix != prefix_ || prefix_ == 0) return std::nullopt;
  return counter;
}

IssuedLease LeaseTable::Issue(const std::string& account, const std::string& model, absl::Time now) {
  if (prefix_ == 0) prefix_ = absl::Uniform<uint64_t>(rng_) | 1;
  const uint64_t counter = ++counter_;
  const absl::Time expires = now + timeout_;
  by_counter_.emplace(counter, Slot{account, model, expires});
  by_expiry_.emplace(expires, counter);
  ++in_flight_[account];
  return IssuedLease{IdOf(counter), expires};
}

Lease LeaseTable::Take(Map::iterator it) {
  Lease lease{IdOf(it->first), std::move(it->second.account), std::move(it->second.model), it->second.expires};
  by_expiry_.erase({lease.expires, it->first});
  if (auto c = in_flight_.find(lease.account); c != in_flight_.end() && --c->second <= 0) in_flight_.erase(c);
  by_counter_.erase(it);
  return lease;
}

std::optional<Lease> LeaseTable::End(const std::string& id) {
  std::optional<uint64_t> counter = CounterOf(id);
  if (!counter) return std::nullopt;
  auto it = by_counter_.find(*counter);
  if (it == by_counter_.end()) return std::nullopt;
  return Take(it);
}

bool LeaseTable::Contains(const std::string& id) const {
  std::optional<uint64_t> counter = CounterOf(id);
  return counter && by_counter_.contains(*counter);
}

std::vector<Lease> LeaseTable::Expire(absl::Time now) {
  std::vector<Lease> out;
  while (!by_expiry_.empty() && by_expiry_.begin()->first <= now) {
    auto it = by_counter_.find(by_expiry_.begin()->second);
    if (it == by_counter_.end()) {
      by_expiry_.erase(by_expiry_.begin());
      continue;
    }
    out.push_back(Take(it));
  }
  return out;
}

std::optional<absl::Time> LeaseTable::EarliestExpiry(const std::string& account) const {
  for (const auto& [when, counter] : by_expiry_) {
    auto it = by_counter_.find(counter);
    if (it != by_counter_.end() && it->second.account == account) return when;
  }
  return std::nullopt;
}

int LeaseTable::InFlight(const std::string& account) const {
  auto it = in_flight_.find(account);
  return it == in_flight_.end() ? 0 : it->second;
}

void LeaseTable::Forget(const std::string& account) {
  std::vector<uint64_t> counters;
  for (const auto& [counter, slot] : by_counter_) {
    if (slot.account == account) counters.push_back(counter);
  }
  for (uint64_t c : counters) Take(by_counter_.find(c));
}

}  // namespace tokenbroker
