#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace tokenbroker {

// Subscription tier; a higher value is preferred by selection.
enum class Tier { kUnknown = 0, kFree = 1, kPro = 2, kUltra = 3 };

// Maps a tier id or name as Cloud Code or Antigravity-Manager write it ("g1-ultra-tier",
// "Google AI Pro", "FREE", ...) to a Tier: containing "ultra" → ULTRA, "pro" → PRO, any other
// non-empty text → FREE, empty → unknown.
Tier ParseTier(absl::string_view text);
absl::string_view TierName(Tier tier);

// Last known quota of one model on one account.
struct ModelQuota {
  std::string model;
  double remaining_fraction = 0;  // 0..1
  std::optional<absl::Time> reset_time;
  absl::Time observed = absl::InfinitePast();  // when it was read from upstream
  // Not read from upstream: a quota 429 showed it spent at `observed` (only an observation taken
  // after that, allowing for the quota API's lag, replaces it).
  bool from_outcome = false;
};

// Last known state of one quota bucket of one account (retrieveUserQuotaSummary): a window of a
// model family's quota, which limits every model of the family.
struct BucketQuota {
  std::string family;  // "gemini", "3p"
  std::string bucket;  // e.g. "gemini-5h", "3p-weekly"
  double remaining_fraction = 0;
  std::optional<absl::Time> reset_time;
  absl::Time observed = absl::InfinitePast();
  bool from_outcome = false;  // as ModelQuota::from_outcome
};

// One account as the account store holds it. Contains secrets (refresh and access token): never
// log a whole record.
struct AccountRecord {
  std::string id;     // file name without ".json"
  std::string email;
  std::string refresh_token;
  std::string access_token;                  // empty when none is known
  absl::Time access_expiry = absl::InfinitePast();
  std::string project_id;                    // empty when the account has none
  Tier tier = Tier::kUnknown;
  bool disabled = false;
  std::string disabled_reason;
  // Google suspended the account (a Terms-of-Service 403 the broker's own quota poll saw): never
  // handed out again until an operator enables it. Kept in the account file ("suspended").
  bool suspended = false;
  std::string suspension_message;  // the upstream's words, as SafeText
  bool proxy_disabled = false;
  std::vector<std::string> protected_models;
  // The egress its own calls leave through (file field "egress"); empty: direct. Not served while
  // egress_problem is set (the loader's check against --egress_file, never from the file).
  std::string egress_id;
  std::string egress_problem;
  std::vector<ModelQuota> quotas;
  std::vector<BucketQuota> buckets;  // from the monitor only (never in the file); at most kMaxBuckets
  static constexpr size_t kMaxBuckets = 16;
  // The monitor found no Cloud Code project for it (loadCodeAssist named none): why, while
  // onboarding runs or after it failed. Not handed out while set; never in the file.
  std::string no_project_reason;
  bool quota_forbidden = false;  // the quota API answered 403 for it
  absl::Time quota_forbidden_observed = absl::InfinitePast();
};

// The disabled_reason of a suspended account: "suspended by Google (Terms of Service): <message>".
// Replicas and the account file carry suspensions as disables with this prefix.
inline constexpr absl::string_view kSuspendedPrefix = "suspended by Google (Terms of Service)";
std::string SuspendedReason(absl::string_view message);
// The message of a disabled_reason SuspendedReason made; unset for any other reason.
std::optional<std::string> SuspensionMessageOf(absl::string_view reason);

}  // namespace tokenbroker
