#pragma once

#include <cstdint>
#include <set>
#include <string>

#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"
#include "lib/upstream/egress.h"

namespace tokenbroker {

// Loads the account folder into the pool, and again whenever it changes. Logs each bad file once
// until it is fixed. Not thread-safe (one caller: the main loop).
class AccountLoader {
 public:
  // `egresses` (may be null: none defined) must outlive the loader: an account naming an egress it
  // does not define is loaded but not served, with the reason (AccountRecord::egress_problem).
  AccountLoader(const AccountStore& store, AccountPool& pool, const EgressBook* egresses = nullptr)
      : store_(store), pool_(pool), egresses_(egresses) {}
  void Load();
  // Reloads when the folder's fingerprint changed; returns whether it did.
  bool ReloadIfChanged();

 private:
  const AccountStore& store_;
  AccountPool& pool_;
  const EgressBook* egresses_;
  uint64_t fingerprint_ = 0;
  bool loaded_once_ = false;
  std::set<std::string> reported_;
  std::set<std::string> reported_egress_;
};

// Logs which egresses are defined (their ids: never a proxy URL).
void LogEgresses(const EgressBook& egresses);
// Re-reads --egress_file when it changed, and logs what came of it. True when new egresses are in
// use (reload the accounts: their egress is checked again); a file that cannot be used keeps the
// egresses in use, and says why once.
bool ReloadEgresses(EgressBook& egresses);

}  // namespace tokenbroker
