#include "tests/fakes/fake_quota.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace tokenbroker::testing {
namespace {

using Json = nlohmann::json;

constexpr int kShort = 0;
constexpr int kLong = 1;
constexpr const char* kWindowNames[2] = {"short", "long"};
constexpr size_t kMaxKeptWindows = 64;
constexpr size_t kMaxRecords = 1000;
constexpr int64_t kMaxBudget = 1'000'000;

absl::Duration CeilMs(absl::Duration d) { return absl::Ceil(d, absl::Milliseconds(1)); }

// Whole seconds and a trimmed millisecond fraction: "7", "7.25".
std::string Seconds(int64_t ms) {
  if (ms % 1000 == 0) return absl::StrCat(ms / 1000);
  std::string frac = absl::StrFormat("%03d", ms % 1000);
  while (frac.back() == '0') frac.pop_back();
  return absl::StrCat(ms / 1000, ".", frac);
}

// Go's time.Duration form, as Google writes quotaResetDelay: "510ms", "7.25s", "2h1m1.5s".
std::string GoDuration(absl::Duration d) {
  const int64_t ms = absl::ToInt64Milliseconds(CeilMs(std::max(d, absl::ZeroDuration())));
  if (ms < 1000) return absl::StrCat(ms, "ms");
  const int64_t h = ms / 3'600'000;
  const int64_t m = ms % 3'600'000 / 60'000;
  const std::string s = Seconds(ms % 60'000) + "s";
  if (h > 0) return absl::StrCat(h, "h", m, "m", s);
  if (m > 0) return absl::StrCat(m, "m", s);
  return s;
}

// A window's name as Google's bucket ids use it: "5h", "168h", "2.5s".
std::string WindowName(absl::Duration d) {
  std::string s = GoDuration(d);
  if (absl::EndsWith(s, "m0s")) s.resize(s.size() - 2);
  if (absl::EndsWith(s, "h0m")) s.resize(s.size() - 2);
  return s;
}

std::string Rfc3339(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
}

double UnixSeconds(absl::Time t) { return absl::ToDoubleSeconds(t - absl::UnixEpoch()); }

// Rounds up to the millisecond, so that a delay read from the answer never ends before the reset.
absl::Time CeilTime(absl::Time t) { return absl::UnixEpoch() + CeilMs(t - absl::UnixEpoch()); }

absl::Status WrongType(absl::string_view field, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("quota config: '", field, "' must be ", want));
}

absl::StatusOr<absl::Duration> DurationField(const Json& obj, const char* field, absl::Duration fallback,
                                       double scale, bool allow_zero) {
  auto it = obj.find(field);
  if (it == obj.end()) return fallback;
  if (!it->is_number() || it->get<double>() < 0 || (!allow_zero && it->get<double>() == 0) ||
      !std::isfinite(it->get<double>())) {
    return WrongType(field, allow_zero ? "a number >= 0" : "a number > 0");
  }
  return absl::Seconds(it->get<double>() * scale);
}

absl::StatusOr<FamilyBudgets> BudgetsFromJson(const Json& j, const std::string& where) {
  if (!j.is_object()) return WrongType(where, "an object of {family: {short, long}}");
  FamilyBudgets out;
  for (auto& [family, b] : j.items()) {
    const std::string field = absl::StrCat(where, ".", family);
    if (!b.is_object()) return WrongType(field, "an object {short, long}");
    WindowBudgets wb;
    for (int w : {kShort, kLong}) {
      auto it = b.find(kWindowNames[w]);
      if (it == b.end()) return WrongType(absl::StrCat(field, ".", kWindowNames[w]), "set");
      if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > kMaxBudget) {
        return WrongType(absl::StrCat(field, ".", kWindowNames[w]), absl::StrCat("an integer in [0, ", kMaxBudget, "]"));
      }
      (w == kShort ? wb.short_window : wb.long_window) = it->get<int64_t>();
    }
    out[family] = wb;
  }
  return out;
}

}  // namespace

absl::StatusOr<FamilyBudgets> ParseFamilyBudgets(absl::string_view json) {
  Json j = Json::parse(json, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError("budgets: not JSON");
  return BudgetsFromJson(j, "budgets");
}

absl::StatusOr<FakeQuotaConfig> ParseFakeQuotaConfig(absl::string_view json) {
  Json j = Json::parse(json, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("quota config: not a JSON object");
  FakeQuotaConfig c;
  if (auto it = j.find("enabled"); it != j.end()) {
    if (!it->is_boolean()) return WrongType("enabled", "a boolean");
    c.enabled = it->get<bool>();
  } else {
    c.enabled = true;  // configuring quotas means wanting them
  }
  absl::StatusOr<absl::Duration> d = DurationField(j, "short_window_s", c.short_window, 1, false);
  if (!d.ok()) return d.status();
  c.short_window = *d;
  d = DurationField(j, "long_window_s", c.long_window, 1, false);
  if (!d.ok()) return d.status();
  c.long_window = *d;
  d = DurationField(j, "lag_ms", c.lag, 1e-3, true);
  if (!d.ok()) return d.status();
  c.lag = *d;
  if (auto it = j.find("family_rules"); it != j.end()) {
    if (!it->is_array()) return WrongType("family_rules", "an array of {contains, family}");
    c.family_rules.clear();
    for (const Json& r : *it) {
      if (!r.is_object() || !r.contains("contains") || !r["contains"].is_string() || !r.contains("family") ||
          !r["family"].is_string() || r["family"].get<std::string>().empty()) {
        return WrongType("family_rules[]", "{\"contains\": text, \"family\": name}");
      }
      c.family_rules.emplace_back(r["contains"].get<std::string>(), r["family"].get<std::string>());
    }
  }
  if (auto it = j.find("default_family"); it != j.end()) {
    if (!it->is_string() || it->get<std::string>().empty()) return WrongType("default_family", "a non-empty string");
    c.default_family = it->get<std::string>();
  }
  if (auto it = j.find("models"); it != j.end()) {
    if (!it->is_array()) return WrongType("models", "an array of model names");
    c.models.clear();
    for (const Json& m : *it) {
      if (!m.is_string() || m.get<std::string>().empty()) return WrongType("models[]", "a non-empty string");
      c.models.push_back(m.get<std::string>());
    }
  }
  if (auto it = j.find("budgets"); it != j.end()) {
    if (!it->is_object()) return WrongType("budgets", "an object of {tier: {family: {short, long}}}");
    for (auto& [tier, fams] : it->items()) {
      absl::StatusOr<FamilyBudgets> b = BudgetsFromJson(fams, absl::StrCat("budgets.", tier));
      if (!b.ok()) return b.status();
      c.tier_budgets[tier] = *std::move(b);
    }
  }
  for (const char* flag : {"min_over_windows", "lie_3p"}) {
    if (auto it = j.find(flag); it != j.end()) {
      if (!it->is_boolean()) return WrongType(flag, "a boolean");
      (absl::string_view(flag) == "lie_3p" ? c.lie_3p : c.min_over_windows) = it->get<bool>();
    }
  }
  return c;
}

FakeQuota::FakeQuota(const Clock& clock) : clock_(clock) {}

void FakeQuota::Configure(FakeQuotaConfig config) {
  absl::MutexLock lock(&mu_);
  config_ = std::move(config);
  accounts_.clear();
}

bool FakeQuota::enabled() const {
  absl::ReaderMutexLock lock(&mu_);
  return config_.enabled;
}

std::string FakeQuota::FamilyOf(const std::string& model) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [text, family] : config_.family_rules) {
    if (absl::StrContains(model, text)) return family;
  }
  return config_.default_family;
}

WindowBudgets FakeQuota::BudgetsLocked(const AccountQuotaProfile& profile, const std::string& family) const {
  if (auto it = profile.budgets.find(family); it != profile.budgets.end()) return it->second;
  if (auto t = config_.tier_budgets.find(profile.tier); t != config_.tier_budgets.end()) {
    if (auto it = t->second.find(family); it != t->second.end()) return it->second;
  }
  return WindowBudgets{};
}

absl::Duration FakeQuota::LengthLocked(int window) const {
  return window == kShort ? config_.short_window : config_.long_window;
}

void FakeQuota::RollLocked(Bucket& bucket, int window, int64_t budget, absl::Time now) {
  const absl::Duration len = LengthLocked(window);
  for (Window& w : bucket.windows) {
    if (w.closed || w.start + len > now) continue;
    w.closed = true;
    ++bucket.completed;
    const double used = budget > 0 ? static_cast<double>(w.spends.size()) / static_cast<double>(budget) : 1.0;
    bucket.used_at_reset_sum += used;
    bucket.used_at_reset.push_back(used);
    if (bucket.used_at_reset.size() > kMaxRecords) bucket.used_at_reset.pop_front();
  }
  // A lagged read looks back to now − lag: windows that ended before that are of no more use.
  while (!bucket.windows.empty() && bucket.windows.front().closed &&
         (bucket.windows.front().start + len <= now - config_.lag || bucket.windows.size() > kMaxKeptWindows)) {
    bucket.windows.pop_front();
  }
}

FakeQuota::View FakeQuota::ViewLocked(const Bucket* bucket, int window, int64_t budget, absl::Time at) const {
  const absl::Duration len = LengthLocked(window);
  if (bucket != nullptr) {
    for (auto w = bucket->windows.rbegin(); w != bucket->windows.rend(); ++w) {
      if (w->start > at || w->start + len <= at) continue;
      const auto spent = std::upper_bound(w->spends.begin(), w->spends.end(), at) - w->spends.begin();
      const double left = budget > 0 ? std::max<double>(0, static_cast<double>(budget - spent)) / static_cast<double>(budget) : 0;
      return View{left, w->start + len};
    }
  }
  return View{budget > 0 ? 1.0 : 0.0, at + len};
}

const FakeQuota::Bucket* FakeQuota::FindBucketLocked(const std::string& account, const std::string& family,
                                                     int window) const {
  auto a = accounts_.find(account);
  if (a == accounts_.end()) return nullptr;
  auto f = a->second.families.find(family);
  if (f == a->second.families.end()) return nullptr;
  return &f->second.buckets[window];
}

std::optional<FakeQuota::Reply> FakeQuota::Generate(const std::string& account, const AccountQuotaProfile& profile,
                                                    const std::string& model) {
  const std::string family = FamilyOf(model);
  absl::MutexLock lock(&mu_);
  if (!config_.enabled) return std::nullopt;
  const absl::Time now = clock_.Now();
  AccountState& acct = accounts_[account];
  acct.tier = profile.tier;
  FamilyState& fs = acct.families[family];
  const WindowBudgets wb = BudgetsLocked(profile, family);
  fs.budgets = wb;
  const int64_t budget[2] = {wb.short_window, wb.long_window};

  int blocking = -1;  // the spent window that resets last
  absl::Time blocked_until = absl::InfinitePast();
  for (int w : {kShort, kLong}) {
    Bucket& b = fs.buckets[w];
    RollLocked(b, w, budget[w], now);
    const bool open = !b.windows.empty() && !b.windows.back().closed;
    if (budget[w] <= 0 && !open) {
      // No budget at all: the window opens spent, so that its reset is a fixed point in time.
      b.windows.push_back(Window{now, {}, false});
      b.exhausted.emplace_back(now, now + LengthLocked(w));
      if (b.exhausted.size() > kMaxRecords) b.exhausted.pop_front();
    }
    if (b.windows.empty() || b.windows.back().closed) continue;
    const Window& cur = b.windows.back();
    if (static_cast<int64_t>(cur.spends.size()) < budget[w]) continue;
    const absl::Time reset = cur.start + LengthLocked(w);
    if (reset > blocked_until) {
      blocked_until = reset;
      blocking = w;
    }
  }

  if (blocking >= 0) {
    ++fs.refused;
    const absl::Time reset = CeilTime(blocked_until);
    const absl::Duration delay = reset - now;
    const std::string delay_text = GoDuration(delay);
    std::string message;
    if (blocking == kShort) {
      message = absl::StrCat("You have exhausted your capacity on this model. Your quota will reset after ",
                             delay_text, ".");
    } else {
      std::vector<std::string> name_parts = absl::StrSplit(model, '-');
      message = absl::StrCat("Individual quota reached for ", name_parts[0], " models. Resets in ", delay_text, ".");
    }
    Json metadata = {{"model", model}, {"quotaResetDelay", delay_text}, {"quotaResetTimeStamp", Rfc3339(reset)}};
    if (blocking == kLong) metadata["uiMessage"] = "true";
    Json body = {{"error",
                  {{"code", 429},
                   {"status", "RESOURCE_EXHAUSTED"},
                   {"message", message},
                   {"details", Json::array({
                                   {{"@type", "type.googleapis.com/google.rpc.ErrorInfo"},
                                    {"reason", "QUOTA_EXHAUSTED"},
                                    {"domain", "cloudcode-pa.googleapis.com"},
                                    {"metadata", metadata}},
                                   {{"@type", "type.googleapis.com/google.rpc.RetryInfo"},
                                    {"retryDelay", Seconds(absl::ToInt64Milliseconds(CeilMs(delay))) + "s"}},
                               })}}}};
    return Reply{429, body.dump()};
  }

  for (int w : {kShort, kLong}) {
    Bucket& b = fs.buckets[w];
    if (b.windows.empty() || b.windows.back().closed) {
      b.windows.push_back(Window{now, {}, false});
      while (b.windows.size() > kMaxKeptWindows) b.windows.pop_front();
    }
    Window& cur = b.windows.back();
    cur.spends.push_back(now);
    if (static_cast<int64_t>(cur.spends.size()) == budget[w]) {
      b.exhausted.emplace_back(now, cur.start + LengthLocked(w));
      if (b.exhausted.size() > kMaxRecords) b.exhausted.pop_front();
    }
  }
  ++fs.served;
  return Reply{200, R"({"response":{"candidates":[{"content":{"role":"model","parts":[{"text":"Hello from the fake upstream."}]}}]}})"};
}

std::optional<std::string> FakeQuota::AvailableModelsJson(const std::string& account,
                                                          const AccountQuotaProfile& profile,
                                                          const std::string& base) const {
  std::vector<std::pair<std::string, std::string>> model_families;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (!config_.enabled) return std::nullopt;
    for (const std::string& m : config_.models) model_families.emplace_back(m, "");
  }
  for (auto& [model, family] : model_families) family = FamilyOf(model);

  Json models = Json::parse(base, nullptr, false);
  if (models.is_discarded() || !models.is_object()) models = Json::object();
  absl::ReaderMutexLock lock(&mu_);
  const absl::Time at = clock_.Now() - config_.lag;
  for (const auto& [model, family] : model_families) {
    const WindowBudgets wb = BudgetsLocked(profile, family);
    View v = ViewLocked(FindBucketLocked(account, family, kShort), kShort, wb.short_window, at);
    if (config_.min_over_windows) {
      View l = ViewLocked(FindBucketLocked(account, family, kLong), kLong, wb.long_window, at);
      if (l.fraction < v.fraction || (l.fraction == v.fraction && v.fraction == 0 && l.reset > v.reset)) v = l;
    }
    if (config_.lie_3p && family == "3p") v.fraction = 1.0;
    models[model] = {{"displayName", model},
                     {"quotaInfo", {{"remainingFraction", v.fraction}, {"resetTime", Rfc3339(CeilTime(v.reset))}}}};
  }
  return models.dump();
}

std::optional<std::string> FakeQuota::QuotaSummaryJson(const std::string& account,
                                                       const AccountQuotaProfile& profile) const {
  std::set<std::string> families;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (!config_.enabled) return std::nullopt;
    families.insert(config_.default_family);
    for (const auto& [text, family] : config_.family_rules) families.insert(family);
  }
  absl::ReaderMutexLock lock(&mu_);
  const absl::Time at = clock_.Now() - config_.lag;
  Json groups = Json::array();
  for (const std::string& family : families) {
    const WindowBudgets wb = BudgetsLocked(profile, family);
    Json buckets = Json::array();
    for (int w : {kShort, kLong}) {
      const View v = ViewLocked(FindBucketLocked(account, family, w), w, w == kShort ? wb.short_window : wb.long_window, at);
      const std::string window = WindowName(LengthLocked(w));
      buckets.push_back({{"bucketId", absl::StrCat(family, "-", window)},
                         {"window", window},
                         {"remainingFraction", v.fraction},
                         {"resetTime", Rfc3339(CeilTime(v.reset))}});
    }
    groups.push_back({{"groupId", family}, {"buckets", buckets}});
  }
  return Json{{"groups", groups}}.dump();
}

std::string FakeQuota::StatsJson() const {
  absl::ReaderMutexLock lock(&mu_);
  const absl::Time now = clock_.Now();
  Json accounts = Json::object();
  int64_t served = 0;
  int64_t refused = 0;
  for (const auto& [id, acct] : accounts_) {
    Json families = Json::object();
    for (const auto& [family, fs] : acct.families) {
      const WindowBudgets& wb = fs.budgets;
      Json windows = Json::object();
      for (int w : {kShort, kLong}) {
        const Bucket& b = fs.buckets[w];
        const absl::Duration len = LengthLocked(w);
        int64_t completed = b.completed;
        double used_sum = b.used_at_reset_sum;
        Json used = Json::array();
        for (double u : b.used_at_reset) used.push_back(u);
        Json current = nullptr;
        int64_t spent = 0;
        for (const Window& win : b.windows) {
          if (win.closed) continue;
          if (win.start + len <= now) {  // reset already, not yet counted by a call
            ++completed;
            const int64_t bw = w == kShort ? wb.short_window : wb.long_window;
            const double u = bw > 0 ? static_cast<double>(win.spends.size()) / static_cast<double>(bw) : 1.0;
            used_sum += u;
            used.push_back(u);
            continue;
          }
          spent = static_cast<int64_t>(win.spends.size());
          current = {{"start", UnixSeconds(win.start)}, {"reset", UnixSeconds(win.start + len)}};
        }
        Json exhausted = Json::array();
        for (const auto& [from, to] : b.exhausted) exhausted.push_back({UnixSeconds(from), UnixSeconds(to)});
        windows[kWindowNames[w]] = {{"length_s", absl::ToDoubleSeconds(len)},
                                    {"budget", w == kShort ? wb.short_window : wb.long_window},
                                    {"spent", spent},
                                    {"current", current},
                                    {"completed", completed},
                                    {"used_at_reset_mean", completed > 0 ? used_sum / static_cast<double>(completed) : 0.0},
                                    {"used_at_reset", used},
                                    {"exhausted", exhausted}};
      }
      families[family] = {{"served", fs.served}, {"refused", fs.refused}, {"windows", windows}};
      served += fs.served;
      refused += fs.refused;
    }
    accounts[id] = {{"tier", acct.tier}, {"families", families}};
  }
  return Json{{"enabled", config_.enabled},
              {"now", UnixSeconds(now)},
              {"short_window_s", absl::ToDoubleSeconds(config_.short_window)},
              {"long_window_s", absl::ToDoubleSeconds(config_.long_window)},
              {"lag_ms", absl::ToDoubleMilliseconds(config_.lag)},
              {"accounts", accounts},
              {"totals", {{"served", served}, {"refused", refused}}}}
      .dump();
}

}  // namespace tokenbroker::testing
