#pragma once

#include <cstdint>
#include <utility>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/btree_set.h"
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

// What Issue hands back: the new lease's id and when it times out.
struct IssuedLease {
  std::string id;
  absl::Time expires;
};

// Leases in flight: each ends when its outcome is reported or when it times out. Counts leases
// per account for the in-flight cap and for balance. Ids are "l-" + a random per-table prefix + a
// counter (hex), so they differ across restarts and replicas and are stored by counter alone.
// Not thread-safe: the owner locks.
class LeaseTable {
 public:
  explicit LeaseTable(absl::Duration timeout) : timeout_(timeout) {}

  // Issues a lease with a fresh id.
  IssuedLease Issue(const std::string& account, const std::string& model, absl::Time now);
  // Ends a lease; unset if it is unknown or already ended.
  std::optional<Lease> End(const std::string& id);
  // Ends every lease past its expiry at `now` and returns them.
  std::vector<Lease> Expire(absl::Time now);
  // When the account's earliest lease times out, if it has any.
  std::optional<absl::Time> EarliestExpiry(const std::string& account) const;
  int InFlight(const std::string& account) const;
  bool Contains(const std::string& id) const;
  size_t size() const { return by_counter_.size(); }
  // Forgets every lease of an account (it left the pool).
  void Forget(const std::string& account);

 private:
  struct Slot {
    std::string account;
    std::string model;
    absl::Time expires;
  };
  using Map = absl::flat_hash_map<uint64_t, Slot>;

  // The counter of one of this table's ids; unset for anything else.
  std::optional<uint64_t> CounterOf(const std::string& id) const;
  std::string IdOf(uint64_t counter) const;
  Lease Take(Map::iterator it);

  const absl::Duration timeout_;
  absl::BitGen rng_;
  uint64_t prefix_ = 0;
  uint64_t counter_ = 0;
  Map by_counter_;
  absl::btree_set<std::pair<absl::Time, uint64_t>> by_expiry_;
  absl::flat_hash_map<std::string, int> in_flight_;
};

}  // namespace tokenbroker
