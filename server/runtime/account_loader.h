#pragma once

#include <cstdint>
#include <set>
#include <string>

#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"

namespace tokenbroker {

// Loads the account folder into the pool, and again whenever it changes. Logs each bad file once
// until it is fixed. Not thread-safe (one caller: the main loop).
class AccountLoader {
 public:
  AccountLoader(const AccountStore& store, AccountPool& pool) : store_(store), pool_(pool) {}
  void Load();
  // Reloads when the folder's fingerprint changed; returns whether it did.
  bool ReloadIfChanged();

 private:
  const AccountStore& store_;
  AccountPool& pool_;
  uint64_t fingerprint_ = 0;
  bool loaded_once_ = false;
  std::set<std::string> reported_;
};

}  // namespace tokenbroker
