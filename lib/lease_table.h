#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/time/time.h"

namespace tokenbroker {

// One issuance of an account's token for a model.
struct Lease {
  std::string id;
  std::string account;
  std::string model;
  absl::Time expires;
};

// Leases in flight: each ends when its outcome is reported or when it times out. Counts leases
// per account for the in-flight cap and for balance. Not thread-safe: the owner locks.
class LeaseTable {
 public:
  explicit LeaseTable(absl::Duration timeout) : timeout_(timeout) {}

  // Issues a lease with a fresh random id.
  const Lease& Issue(const std::string& account, const std::string& model, absl::Time now);
  // Ends a lease; unset if it is unknown or already ended.
  std::optional<Lease> End(const std::string& id);
  // Ends every lease past its expiry at `now` and returns them.
  std::vector<Lease> Expire(absl::Time now);
  // When the account's earliest lease times out, if it has any.
  std::optional<absl::Time> EarliestExpiry(const std::string& account) const;
  int InFlight(const std::string& account) const;
  bool Contains(const std::string& id) const { return by_id_.contains(id); }
  size_t size() const { return by_id_.size(); }
  // Forgets every lease of an account (it left the pool).
  void Forget(const std::string& account);

 private:
  void Drop(absl::flat_hash_map<std::string, Lease>::iterator it);

  const absl::Duration timeout_;
  absl::BitGen rng_;
  uint64_t prefix_ = 0;
  uint64_t counter_ = 0;
  absl::flat_hash_map<std::string, Lease> by_id_;
  std::multimap<absl::Time, std::string> by_expiry_;
  absl::flat_hash_map<std::string, int> in_flight_;
};

}  // namespace tokenbroker
