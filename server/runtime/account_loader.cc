#include "server/runtime/account_loader.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {

void AccountLoader::Load() {
  LoadResult loaded = store_.LoadAll();
  fingerprint_ = loaded.fingerprint;  // of the files as read: a change after that is the next reload
  std::set<std::string> now;
  for (const LoadProblem& p : loaded.problems) {
    std::string key = absl::StrCat(p.path, "\n", p.reason);
    now.insert(key);
    if (!reported_.contains(key)) spdlog::warn("skipping account file {}: {}", p.path, p.reason);
  }
  reported_ = std::move(now);
  // Always once at start, even for an empty folder ("0 accounts"); then on every change of count.
  if (!loaded_once_ || loaded.accounts.size() != pool_.size()) {
    spdlog::info("loaded {} accounts from {} ({} files skipped){}", loaded.accounts.size(), store_.dir(),
                 loaded.problems.size(),
                 loaded.accounts.empty() ? "; add <id>.json account files there: they are picked up without a restart"
                                         : "");
  }
  loaded_once_ = true;
  pool_.Load(std::move(loaded.accounts));
}

bool AccountLoader::ReloadIfChanged() {
  if (store_.Fingerprint() == fingerprint_) return false;
  Load();
  return true;
}

}  // namespace tokenbroker
