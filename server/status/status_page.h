#pragma once

// The live status page (issue 18), served on the broker's /metrics port:
//   /status       the page: HTML, CSS and JS built into the binary, no data in it; it polls
//   /status.json  the pool at a glance (documented in the README for scripts).
// Both need the admin token when admin auth is on ("Authorization: Bearer <token>", or HTTP Basic
// auth with the token as password, so a browser asks for it). The snapshot never holds a token, a
// refresh token or a session id, and emails only with StatusPageOptions::show_emails. Its size is
// bounded whatever the pool's: accounts come a page at a time, lists are capped, the rest is
// summarised in counts.

#include <cstddef>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "lib/selection/account_pool.h"
#include "lib/state/redis_state.h"
#include "lib/tokens/token_manager.h"
#include "server/security/auth.h"
#include "server/api/broker_service.h"
#include "server/api/quota_subscriber.h"
#include "server/status/http_routes.h"

namespace tokenbroker {

struct StatusPageOptions {
  bool show_emails = false;       // --status_show_emails
  bool embedded_monitor = false;  // quota is polled in this process (--embedded_monitor)
  const Clock* clock = &Clock::Real();  // countdowns and the snapshot's time; must outlive the page
};

// What the page reads, through public APIs only. All must outlive the StatusPage; `subscriber`,
// `redis` and `auth` may be null (none).
struct StatusSources {
  const AccountPool* pool = nullptr;
  const TokenManager* tokens = nullptr;
  const QuotaSubscriber* subscriber = nullptr;
  const BrokerService* service = nullptr;
  const RedisState* redis = nullptr;
  const Authenticator* auth = nullptr;
};

// Thread-safe.
class StatusPage {
 public:
  // Most accounts in one answer of /status.json (`limit`), and its default.
  static constexpr int kMaxLimit = 500;
  static constexpr int kDefaultLimit = 100;
  // Most entries of the cooldown and disabled lists, and of the per-model summary.
  static constexpr size_t kMaxListed = 100;
  static constexpr size_t kMaxModels = 64;

  StatusPage(StatusSources sources, StatusPageOptions options);

  // The JSON snapshot for a URL query ("offset=0&limit=100&state=all&tier=all"). INVALID_ARGUMENT
  // naming the parameter for a bad or unknown one.
  absl::StatusOr<std::string> Snapshot(absl::string_view query, absl::Time now) const;

  // Answers GET /status, /status.json (and /status/ → /status); nullopt for any other path.
  std::optional<OutgoingHttpResponse> Handle(const IncomingHttpRequest& request) const;

  // Serves the page on the /metrics server listening on `port` (its Exposer must have been made
  // with HttpRouteCallbacks()) until this object is destroyed.
  void ServeOn(int port);

  // The page itself.
  static absl::string_view Html();

 private:
  StatusSources sources_;
  StatusPageOptions options_;
  std::unique_ptr<HttpRoute> route_;
};

}  // namespace tokenbroker
