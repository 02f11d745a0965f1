#include "lib/broker/caller_policy.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "lib/common/errors.h"
#include "lib/common/safe_text.h"

namespace tokenbroker {
namespace {

constexpr int kMaxCount = 1'000'000;
constexpr int kMaxWaitingLimit = 10'000;
constexpr size_t kMaxNameLength = 128;
constexpr size_t kMaxModelsPerEntry = 256;
constexpr absl::Duration kMaxRetryAfter = absl::Minutes(10);

// A caller name as the tokens file may hold it: printable, no space, no '=' (so a forgotten name
// before "key=value" is caught).
bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return c > ' ' && c <= '~' && c != '='; });
}

bool ValidFamily(absl::string_view family) {
  if (family.empty() || family.size() > 64) return false;
  return std::all_of(family.begin(), family.end(),
                     [](char c) { return absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.'; });
}

class LineError {
 public:
  LineError(absl::string_view source, int line) : prefix_(absl::StrCat(source, " line ", line, ": ")) {}
  absl::Status operator()(absl::string_view field, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(prefix_, field, ": ", problem));
  }

 private:
  std::string prefix_;
};

absl::StatusOr<int> ParseCount(absl::string_view value, int lo, int hi, absl::string_view field, const LineError& err) {
  int n = 0;
  if (!absl::SimpleAtoi(value, &n) || n < lo || n > hi) {
    return err(field, absl::StrCat("\"", SafeText(value, 24), "\" is not a whole number from ", lo, " to ", hi));
  }
  return n;
}

absl::StatusOr<ShareLimit> ParseShare(absl::string_view value, absl::string_view field, const LineError& err) {
  ShareLimit out;
  if (absl::ConsumeSuffix(&value, "%")) {
    double p = 0;
    if (!absl::SimpleAtod(value, &p) || !std::isfinite(p) || p <= 0 || p > 100) {
      return err(field, absl::StrCat("\"", SafeText(value, 24), "%\" is not a share from 0% (excluded) to 100%"));
    }
    out.percent = p;
    return out;
  }
  absl::StatusOr<int> n = ParseCount(value, 1, kMaxCount, field, err);
  if (!n.ok()) {
    return err(field, absl::StrCat("\"", SafeText(value, 24), "\" is neither a count from 1 to ", kMaxCount,
                                   " nor a share such as 25%"));
  }
  out.count = *n;
  return out;
}

std::optional<Tier> TierOfKey(absl::string_view tier) {
  const std::string lower = absl::AsciiStrToLower(tier);
  if (lower == "free") return Tier::kFree;
  if (lower == "pro") return Tier::kPro;
  if (lower == "ultra") return Tier::kUltra;
  if (lower == "unknown") return Tier::kUnknown;
  return std::nullopt;
}

absl::Status ParseField(CallerPolicy& p, absl::string_view key, absl::string_view value, const LineError& err) {
  if (key == "max_inflight") {
    absl::StatusOr<int> n = ParseCount(value, 1, kMaxCount, key, err);
    if (!n.ok()) return n.status();
    p.max_inflight = *n;
  } else if (key == "max_accounts") {
    absl::StatusOr<ShareLimit> s = ParseShare(value, key, err);
    if (!s.ok()) return s.status();
    p.max_accounts = *s;
  } else if (absl::string_view tier = key; absl::ConsumePrefix(&tier, "max_accounts.")) {
    std::optional<Tier> t = TierOfKey(tier);
    if (!t) return err(key, "the tier must be free, pro, ultra or unknown");
    absl::StatusOr<ShareLimit> s = ParseShare(value, key, err);
    if (!s.ok()) return s.status();
    p.max_tier_accounts[*t] = *s;
  } else if (key == "models") {
    for (absl::string_view item : absl::StrSplit(value, ',')) {
      if (absl::string_view family = item; absl::ConsumePrefix(&family, "family:")) {
        if (!ValidFamily(family)) {
          return err(key, absl::StrCat("\"", SafeText(item, 40),
                                       "\": a family is family:<letters, digits, - _ .> (at most 64)"));
        }
        p.families.emplace_back(family);
      } else if (absl::Status s = ValidateModel(key, item, /*required=*/true); !s.ok()) {
        return err(key, absl::StrCat("\"", SafeText(item, 40), "\": a model name is 1 to ", kMaxModelLength,
                                     " printable characters"));
      } else {
        p.models.emplace_back(item);
      }
      if (p.models.size() + p.families.size() > kMaxModelsPerEntry) {
        return err(key, absl::StrCat("at most ", kMaxModelsPerEntry, " models and families"));
      }
    }
  } else if (key == "priority") {
    if (value == "low") {
      p.priority = CallerPriority::kLow;
    } else if (value == "normal") {
      p.priority = CallerPriority::kNormal;
    } else if (value == "high") {
      p.priority = CallerPriority::kHigh;
    } else {
      return err(key, absl::StrCat("\"", SafeText(value, 24), "\" is not low, normal or high"));
    }
  } else if (key == "max_waiting") {
    absl::StatusOr<int> n = ParseCount(value, 0, kMaxWaitingLimit, key, err);
    if (!n.ok()) return n.status();
    p.max_waiting = *n;
  } else if (key == "retry_after") {
    absl::Duration d;
    if (!absl::ParseDuration(value, &d) || d < absl::Milliseconds(1) || d > kMaxRetryAfter) {
      return err(key, absl::StrCat("\"", SafeText(value, 24), "\" is not a duration from 1ms to 10m (e.g. 500ms, 2s)"));
    }
    p.retry_after = d;
  } else {
    return err(SafeText(key, 40),
               "unknown field; allowed: max_inflight, max_accounts, max_accounts.<tier>, models, priority, "
               "max_waiting, retry_after");
  }
  return absl::OkStatus();
}

}  // namespace

int ShareLimit::Resolve(size_t total) const {
  if (count > 0) return count;
  if (percent <= 0) return 0;
  return std::max(1, static_cast<int>(std::floor(percent / 100.0 * static_cast<double>(total))));
}

std::string ShareLimit::ToString() const {
  if (count > 0) return absl::StrCat(count);
  return absl::StrCat(percent, "%");
}

absl::string_view CallerPriorityName(CallerPriority p) {
  switch (p) {
    case CallerPriority::kLow: return "low";
    case CallerPriority::kNormal: return "normal";
    case CallerPriority::kHigh: return "high";
  }
  return "normal";
}

const CallerPolicy* CallerPolicies::Find(absl::string_view caller) const {
  if (auto it = entries_.find(std::string(caller)); it != entries_.end()) return &it->second;
  if (auto it = entries_.find(std::string(kDefaultName)); it != entries_.end()) return &it->second;
  return nullptr;
}

absl::StatusOr<CallerPolicies> ParseCallerPolicies(absl::string_view text, absl::string_view source) {
  if (text.size() > CallerPolicies::kMaxFileBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": larger than ", CallerPolicies::kMaxFileBytes, " bytes"));
  }
  CallerPolicies out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const LineError err(source, line_no);
    std::vector<absl::string_view> words = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (!ValidName(words[0])) {
      return err("name", absl::StrCat("a line starts with the caller's name (1 to ", kMaxNameLength,
                                      " printable characters, no space or '='), then key=value fields"));
    }
    CallerPolicy policy;
    policy.name = std::string(words[0]);
    if (out.entries_.contains(policy.name)) return err("name", absl::StrCat("caller ", policy.name, " appears twice"));
    if (out.entries_.size() >= CallerPolicies::kMaxEntries) {
      return err("name", absl::StrCat("more than ", CallerPolicies::kMaxEntries, " callers"));
    }
    absl::flat_hash_set<std::string> seen;
    for (size_t i = 1; i < words.size(); ++i) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(words[i], absl::MaxSplits('=', 1));
      if (!absl::StrContains(words[i], '=') || kv.first.empty() || kv.second.empty()) {
        return err(SafeText(kv.first, 40), "want key=value");
      }
      if (!seen.insert(std::string(kv.first)).second) return err(SafeText(kv.first, 40), "given twice");
      if (absl::Status s = ParseField(policy, kv.first, kv.second, err); !s.ok()) return s;
    }
    out.entries_.emplace(policy.name, std::move(policy));
  }
  if (out.entries_.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": names no caller"));
  return out;
}

absl::Status CheckCallerModel(const CallerPolicy& policy, absl::string_view model, absl::string_view family) {
  if (policy.models.empty() && policy.families.empty()) return absl::OkStatus();
  if (std::find(policy.models.begin(), policy.models.end(), model) != policy.models.end()) return absl::OkStatus();
  if (std::find(policy.families.begin(), policy.families.end(), family) != policy.families.end()) {
    return absl::OkStatus();
  }
  std::vector<std::string> allowed(policy.models.begin(), policy.models.end());
  for (const std::string& f : policy.families) allowed.push_back(absl::StrCat("family:", f));
  return absl::PermissionDeniedError(absl::StrCat("caller policy ", policy.name, " does not allow model ",
                                                  SafeText(model, kMaxModelLength), " (family ", family,
                                                  "); allowed: ", absl::StrJoin(allowed, ", ")));
}

bool CallerShare::Blocks(const std::string& account_id, Tier tier) const {
  if (!all && std::find(tiers.begin(), tiers.end(), tier) == tiers.end()) return false;
  return !held.contains(account_id);
}

AdmissionDecision DecideAdmission(const CallerPolicy& policy, const CallerUsage& usage, const PoolShape& shape) {
  AdmissionDecision d;
  if (policy.max_inflight > 0 && usage.in_flight >= policy.max_inflight) {
    d.refused_limit = "max_inflight";
    d.detail = absl::StrCat("caller ", policy.name, " has ", usage.in_flight, " leases in flight, its max_inflight is ",
                            policy.max_inflight, "; report outcomes to free them");
    return d;
  }
  // A pending reservation may land on an account not held yet: it counts as one, so that calls
  // served at once never take the caller past its share together.
  auto share = std::make_shared<CallerShare>();
  share->caller = policy.name;
  if (policy.max_accounts.set() && usage.accounts + usage.pending >= policy.max_accounts.Resolve(shape.accounts)) {
    share->all = true;
  }
  for (const auto& [tier, limit] : policy.max_tier_accounts) {
    auto held = usage.tier_accounts.find(tier);
    const int n = held == usage.tier_accounts.end() ? 0 : held->second;
    auto size = shape.by_tier.find(tier);
    const size_t total = size == shape.by_tier.end() ? 0 : size->second;
    if (n + usage.pending >= limit.Resolve(total)) share->tiers.push_back(tier);
  }
  if (share->all || !share->tiers.empty()) {
    share->held = usage.held;
    d.share = std::move(share);
  }
  return d;
}

}  // namespace tokenbroker
