#include "server/status/status_page.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "lib/common/safe_text.h"
#include "nlohmann/json.hpp"

namespace tokenbroker {

// Defined in the file generated from status_page.html (server/CMakeLists.txt).
extern const char kStatusPageHtml[];
extern const size_t kStatusPageHtmlSize;

namespace {

using Json = nlohmann::json;

constexpr size_t kMaxReasonBytes = 200;
constexpr size_t kMaxQuotasPerAccount = 32;
constexpr size_t kMaxProtectedPerAccount = 16;
constexpr const char* kStates[] = {"enabled", "cooling", "blocked", "proxy_disabled", "disabled"};
constexpr const char* kTiers[] = {"ULTRA", "PRO", "FREE", "UNKNOWN"};

// Seconds from `now` to `t`, to a tenth (negative: past).
double SecondsUntil(absl::Time t, absl::Time now) { return std::round(absl::ToDoubleSeconds(t - now) * 10) / 10; }

bool LiveAccountCooldown(const AccountView& a, absl::Time now) {
  for (const CooldownView& c : a.cooldowns) {
    if (c.model.empty() && c.until > now) return true;
  }
  return false;
}

// The account's state as operators name it: disabled (refresh token revoked, or by the file),
// proxy_disabled (switched off by the operator), blocked (a 403 VALIDATION_REQUIRED wants a human;
// once its block has run out the next request probes it, so it counts as enabled again), cooling
// (another whole-account cooldown), else enabled.
std::string StateOf(const AccountView& a, absl::Time now) {
  if (a.disabled) return "disabled";
  if (a.proxy_disabled) return "proxy_disabled";
  if (LiveAccountCooldown(a, now)) return a.validation_url.empty() ? "cooling" : "blocked";
  return "enabled";
}

std::string ReasonOf(const AccountView& a, const std::string& state, absl::Time now) {
  if (state == "disabled") return a.disabled_reason.empty() ? "disabled" : a.disabled_reason;
  if (state == "proxy_disabled") return "disabled for the proxy by the operator";
  if (state == "cooling" || state == "blocked") {
    for (const CooldownView& c : a.cooldowns) {
      if (c.model.empty() && c.until > now) return c.reason;
    }
  }
  return "";
}

std::string TierText(Tier tier) {
  std::string name(TierName(tier));
  absl::AsciiStrToUpper(&name);
  return name.empty() ? "UNKNOWN" : name;
}

int TierOrder(Tier tier) { return -static_cast<int>(tier); }  // ULTRA first

struct Query {
  int offset = 0;
  int limit = StatusPage::kDefaultLimit;
  std::string state = "all";
  std::string tier = "all";
};

absl::StatusOr<Query> ParseQuery(absl::string_view text) {
  Query q;
  if (text.empty()) return q;
  for (absl::string_view part : absl::StrSplit(text, '&', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(part, absl::MaxSplits('=', 1));
    const std::string& key = kv.first;
    const std::string value = absl::AsciiStrToLower(kv.second);
    if (key == "offset") {
      if (!absl::SimpleAtoi(value, &q.offset) || q.offset < 0) {
        return absl::InvalidArgumentError("offset: must be a whole number, 0 or more");
      }
    } else if (key == "limit") {
      if (!absl::SimpleAtoi(value, &q.limit) || q.limit < 1 || q.limit > StatusPage::kMaxLimit) {
        return absl::InvalidArgumentError(absl::StrCat("limit: must be a whole number from 1 to ", StatusPage::kMaxLimit));
      }
    } else if (key == "state") {
      const bool known = value == "all" || value == "attention" ||
                         std::any_of(std::begin(kStates), std::end(kStates), [&](const char* s) { return value == s; });
      if (!known) {
        return absl::InvalidArgumentError(
            "state: must be all, attention, enabled, cooling, blocked, proxy_disabled or disabled");
      }
      q.state = value;
    } else if (key == "tier") {
      std::string upper = absl::AsciiStrToUpper(value);
      const bool known = upper == "ALL" ||
                         std::any_of(std::begin(kTiers), std::end(kTiers), [&](const char* s) { return upper == s; });
      if (!known) return absl::InvalidArgumentError("tier: must be all, ULTRA, PRO, FREE or UNKNOWN");
      q.tier = upper == "ALL" ? "all" : upper;
    } else {
      // The name is caller text: only a bounded, escaped copy goes into the error.
      return absl::InvalidArgumentError(
          absl::StrCat("unknown parameter \"", SafeText(key, 40), "\" (known: offset, limit, state, tier)"));
    }
  }
  return q;
}

struct ModelSummary {
  int accounts = 0;
  int exhausted = 0;
  double sum = 0;
  double min = 1;
  std::optional<absl::Time> soonest_reset;
};

OutgoingHttpResponse JsonResponse(int status, const Json& body) {
  OutgoingHttpResponse r;
  r.status = status;
  r.content_type = "application/json";
  r.body = body.dump(-1, ' ', false, Json::error_handler_t::replace);
  return r;
}

}  // namespace

StatusPage::StatusPage(StatusSources sources, StatusPageOptions options)
    : sources_(sources), options_(std::move(options)) {}

absl::string_view StatusPage::Html() { return absl::string_view(kStatusPageHtml, kStatusPageHtmlSize); }

absl::StatusOr<std::string> StatusPage::Snapshot(absl::string_view query_text, absl::Time now) const {
  absl::StatusOr<Query> query = ParseQuery(query_text);
  if (!query.ok()) return query.status();
  const absl::Time started = options_.clock->Now();
  const std::vector<AccountView> accounts = sources_.pool->List();
  const QuotaSettings quota = sources_.pool->quota_settings();

  std::map<std::string, int> by_state;
  for (const char* s : kStates) by_state[s] = 0;
  std::map<std::string, std::map<std::string, int>> by_tier;
  std::map<std::string, ModelSummary> models;
  int in_flight = 0, sessions = 0, usable = 0, usable_with_token = 0, model_cooldowns = 0, account_cooldowns = 0;
  struct Listed {
    const AccountView* account;
    std::string state;
  };
  std::vector<Listed> selected;
  Json cooldowns = Json::array();
  std::vector<std::pair<absl::Time, Json>> cooling_list;
  std::vector<Json> disabled_list;
  size_t disabled_total = 0;
  for (const AccountView& a : accounts) {
    const std::string state = StateOf(a, now);
    const std::string tier = TierText(a.tier);
    ++by_state[state];
    auto& t = by_tier[tier];
    ++t["accounts"];
    ++t[state];
    in_flight += a.in_flight;
    sessions += a.bound_sessions;
    if (!a.disabled && !a.proxy_disabled) {
      ++usable;
      if (a.token_expiry && *a.token_expiry > now) ++usable_with_token;
    }
    for (const ModelQuota& q : a.quotas) {
      if (models.size() >= 4 * kMaxModels && !models.contains(q.model)) continue;
      ModelSummary& m = models[q.model];
      ++m.accounts;
      m.sum += q.remaining_fraction;
      m.min = std::min(m.min, q.remaining_fraction);
      if (q.remaining_fraction < quota.exhausted_threshold) ++m.exhausted;
      if (q.reset_time && *q.reset_time > now && (!m.soonest_reset || *q.reset_time < *m.soonest_reset)) {
        m.soonest_reset = q.reset_time;
      }
    }
    for (const CooldownView& c : a.cooldowns) {
      if (c.until <= now) continue;
      (c.model.empty() ? account_cooldowns : model_cooldowns)++;
      cooling_list.emplace_back(c.until, Json{{"account_id", a.account_id},
                                              {"model", c.model.empty() ? Json(nullptr) : Json(c.model)},
                                              {"reason", SafeText(c.reason, kMaxReasonBytes)},
                                              {"ends_in_s", SecondsUntil(c.until, now)},
                                              {"half_open", c.half_open}});
    }
    if (state == "disabled" || state == "proxy_disabled" || state == "blocked") {
      ++disabled_total;
      if (disabled_list.size() < kMaxListed) {
        disabled_list.push_back(Json{{"account_id", a.account_id}, {"tier", tier}, {"state", state},
                                     {"reason", SafeText(ReasonOf(a, state, now), kMaxReasonBytes)}});
      }
    }
    const bool state_ok = query->state == "all" || query->state == state ||
                          (query->state == "attention" && state != "enabled");
    if (state_ok && (query->tier == "all" || query->tier == tier)) selected.push_back({&a, state});
  }
  // The soonest ends first; only the first kMaxListed are sent.
  const size_t cooldown_total = cooling_list.size();
  const size_t shown = std::min(cooldown_total, kMaxListed);
  std::partial_sort(cooling_list.begin(), cooling_list.begin() + shown, cooling_list.end(),
                    [](const auto& x, const auto& y) { return x.first < y.first; });
  for (size_t i = 0; i < shown; ++i) cooldowns.push_back(std::move(cooling_list[i].second));

  std::sort(selected.begin(), selected.end(), [](const Listed& x, const Listed& y) {
    return std::make_pair(TierOrder(x.account->tier), x.account->account_id) <
           std::make_pair(TierOrder(y.account->tier), y.account->account_id);
  });
  Json page_accounts = Json::array();
  for (size_t i = query->offset; i < selected.size() && i < static_cast<size_t>(query->offset) + query->limit; ++i) {
    const AccountView& a = *selected[i].account;
    const std::string& state = selected[i].state;
    Json quotas = Json::array();
    for (const ModelQuota& q : a.quotas) {
      if (quotas.size() >= kMaxQuotasPerAccount) break;
      quotas.push_back(Json{{"model", q.model},
                            {"remaining", q.remaining_fraction},
                            {"reset_in_s", q.reset_time ? Json(SecondsUntil(*q.reset_time, now)) : Json(nullptr)},
                            {"age_s", q.observed == absl::InfinitePast() ? Json(nullptr)
                                                                          : Json(-SecondsUntil(q.observed, now))},
                            {"from_outcome", q.from_outcome}});
    }
    Json own_cooldowns = Json::array();
    for (const CooldownView& c : a.cooldowns) {
      if (c.until <= now) continue;
      own_cooldowns.push_back(Json{{"model", c.model.empty() ? Json(nullptr) : Json(c.model)},
                                   {"reason", SafeText(c.reason, kMaxReasonBytes)},
                                   {"ends_in_s", SecondsUntil(c.until, now)},
                                   {"half_open", c.half_open}});
    }
    Json protected_models = Json::array();
    for (const std::string& m : a.protected_models) {
      if (protected_models.size() >= kMaxProtectedPerAccount) break;
      protected_models.push_back(m);
    }
    Json entry = {{"account_id", a.account_id},
                  {"tier", TierText(a.tier)},
                  {"state", state},
                  {"reason", SafeText(ReasonOf(a, state, now), kMaxReasonBytes)},
                  {"in_flight", a.in_flight},
                  {"sessions", a.bound_sessions},
                  {"failure_streak", a.failure_streak},
                  {"token_expires_in_s", a.token_expiry ? Json(SecondsUntil(*a.token_expiry, now)) : Json(nullptr)},
                  {"last_used_ago_s", a.last_used ? Json(-SecondsUntil(*a.last_used, now)) : Json(nullptr)},
                  {"quota_forbidden", a.quota_forbidden},
                  {"protected_models", std::move(protected_models)},
                  {"quotas", std::move(quotas)},
                  {"cooldowns", std::move(own_cooldowns)}};
    if (options_.show_emails) entry["email"] = a.email;
    page_accounts.push_back(std::move(entry));
  }

  std::vector<std::pair<std::string, ModelSummary>> model_list(models.begin(), models.end());
  std::stable_sort(model_list.begin(), model_list.end(),
                   [](const auto& x, const auto& y) { return x.second.accounts > y.second.accounts; });
  Json model_json = Json::array();
  for (size_t i = 0; i < model_list.size() && i < kMaxModels; ++i) {
    const auto& [name, m] = model_list[i];
    model_json.push_back(Json{{"model", name},
                              {"accounts", m.accounts},
                              {"exhausted", m.exhausted},
                              {"mean_remaining", m.accounts ? m.sum / m.accounts : 0},
                              {"min_remaining", m.min},
                              {"soonest_reset_in_s", m.soonest_reset ? Json(SecondsUntil(*m.soonest_reset, now))
                                                                     : Json(nullptr)}});
  }

  const std::map<std::string, int64_t> refreshes = sources_.tokens->RefreshCounts();
  auto count = [&refreshes](const char* key) {
    auto it = refreshes.find(key);
    return it == refreshes.end() ? int64_t{0} : it->second;
  };
  // Where quota comes from: polled in this process, streamed from a monitor (--quota_monitor or
  // SetQuotaManager), or nowhere.
  const std::string monitor_target = sources_.subscriber != nullptr ? sources_.subscriber->target() : "";
  const char* source = options_.embedded_monitor                       ? "embedded"
                       : quota.enabled && !monitor_target.empty() ? "monitor"
                                                                    : "off";
  Json monitor = {{"quota_validation", quota.enabled}, {"source", source}};
  if (std::string(source) == "monitor") {
    monitor["connected"] = sources_.subscriber->connected();
    monitor["target"] = SafeText(monitor_target, 200);
  }
  Json backend = {{"kind", sources_.redis != nullptr ? "redis" : "memory"}};
  if (sources_.redis != nullptr) {
    const SharedStateStats st = sources_.redis->stats();
    backend.update(Json{{"up", st.up},
                        {"errors", st.errors},
                        {"resyncs", st.resyncs},
                        {"events_received", st.events_received},
                        {"writes", st.writes},
                        {"writes_dropped", st.writes_dropped}});
  }
  Json out = {
      {"generated_at", absl::FormatTime(absl::RFC3339_sec, now, absl::UTCTimeZone())},
      {"policy", std::string(PolicyName(sources_.pool->policy()))},
      {"emails_shown", options_.show_emails},
      {"totals",
       {{"accounts", accounts.size()},
        {"usable", usable},
        {"by_state", by_state},
        {"by_tier", by_tier},
        {"in_flight", in_flight},
        {"sessions_bound", sessions},
        {"waiting_calls", sources_.service != nullptr ? sources_.service->WaitingCalls() : 0},
        {"cooldowns", {{"account", account_cooldowns}, {"model", model_cooldowns}}}}},
      {"refresh",
       {{"ok", count("ok")},
        {"invalid_grant", count("invalid_grant")},
        {"error", count("error")},
        {"usable_with_valid_token", usable_with_token}}},
      {"monitor", std::move(monitor)},
      {"state_backend", std::move(backend)},
      {"quota_thresholds", {{"low", quota.low_threshold}, {"exhausted", quota.exhausted_threshold}}},
      {"models", std::move(model_json)},
      {"models_total", models.size()},
      {"cooldowns", std::move(cooldowns)},
      {"cooldowns_total", cooldown_total},
      {"disabled", disabled_list},
      {"disabled_total", disabled_total},
      {"page",
       {{"offset", query->offset},
        {"limit", query->limit},
        {"state", query->state},
        {"tier", query->tier},
        {"matching", selected.size()}}},
      {"accounts", std::move(page_accounts)},
  };
  // What this answer cost the broker: the page polls less often when it is large (100k accounts).
  out["build_ms"] = std::round(absl::ToDoubleMilliseconds(options_.clock->Now() - started));
  return out.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::optional<OutgoingHttpResponse> StatusPage::Handle(const IncomingHttpRequest& request) const {
  const bool page = request.path == "/status" || request.path == "/status/";
  const bool json = request.path == "/status.json";
  if (!page && !json) return std::nullopt;
  if (request.method != "GET" && request.method != "HEAD") {
    OutgoingHttpResponse r = JsonResponse(405, Json{{"error", "method: only GET and HEAD are served here"}});
    r.headers.emplace_back("Allow", "GET, HEAD");
    return r;
  }
  if (sources_.auth != nullptr && sources_.auth->enabled()) {
    // "Bearer <token>" from scripts; "Basic base64(<any user>:<token>)" from a browser's prompt.
    std::string token;
    absl::string_view value = request.authorization;
    if (absl::ConsumePrefix(&value, "Bearer ") || absl::ConsumePrefix(&value, "bearer ")) {
      token = std::string(value);
    } else if (absl::ConsumePrefix(&value, "Basic ") || absl::ConsumePrefix(&value, "basic ")) {
      std::string decoded;
      if (absl::Base64Unescape(value, &decoded)) {
        if (size_t colon = decoded.find(':'); colon != std::string::npos) token = decoded.substr(colon + 1);
      }
    }
    absl::StatusOr<std::string> who = sources_.auth->CheckToken(token, /*admin=*/true);
    if (!who.ok()) {
      OutgoingHttpResponse r = JsonResponse(who.status().code() == absl::StatusCode::kPermissionDenied ? 403 : 401,
                                    Json{{"error", absl::StrCat("authorization: ", who.status().message())}});
      if (r.status == 401) r.headers.emplace_back("WWW-Authenticate", "Basic realm=\"tokenbroker status\", charset=\"UTF-8\"");
      return r;
    }
  }
  if (page) {
    OutgoingHttpResponse r;
    r.content_type = "text/html; charset=utf-8";
    r.body = std::string(Html());
    // The page loads nothing from elsewhere: its own script and style, fetches to this origin.
    r.headers.emplace_back("Content-Security-Policy",
                           "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'");
    r.headers.emplace_back("Referrer-Policy", "no-referrer");
    return r;
  }
  absl::StatusOr<std::string> snapshot = Snapshot(request.query, options_.clock->Now());
  if (!snapshot.ok()) return JsonResponse(400, Json{{"error", std::string(snapshot.status().message())}});
  OutgoingHttpResponse r;
  r.content_type = "application/json";
  r.body = *std::move(snapshot);
  return r;
}

void StatusPage::ServeOn(int port) {
  route_ = std::make_unique<HttpRoute>(port, [this](const IncomingHttpRequest& request) { return Handle(request); });
}

}  // namespace tokenbroker
