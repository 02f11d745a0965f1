// Google Benchmark of AccountPool::Select at 1k, 10k and 100k accounts for each policy, in the
// shape of a busy pool: mixed tiers, 10 % of the accounts cooling for the model, quota data
// present for three models, and many sessions bound. Each iteration is one GetToken's selection
// (plus the release of its lease, so leases do not pile up).
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "lib/selection/account_pool.h"

namespace tokenbroker {
namespace {

const char* kModels[] = {"gemini-3-pro-high", "claude-sonnet-4-6-thinking", "gemini-3-flash"};

struct Fixture {
  FakeClock clock;
  std::unique_ptr<AccountPool> pool;
  std::vector<std::string> sessions;

  Fixture(size_t accounts, Policy policy, size_t bound_sessions) {
    PoolOptions o;
    o.policy = policy;
    pool = std::make_unique<AccountPool>(o, clock);
    std::vector<AccountRecord> records;
    records.reserve(accounts);
    for (size_t i = 0; i < accounts; ++i) {
      AccountRecord r;
      r.id = "acct-" + std::to_string(i);
      r.email = r.id + "@example.com";
      r.refresh_token = "1//rt-" + r.id;
      r.access_token = "ya29.bench-" + r.id;
      r.access_expiry = clock.Now() + absl::Hours(1);
      r.tier = i % 10 == 0 ? Tier::kUltra : i % 10 < 4 ? Tier::kPro : Tier::kFree;
      records.push_back(std::move(r));
    }
    pool->Load(std::move(records));
    QuotaSettings q;
    q.enabled = true;
    pool->SetQuotaSettings(q);
    std::vector<QuotaObservation> obs;
    for (size_t i = 0; i < accounts; ++i) {
      for (const char* m : kModels) {
        QuotaObservation o;
        o.account_id = "acct-" + std::to_string(i);
        o.model = m;
        o.remaining_fraction = static_cast<double>((i * 37) % 100) / 100.0;
        o.reset_time = clock.Now() + absl::Minutes(static_cast<int64_t>((i * 13) % 300));
        o.observed = clock.Now();
        obs.push_back(std::move(o));
      }
    }
    pool->UpdateQuota(obs);
    for (size_t i = 0; i < accounts; i += 10) {  // 10 % cooling for the benchmarked model
      Outcome out;
      out.account_id = "acct-" + std::to_string(i + 5);
      out.model = kModels[0];
      out.http_status = 429;
      out.retry_after = "3600";
      if (i + 5 < accounts) (void)pool->ReportOutcome(out);
    }
    for (size_t i = 0; i < bound_sessions; ++i) {
      sessions.push_back("session-" + std::to_string(i));
      SelectRequest req;
      req.model = kModels[0];
      req.session_id = sessions.back();
      absl::StatusOr<Selection> s = pool->Select(req);
      if (s.ok()) pool->ReleaseLease(s->lease_id);
    }
  }
};

// As in the tokenbroker binary: Debian's Abseil would otherwise check every lock for cycles.
const bool kNoDeadlockDetection = [] {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return true;
}();

void BM_Select(benchmark::State& state) {
  const size_t accounts = static_cast<size_t>(state.range(0));
  const Policy policy = static_cast<Policy>(state.range(1));
  Fixture f(accounts, policy, std::min<size_t>(accounts, 2'000));
  SelectRequest with_session;
  with_session.model = kModels[0];
  SelectRequest without_session = with_session;
  size_t i = 0;
  for (auto _ : state) {
    // Half the calls carry a bound session, half none.
    SelectRequest& req = (i & 1) ? with_session : without_session;
    if (i & 1) req.session_id = f.sessions[(i / 2) % f.sessions.size()];
    absl::StatusOr<Selection> s = f.pool->Select(req);
    if (!s.ok()) {
      state.SkipWithError(std::string(s.status().message()).c_str());
      break;
    }
    f.pool->ReleaseLease(s->lease_id);
    ++i;
  }
  state.SetLabel(std::string(PolicyName(policy)));
  state.counters["accounts"] = static_cast<double>(accounts);
}

}  // namespace
}  // namespace tokenbroker

BENCHMARK(tokenbroker::BM_Select)
    ->ArgsProduct({{1'000, 10'000, 100'000}, {0, 1, 2, 3}})
    ->ArgNames({"accounts", "policy"})
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
