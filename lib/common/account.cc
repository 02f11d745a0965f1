#include "lib/common/account.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

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

}  // namespace tokenbroker
