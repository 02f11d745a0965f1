#pragma once

#include <cstdint>
#include <deque>
#include <utility>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/numeric/int128.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tokenbroker {

// One issuance of an account's token for a model.
struct Lease {
  std::string id;
  std::string account;
  std::string model;
  std::string caller;  // who the token was issued to ("-" when callers are not identified)
  absl::Time expires;
  std::string group;   // the quota group the request named (empty: none)
};

// What Issue hands back: the new lease's id and when it times out.
struct IssuedLease {
  std::string id;
  absl::Time expires;
};

// A short, stable tag of a caller's name (the same in every replica and process): lease ids carry
// it, so any replica can tell whether a reporter may report a lease before it touches the lease.
std::string CallerTag(absl::string_view caller);
// The caller tag inside a lease id of any table; unset for a malformed id.
std::optional<std::string> CallerTagOfLease(absl::string_view lease_id);

// Leases in flight: each ends when its outcome is reported or when it times out. Counts leases
// per account for the in-flight cap and for balance.
//
// Lease ids are unguessable: "l-", 16 hex digits naming the table (random per table; the shared
// state files a lease under it), 8 hex digits of the caller's CallerTag, then 24 hex digits
// (96 bits) from the system's cryptographic random source. Knowing one id tells nothing about
// any other beyond the table and caller it shares. Not thread-safe: the owner locks.
//
// Bounded: at most `max_leases` in flight (leases come from callers, who need not report them).
// A lease issued to a full table first ends the oldest lease of the caller holding the most
// (MakeRoom), so one caller flooding GetToken without reporting pushes out only its own leases.
class LeaseTable {
 public:
  static constexpr size_t kDefaultMaxLeases = 100000;
  explicit LeaseTable(absl::Duration timeout, size_t max_leases = kDefaultMaxLeases);

  // When the table is full: ends the oldest lease of the caller holding the most leases and
  // returns it (the owner treats it like an expired one). Unset while there is room.
  std::optional<Lease> MakeRoom();
  size_t max_leases() const { return max_leases_; }

  // Issues a lease with a fresh id to `caller`.
  IssuedLease Issue(const std::string& account, const std::string& model, absl::Time now,
                    const std::string& caller = "-", const std::string& group = "");
  // A fresh id for `caller`, for a lease issued later with IssueAs (reserved elsewhere first, e.g.
  // fleet-wide admission). Issues nothing.
  std::string NewId(const std::string& caller);
  // Issues a lease under `id`, an id NewId of this table made for `caller`; a malformed or taken
  // id gets a fresh one (the returned id is the lease's).
  IssuedLease IssueAs(const std::string& id, const std::string& account, const std::string& model, absl::Time now,
                      const std::string& caller, const std::string& group = "");
  // The lease, if it is in flight (without ending it).
  std::optional<Lease> Find(const std::string& id) const;
  // Ends a lease; unset if it is unknown or already ended.
  std::optional<Lease> End(const std::string& id);
  // Ends every lease past its expiry at `now` and returns them.
  std::vector<Lease> Expire(absl::Time now);
  // When the account's earliest lease times out, if it has any.
  std::optional<absl::Time> EarliestExpiry(const std::string& account) const;
  int InFlight(const std::string& account) const;
  bool Contains(const std::string& id) const;
  size_t size() const { return by_key_.size(); }
  // Forgets every lease of an account (it left the pool).
  void Forget(const std::string& account);

  static constexpr size_t kIdLength = 2 + 16 + 8 + 24;

 private:
  // Every name a lease in flight carries (account, model, caller, group), held once in names_ with
  // the number of slots pointing at it and, for an account, its leases: issuing or ending a lease
  // allocates no string, and ending one looks nothing up by name.
  struct NameUse {
    size_t refs = 0;
    int leases_on = 0;  // leases whose account this name is
  };
  using Name = std::pair<const std::string, NameUse>;
  struct Slot {
    Name* account;
    Name* model;
    Name* caller;
    absl::Time expires;
    Name* group;
  };
  Name* Intern(const std::string& name);
  void Unintern(Name* name);
  using Map = absl::flat_hash_map<absl::uint128, Slot>;

  // An id of this table's form and prefix: its key (the random part) and its caller tag.
  struct ParsedId {
    absl::uint128 key;
    absl::string_view tag;
  };
  std::optional<ParsedId> Parse(absl::string_view id) const;
  // The key of one of this table's ids (its random part, when its table and caller tag match
  // what was issued); unset for anything else.
  std::optional<absl::uint128> KeyOf(absl::string_view id) const;
  std::string IdOf(absl::uint128 key, const std::string& caller) const;
  Lease Take(Map::iterator it);
  absl::uint128 FreshKey();
  // Issues under `key`; unset when the key is taken.
  std::optional<IssuedLease> IssueKey(absl::uint128 key, const std::string& account, const std::string& model,
                                      absl::Time now, const std::string& caller, const std::string& group);
  uint64_t RandomBits();

  // Each caller's leases in the order issued (oldest first), for MakeRoom. `order` may still hold
  // keys of leases that ended (skipped, and compacted away once they outnumber the live ones).
  struct CallerLeases {
    size_t count = 0;
    std::deque<absl::uint128> order;
  };
  void Track(const Name* caller, absl::uint128 key);
  void Untrack(const Name* caller);

  const absl::Duration timeout_;
  const size_t max_leases_;
  uint64_t prefix_ = 0;
  // Bytes from the system's random source, used up 8 at a time.
  unsigned char random_[512];
  size_t random_used_ = sizeof(random_);
  Map by_key_;
  absl::btree_set<std::pair<absl::Time, absl::uint128>> by_expiry_;
  absl::node_hash_map<std::string, NameUse> names_;  // node-based: slots point at its entries
  absl::flat_hash_map<const Name*, CallerLeases> by_caller_;
};

}  // namespace tokenbroker
