#include "lib/lease_table.h"


namespace tokenbroker {

namespace {

void AppendHex(uint64_t v, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int shift = 60; shift >= 0; shift -= 4) out->push_back(kHex[(v >> shift) & 15]);
}

}  // namespace

const Lease& LeaseTable::Issue(const std::string& account, const std::string& model, absl::Time now) {
  // A random per-table prefix (so ids differ across restarts and replicas) and a counter (so they
  // are unique without a retry loop): "l-" + 32 hex digits.
  if (prefix_ == 0) prefix_ = absl::Uniform<uint64_t>(rng_) | 1;
  std::string id;
  id.reserve(34);
  id.append("l-");
  AppendHex(prefix_, &id);
  AppendHex(++counter_, &id);
  Lease lease{id, account, model, now + timeout_};
  by_expiry_.emplace(lease.expires, id);
  ++in_flight_[account];
  return by_id_.emplace(id, std::move(lease)).first->second;
}

void LeaseTable::Drop(absl::flat_hash_map<std::string, Lease>::iterator it) {
  auto range = by_expiry_.equal_range(it->second.expires);
  for (auto e = range.first; e != range.second; ++e) {
    if (e->second == it->first) {
      by_expiry_.erase(e);
      break;
    }
  }
  if (auto c = in_flight_.find(it->second.account); c != in_flight_.end() && --c->second <= 0) {
    in_flight_.erase(c);
  }
  by_id_.erase(it);
}

std::optional<Lease> LeaseTable::End(const std::string& id) {
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return std::nullopt;
  Lease lease = it->second;
  Drop(it);
  return lease;
}

std::vector<Lease> LeaseTable::Expire(absl::Time now) {
  std::vector<Lease> out;
  while (!by_expiry_.empty() && by_expiry_.begin()->first <= now) {
    auto it = by_id_.find(by_expiry_.begin()->second);
    if (it == by_id_.end()) {
      by_expiry_.erase(by_expiry_.begin());
      continue;
    }
    out.push_back(it->second);
    Drop(it);
  }
  return out;
}

std::optional<absl::Time> LeaseTable::EarliestExpiry(const std::string& account) const {
  for (const auto& [when, id] : by_expiry_) {
    auto it = by_id_.find(id);
    if (it != by_id_.end() && it->second.account == account) return when;
  }
  return std::nullopt;
}

int LeaseTable::InFlight(const std::string& account) const {
  auto it = in_flight_.find(account);
  return it == in_flight_.end() ? 0 : it->second;
}

void LeaseTable::Forget(const std::string& account) {
  std::vector<std::string> ids;
  for (const auto& [id, lease] : by_id_) {
    if (lease.account == account) ids.push_back(id);
  }
  for (const std::string& id : ids) End(id);
}

}  // namespace tokenbroker
