#pragma once

#include <optional>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lib/upstream/http_client.h"

namespace tokenbroker {

struct OAuthOptions {
  std::string token_url = "https://oauth2.googleapis.com/token";
  std::string client_id;
  std::string client_secret;  // secret: never logged
  absl::Duration timeout = absl::Seconds(10);
  // Attempts for 5xx, 429 and transport failures, with jittered exponential backoff.
  int max_attempts = 3;
  absl::Duration initial_backoff = absl::Milliseconds(250);
  absl::Duration max_backoff = absl::Seconds(4);
};

struct TokenGrant {
  std::string access_token;
  absl::Duration expires_in;
  std::optional<std::string> refresh_token;  // set when Google rotated it
};

// Interprets one answer of the token endpoint. Pure.
//  - 200 with access_token and expires_in (1 s to 24 h): the grant. Anything else in a 200 (not
//    JSON, no access_token, an expires_in that is missing, zero, negative or absurd): INTERNAL.
//  - "invalid_grant": PERMISSION_DENIED "invalid_grant: <description>" — the refresh token is
//    revoked or expired and the account must be disabled.
//  - "invalid_client"/"unauthorized_client": UNAUTHENTICATED (our client id/secret are wrong).
//  - 429 and 5xx: UNAVAILABLE (worth retrying). Anything else: INTERNAL.
// Messages never quote tokens.
absl::StatusOr<TokenGrant> ParseTokenResponse(long http_status, absl::string_view body);

// True for the error of ParseTokenResponse that means "disable the account".
bool IsInvalidGrant(const absl::Status& status);

// Google's OAuth refresh-token grant. Thread-safe. Blocks for the HTTP call and its retries, so
// call it only from a worker thread, never from a request thread. `http` must outlive it.
class OAuthClient {
 public:
  OAuthClient(OAuthOptions options, const HttpClient& http);
  // Through `egress` (default: direct). A failure of the egress is IsEgressFailure (still so after
  // the retries).
  absl::StatusOr<TokenGrant> Refresh(const std::string& refresh_token, const EgressRoute& egress = {}) const;

 private:
  const OAuthOptions options_;
  const HttpClient& http_;
};

}  // namespace tokenbroker
