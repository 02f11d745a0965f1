#include "lib/common/account.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace tokenbroker {

Tier ParseTier(absl::string_view text) {
  if (text.empty()) return Tier::kUnknown;
  const std::string lower = absl::AsciiStrToLower(text);
  if (absl::StrContains(lower, "ultra")) return Tier::kUltra;
  if (absl::StrContains(lower, "pro")) return Tier::kPro;
  return Tier::kFree;
}

absl::string_view TierName(Tier tier) {
  switch (tier) {
    case Tier::kUltra: return "ULTRA";
    case Tier::kPro: return "PRO";
    case Tier::kFree: return "FREE";
    case Tier::kUnknown: break;
  }
  return "UNKNOWN";
}

std::string SuspendedReason(absl::string_view message) {
  return message.empty() ? std::string(kSuspendedPrefix) : absl::StrCat(kSuspendedPrefix, ": ", message);
}

std::optional<std::string> SuspensionMessageOf(absl::string_view reason) {
  if (!absl::ConsumePrefix(&reason, kSuspendedPrefix)) return std::nullopt;
  absl::ConsumePrefix(&reason, ": ");
  return std::string(reason);
}

}  // namespace tokenbroker
