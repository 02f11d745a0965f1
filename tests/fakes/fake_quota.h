#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"

namespace tokenbroker::testing {

// Calls one account may make per window for one model family.
struct WindowBudgets {
  int64_t short_window = 0;
  int64_t long_window = 0;
};

// Budgets by model family ("gemini", "3p", ...).
using FamilyBudgets = std::map<std::string, WindowBudgets>;

// How the fake Google counts quota (see FakeQuota). Every duration may be fractional seconds so a
// simulated "5-hour" window lasts seconds.
struct FakeQuotaConfig {
  bool enabled = false;  // off: every generateContent answers 200 and nothing is counted
  absl::Duration short_window = absl::Hours(5);
  absl::Duration long_window = absl::Hours(24 * 7);
  // The quota endpoints answer with the state as it was this long ago (a lagging quota API).
  absl::Duration lag = absl::ZeroDuration();
  // Model → family: the first rule whose text the model name contains, else default_family.
  std::vector<std::pair<std::string, std::string>> family_rules = {{"claude", "3p"}, {"gpt", "3p"}};
  std::string default_family = "gemini";
  // The models fetchAvailableModels reports (each in its family).
  std::vector<std::string> models = {"gemini-3-pro-high", "gemini-3-flash", "claude-sonnet-4-6-thinking",
                                     "claude-opus-4-5-thinking", "gpt-oss-120b-medium"};
  // Budgets by tier ("ULTRA", "PRO", "FREE"); an account's profile may override them per family.
  // A family missing for a tier has no budget (every call is refused).
  std::map<std::string, FamilyBudgets> tier_budgets = {
      {"ULTRA", {{"gemini", {20, 50}}, {"3p", {10, 25}}}},
      {"PRO", {{"gemini", {12, 30}}, {"3p", {6, 15}}}},
      {"FREE", {{"gemini", {6, 15}}, {"3p", {3, 8}}}},
  };
  // fetchAvailableModels' fraction for a model: the least over its family's windows (true: the long
  // window shows) or the short window's alone (false: what Google does).
  bool min_over_windows = true;
  // Models of family "3p" report 1.0 in fetchAvailableModels whatever their state (Google's known lie).
  bool lie_3p = false;
};

// Parses the body of POST /__fake/quota (see fake_upstream_main.cc). Omitted fields keep their
// defaults. INVALID_ARGUMENT naming the field when a value has the wrong type or range.
absl::StatusOr<FakeQuotaConfig> ParseFakeQuotaConfig(absl::string_view json);

// Parses {"<family>": {"short": N, "long": N}, ...}. INVALID_ARGUMENT naming the field.
absl::StatusOr<FamilyBudgets> ParseFamilyBudgets(absl::string_view json);

// What the fake knows of one account for quota purposes.
struct AccountQuotaProfile {
  std::string tier = "FREE";  // "ULTRA", "PRO" or "FREE": picks the default budgets
  FamilyBudgets budgets;      // overrides the tier's budgets for the families it names
};

// Quota accounting of the fake Google: per account, model family and window a budget of calls.
// A window starts at its bucket's first spend and resets, full again, at start + length. A call is
// refused with Google's 429 (QUOTA_EXHAUSTED, with the exact reset delay) while any window of its
// family is spent, and then spends nothing; otherwise it spends one on every window of the family.
// The quota endpoints report the state as of now − lag. Time comes from the clock only.
// Thread-safe. `clock` must outlive this object.
class FakeQuota {
 public:
  explicit FakeQuota(const Clock& clock);

  // Replaces the configuration and forgets all spends and counters (a fresh run).
  void Configure(FakeQuotaConfig config);
  bool enabled() const;

  struct Reply {
    int status = 200;
    std::string body;
  };
  // A generateContent call by `account` for `model`: 200 (and a spend) or the 429. Unset when
  // accounting is off.
  std::optional<Reply> Generate(const std::string& account, const AccountQuotaProfile& profile,
                                const std::string& model);
  // The "models" object of fetchAvailableModels, entries of `base` kept unless a configured model
  // replaces them. Unset when accounting is off.
  std::optional<std::string> AvailableModelsJson(const std::string& account, const AccountQuotaProfile& profile,
                                                 const std::string& base) const;
  // The body of retrieveUserQuotaSummary. Unset when accounting is off.
  std::optional<std::string> QuotaSummaryJson(const std::string& account, const AccountQuotaProfile& profile) const;
  // Ground truth as JSON (what GET /__fake/quota_stats returns): per account, family and window
  // the budget, spent, completed windows and how full each was at its reset, the intervals during
  // which it was spent, and the 200s and 429s served.
  std::string StatsJson() const;

  std::string FamilyOf(const std::string& model) const;

 private:
  struct Window {
    absl::Time start;
    std::vector<absl::Time> spends;  // in time order
    bool closed = false;             // its reset has been counted
  };
  struct Bucket {
    std::deque<Window> windows;  // oldest first; kept while a lagged read may still see them
    int64_t completed = 0;
    double used_at_reset_sum = 0;
    std::deque<double> used_at_reset;                         // the latest completed windows
    std::deque<std::pair<absl::Time, absl::Time>> exhausted;  // [spent, reset) intervals, latest
  };
  struct FamilyState {
    Bucket buckets[2];     // short, long
    WindowBudgets budgets;  // as of the latest call
    int64_t served = 0;
    int64_t refused = 0;
  };
  struct AccountState {
    std::string tier;
    std::map<std::string, FamilyState> families;
  };
  // The state of one window as of time `at`.
  struct View {
    double fraction = 1;
    absl::Time reset;
  };

  WindowBudgets BudgetsLocked(const AccountQuotaProfile& profile, const std::string& family) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Duration LengthLocked(int window) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Counts the windows that have reset by `now` and drops history no lagged read needs.
  void RollLocked(Bucket& bucket, int window, int64_t budget, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  View ViewLocked(const Bucket* bucket, int window, int64_t budget, absl::Time at) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  const Bucket* FindBucketLocked(const std::string& account, const std::string& family, int window) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const Clock& clock_;
  mutable absl::Mutex mu_;
  FakeQuotaConfig config_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, AccountState> accounts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenbroker::testing
