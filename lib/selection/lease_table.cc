#include "lib/selection/lease_table.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/base/internal/raw_logging.h"

namespace tokenbroker {

namespace {

constexpr char kHex[] = "0123456789abcdef";

// Writes the last `digits` hex digits of v at `out`; returns the end.
char* PutHex(uint64_t v, int digits, char* out) {
  for (int i = digits - 1; i >= 0; --i, v >>= 4) out[i] = kHex[v & 15];
  return out + digits;
}

void AppendHex(uint64_t v, int digits, std::string* out) {
  char buf[16];
  out->append(buf, PutHex(v, digits, buf));
}

uint32_t Fnv1a(absl::string_view s) {
  // FNV-1a, 32 bits: stable everywhere; callers are names an operator chose, not adversarial input.
  uint32_t h = 2166136261u;
  for (unsigned char c : s) {
    h ^= c;
    h *= 16777619u;
  }
  return h;
}

std::optional<uint64_t> ParseHex(absl::string_view s) {
  uint64_t v = 0;
  for (char c : s) {
    uint64_t digit;
    if (c >= '0' && c <= '9') {
      digit = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      digit = static_cast<uint64_t>(c - 'a' + 10);
    } else {
      return std::nullopt;
    }
    v = (v << 4) | digit;
  }
  return v;
}

// Fills `buf` from the kernel's CSPRNG. getrandom only fails for lack of entropy at boot (it
// blocks then) or on a signal (retried); anything else is a broken system, not a recoverable state.
void FillRandom(unsigned char* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::getrandom(buf + got, n - got, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      ABSL_RAW_LOG(FATAL, "getrandom failed: %s", std::strerror(errno));
    }
    got += static_cast<size_t>(r);
  }
}

// Whether `tag` (8 hex digits of an id) is `caller`'s CallerTag.
bool TagIs(absl::string_view tag, absl::string_view caller) {
  char buf[8];
  PutHex(Fnv1a(caller), 8, buf);
  return tag == absl::string_view(buf, 8);
}

}  // namespace

std::string CallerTag(absl::string_view caller) {
  std::string out;
  AppendHex(Fnv1a(caller), 8, &out);
  return out;
}

std::optional<std::string> CallerTagOfLease(absl::string_view lease_id) {
  if (lease_id.size() != LeaseTable::kIdLength || lease_id.substr(0, 2) != "l-") return std::nullopt;
  absl::string_view tag = lease_id.substr(18, 8);
  if (!ParseHex(tag)) return std::nullopt;
  return std::string(tag);
}

LeaseTable::LeaseTable(absl::Duration timeout, size_t max_leases)
    : timeout_(timeout), max_leases_(std::max<size_t>(1, max_leases)) {}

LeaseTable::Name* LeaseTable::Intern(const std::string& name) {
  Name& n = *names_.try_emplace(name).first;
  ++n.second.refs;
  return &n;
}

void LeaseTable::Unintern(Name* name) {
  if (--name->second.refs == 0) names_.erase(names_.find(name->first));
}

void LeaseTable::Track(const Name* caller, absl::uint128 key) {
  CallerLeases& c = by_caller_[caller];
  ++c.count;
  c.order.push_back(key);
  if (c.order.size() > 2 * c.count + 64) {
    // Mostly ended leases: keep the live ones, in order.
    std::deque<absl::uint128> live;
    for (const absl::uint128& k : c.order) {
      if (auto it = by_key_.find(k); it != by_key_.end() && it->second.caller == caller) live.push_back(k);
    }
    c.order.swap(live);
  }
}

void LeaseTable::Untrack(const Name* caller) {
  auto it = by_caller_.find(caller);
  if (it != by_caller_.end() && --it->second.count == 0) by_caller_.erase(it);
}

std::optional<Lease> LeaseTable::MakeRoom() {
  if (by_key_.size() < max_leases_ || by_caller_.empty()) return std::nullopt;
  auto most = by_caller_.begin();
  for (auto it = by_caller_.begin(); it != by_caller_.end(); ++it) {
    if (it->second.count > most->second.count) most = it;
  }
  std::deque<absl::uint128>& order = most->second.order;
  const Name* caller = most->first;
  while (!order.empty()) {
    const absl::uint128 key = order.front();
    order.pop_front();
    auto it = by_key_.find(key);
    if (it != by_key_.end() && it->second.caller == caller) return Take(it);
  }
  return std::nullopt;  // unreachable: a caller with a count has its live keys in `order`
}

uint64_t LeaseTable::RandomBits() {
  if (random_used_ + 8 > sizeof(random_)) {
    FillRandom(random_, sizeof(random_));
    random_used_ = 0;
  }
  uint64_t v;
  std::memcpy(&v, random_ + random_used_, 8);
  // Used bytes are wiped so no copy of an issued id's randomness lingers in the buffer.
  std::memset(random_ + random_used_, 0, 8);
  random_used_ += 8;
  return v;
}

std::string LeaseTable::IdOf(absl::uint128 key, const std::string& caller) const {
  char id[kIdLength];
  id[0] = 'l';
  id[1] = '-';
  char* p = PutHex(prefix_, 16, id + 2);
  p = PutHex(Fnv1a(caller), 8, p);
  p = PutHex(absl::Uint128High64(key), 8, p);
  PutHex(absl::Uint128Low64(key), 16, p);
  return std::string(id, kIdLength);
}

std::optional<LeaseTable::ParsedId> LeaseTable::Parse(absl::string_view id) const {
  if (prefix_ == 0 || id.size() != kIdLength || id.substr(0, 2) != "l-") return std::nullopt;
  std::optional<uint64_t> prefix = ParseHex(id.substr(2, 16));
  std::optional<uint64_t> high = ParseHex(id.substr(26, 8));
  std::optional<uint64_t> low = ParseHex(id.substr(34, 16));
  if (!prefix || *prefix != prefix_ || !high || !low || !CallerTagOfLease(id)) return std::nullopt;
  return ParsedId{absl::MakeUint128(*high, *low), id.substr(18, 8)};
}

std::optional<absl::uint128> LeaseTable::KeyOf(absl::string_view id) const {
  std::optional<ParsedId> parsed = Parse(id);
  if (!parsed) return std::nullopt;
  auto it = by_key_.find(parsed->key);
  if (it == by_key_.end() || !TagIs(parsed->tag, it->second.caller->first)) return std::nullopt;
  return parsed->key;
}

absl::uint128 LeaseTable::FreshKey() {
  while (prefix_ == 0) prefix_ = RandomBits();
  absl::uint128 key;
  do {
    key = absl::MakeUint128(RandomBits() & 0xffffffffu, RandomBits());
  } while (by_key_.contains(key));
  return key;
}

std::optional<IssuedLease> LeaseTable::IssueKey(absl::uint128 key, const std::string& account,
                                                const std::string& model, absl::Time now, const std::string& caller,
                                                const std::string& group) {
  const absl::Time expires = now + timeout_;
  auto [slot, inserted] = by_key_.try_emplace(key);
  if (!inserted) return std::nullopt;
  slot->second = Slot{Intern(account), Intern(model), Intern(caller), expires, Intern(group)};
  ++slot->second.account->second.leases_on;
  by_expiry_.emplace(expires, key);
  Track(slot->second.caller, key);
  return IssuedLease{IdOf(key, caller), expires};
}

IssuedLease LeaseTable::Issue(const std::string& account, const std::string& model, absl::Time now,
                              const std::string& caller, const std::string& group) {
  // One probe of the table per lease: a fresh random key goes in straight away (a taken one, 1 in
  // 2^96 per lease in flight, is drawn again).
  while (prefix_ == 0) prefix_ = RandomBits();
  while (true) {
    const absl::uint128 key = absl::MakeUint128(RandomBits() & 0xffffffffu, RandomBits());
    if (std::optional<IssuedLease> lease = IssueKey(key, account, model, now, caller, group)) return *std::move(lease);
  }
}

std::string LeaseTable::NewId(const std::string& caller) { return IdOf(FreshKey(), caller); }

IssuedLease LeaseTable::IssueAs(const std::string& id, const std::string& account, const std::string& model,
                                absl::Time now, const std::string& caller, const std::string& group) {
  std::optional<ParsedId> parsed = Parse(id);
  std::optional<IssuedLease> lease;
  if (parsed && TagIs(parsed->tag, caller)) lease = IssueKey(parsed->key, account, model, now, caller, group);
  return lease ? *std::move(lease) : Issue(account, model, now, caller, group);
}

Lease LeaseTable::Take(Map::iterator it) {
  const Slot slot = it->second;
  Lease lease{IdOf(it->first, slot.caller->first), slot.account->first, slot.model->first, slot.caller->first,
              slot.expires, slot.group->first};
  by_expiry_.erase({lease.expires, it->first});
  by_key_.erase(it);
  --slot.account->second.leases_on;
  Untrack(slot.caller);
  for (Name* name : {slot.account, slot.model, slot.caller, slot.group}) Unintern(name);
  return lease;
}

std::optional<Lease> LeaseTable::Find(const std::string& id) const {
  std::optional<absl::uint128> key = KeyOf(id);
  if (!key) return std::nullopt;
  const Slot& s = by_key_.at(*key);
  return Lease{id, s.account->first, s.model->first, s.caller->first, s.expires, s.group->first};
}

std::optional<Lease> LeaseTable::End(const std::string& id) {
  std::optional<absl::uint128> key = KeyOf(id);
  if (!key) return std::nullopt;
  return Take(by_key_.find(*key));
}

bool LeaseTable::Contains(const std::string& id) const { return KeyOf(id).has_value(); }

std::vector<Lease> LeaseTable::Expire(absl::Time now) {
  std::vector<Lease> out;
  while (!by_expiry_.empty() && by_expiry_.begin()->first <= now) {
    auto it = by_key_.find(by_expiry_.begin()->second);
    if (it == by_key_.end()) {
      by_expiry_.erase(by_expiry_.begin());
      continue;
    }
    out.push_back(Take(it));
  }
  return out;
}

std::optional<absl::Time> LeaseTable::EarliestExpiry(const std::string& account) const {
  for (const auto& [when, key] : by_expiry_) {
    auto it = by_key_.find(key);
    if (it != by_key_.end() && it->second.account->first == account) return when;
  }
  return std::nullopt;
}

int LeaseTable::InFlight(const std::string& account) const {
  auto it = names_.find(account);
  return it == names_.end() ? 0 : it->second.leases_on;
}

void LeaseTable::Forget(const std::string& account) {
  std::vector<absl::uint128> keys;
  for (const auto& [key, slot] : by_key_) {
    if (slot.account->first == account) keys.push_back(key);
  }
  for (const absl::uint128& k : keys) Take(by_key_.find(k));
}

}  // namespace tokenbroker
