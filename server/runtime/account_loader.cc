#include "server/runtime/account_loader.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
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
  std::set<std::string> egress_now;
  for (AccountRecord& rec : loaded.accounts) {
    if (rec.egress_id.empty()) continue;
    rec.egress_problem =
        egresses_ != nullptr
            ? egresses_->Problem(rec.egress_id)
            : absl::StrCat("egress ", rec.egress_id, " is not defined in an --egress_file (none is given)");
    if (rec.egress_problem.empty()) continue;
    rec.egress_problem += "; the account is not served (never direct instead)";
    std::string key = absl::StrCat(rec.id, "\n", rec.egress_problem);
    egress_now.insert(key);
    if (!reported_egress_.contains(key)) spdlog::warn("account {}: {}", rec.id, rec.egress_problem);
  }
  reported_egress_ = std::move(egress_now);
  loaded_once_ = true;
  pool_.Load(std::move(loaded.accounts));
}

void LogEgresses(const EgressBook& egresses) {
  if (egresses.path().empty()) return;
  std::vector<std::string> ids = egresses.Ids();
  spdlog::info("{} egresses from {}{}{}", ids.size(), egresses.path(), ids.empty() ? "" : ": ",
               absl::StrJoin(ids, ", "));
}

bool ReloadEgresses(EgressBook& egresses) {
  absl::StatusOr<bool> reloaded = egresses.ReloadIfChanged();
  if (!reloaded.ok()) {
    spdlog::error("--egress_file changed but cannot be used ({}); the egresses in use stay",
                  std::string(reloaded.status().message()));
    return false;
  }
  if (*reloaded) LogEgresses(egresses);
  return *reloaded;
}

bool AccountLoader::ReloadIfChanged() {
  if (store_.Fingerprint() == fingerprint_) return false;
  Load();
  return true;
}

}  // namespace tokenbroker
