// Start-up time and resident memory: writes N account files (Antigravity-Manager format) to a
// temp folder, times loading them into the pool, and measures resident bytes per loaded account
// and per bound session (N sessions). Prints one line per figure.
//   footprint_bench [N]        (default 100000)
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/account_store.h"

namespace {

long ResidentBytes() {
  long pages_total = 0;
  long pages_resident = 0;
  std::ifstream statm("/proc/self/statm");
  statm >> pages_total >> pages_resident;
  return pages_resident * sysconf(_SC_PAGESIZE);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace tokenbroker;
  const long n = argc > 1 ? std::atol(argv[1]) : 100'000;
  if (n <= 0) {
    std::cerr << "usage: footprint_bench [N > 0]\n";
    return 2;
  }
  std::string tmpl = (std::filesystem::temp_directory_path() / "tokenbroker-footprint-XXXXXX").string();
  const std::string dir = ::mkdtemp(tmpl.data());
  for (long i = 0; i < n; ++i) {
    std::ofstream(absl::StrFormat("%s/acct-%06d.json", dir, i)) << absl::StrFormat(
        R"({"id":"acct-%06d","email":"user%06d@example.com","name":"User %d",)"
        R"("token":{"access_token":"ya29.a0AfB_byC%040d","refresh_token":"1//0gExample%040d","expires_in":3599,)"
        R"("expiry_timestamp":1795920000,"token_type":"Bearer","project_id":"vivid-river-%06d"},)"
        R"("quota":{"models":[{"name":"gemini-3-pro-high","percentage":62,"reset_time":"2026-11-29T04:00:00Z"},)"
        R"({"name":"claude-sonnet-4-6-thinking","percentage":10,"reset_time":"2026-11-29T01:12:30Z"}],)"
        R"("last_updated":1795914000,"subscription_tier":"%s"},"disabled":false,"proxy_disabled":false,)"
        R"("protected_models":[],"created_at":1764000000,"last_used":1795913000})",
        i, i, i, i, i, i, i % 10 == 0 ? "ULTRA" : i % 10 < 4 ? "PRO" : "FREE");
  }

  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  const long rss_before_load = ResidentBytes();
  const absl::Time start = absl::Now();
  absl::Duration read_time;
  {
    absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(dir);
    if (!store.ok()) {
      std::cerr << store.status() << "\n";
      return 1;
    }
    LoadResult loaded = (*store)->LoadAll();
    if (!loaded.problems.empty() || static_cast<long>(loaded.accounts.size()) != n) {
      std::cerr << "loaded " << loaded.accounts.size() << " of " << n << " accounts\n";
      return 1;
    }
    read_time = absl::Now() - start;
    pool.Load(std::move(loaded.accounts));
  }
  const absl::Duration load_time = absl::Now() - start;
  const long rss_after_load = ResidentBytes();

  SelectRequest req;
  req.model = "gemini-3-pro-high";
  // The first selection for a model builds its rank index: count that with the accounts.
  absl::StatusOr<Selection> warm = pool.Select(req);
  if (warm.ok()) pool.ReleaseLease(warm->lease_id);
  const long rss_with_index = ResidentBytes();
  const long rss_before_sessions = ResidentBytes();
  for (long i = 0; i < n; ++i) {
    req.session_id = absl::StrFormat("session-%08d", i);
    absl::StatusOr<Selection> s = pool.Select(req);
    if (!s.ok()) {
      std::cerr << s.status() << "\n";
      return 1;
    }
    pool.ReleaseLease(s->lease_id);
  }
  const long rss_after_sessions = ResidentBytes();

  std::filesystem::remove_all(dir);
  std::printf("startup: %ld account files loaded in %.2f s (read and parsed in %.2f s, into the pool in %.2f s)\n", n,
              absl::ToDoubleSeconds(load_time), absl::ToDoubleSeconds(read_time),
              absl::ToDoubleSeconds(load_time - read_time));
  std::printf("memory: %ld bytes resident per loaded account (%ld with one model's rank index)\n",
              (rss_after_load - rss_before_load) / n, (rss_with_index - rss_before_load) / n);
  std::printf("memory: %ld bytes resident per bound session\n", (rss_after_sessions - rss_before_sessions) / n);
  return 0;
}
