// The status page's snapshot (server/status/status_page.*): bounded for a pool of 100,000
// accounts, no secrets, bad query parameters named. The page in a browser and its HTTP side are
// tested end to end in tests/e2e/status_page_test.py.
#include "server/status/status_page.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <map>

#include "lib/upstream/http_client.h"
#include "lib/upstream/oauth_client.h"
#include "nlohmann/json.hpp"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Json = nlohmann::json;

AccountRecord Record(int i, absl::Time now) {
  AccountRecord r;
  r.id = "acct-" + std::to_string(i);
  r.email = r.id + "@example.com";
  r.refresh_token = "1//refresh-secret-" + std::to_string(i);
  r.access_token = "ya29.access-secret-" + std::to_string(i);
  r.access_expiry = now + absl::Hours(1);
  r.project_id = "proj-" + std::to_string(i);
  r.tier = i % 10 == 0 ? Tier::kUltra : i % 3 == 0 ? Tier::kPro : Tier::kFree;
  if (i % 50 == 7) {
    r.disabled = true;
    r.disabled_reason = "invalid_grant: revoked (ya29.leaked-in-a-reason-123456)";
  }
  for (const char* model : {"claude-sonnet-4-6-thinking", "gemini-3-pro-high"}) {
    r.quotas.push_back(ModelQuota{.model = model, .remaining_fraction = (i % 100) / 100.0,
                                  .reset_time = now + absl::Hours(2), .observed = now});
  }
  return r;
}

class StatusPageTest : public ::testing::Test {
 protected:
  void Load(int n) {
    const absl::Time now = absl::Now();
    std::vector<AccountRecord> records;
    records.reserve(n);
    for (int i = 0; i < n; ++i) records.push_back(Record(i, now));
    pool_.Load(std::move(records));
    QuotaSettings q;
    q.enabled = true;
    pool_.SetQuotaSettings(q);
  }
  void Cool(int i) {
    Outcome o;
    o.account_id = "acct-" + std::to_string(i);
    o.model = "gemini-3-pro-high";
    o.http_status = 429;
    o.retry_after = std::to_string(60 + i % 600);
    ASSERT_TRUE(pool_.ReportOutcome(o).ok());
  }
  Json Snapshot(const StatusPage& page, const std::string& query) {
    absl::StatusOr<std::string> s = page.Snapshot(query, absl::Now());
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? Json::parse(*s) : Json();
  }
  StatusSources Sources() { return StatusSources{&pool_, &tokens_, nullptr, &service_, nullptr, nullptr}; }

  AccountPool pool_{PoolOptions(), Clock::Real()};
  HttpClient http_;
  OAuthClient oauth_{OAuthOptions{.token_url = "http://127.0.0.1:1/token"}, http_};
  TokenManager tokens_{TokenManagerOptions{.background_refresh = false}, pool_, oauth_, nullptr, Clock::Real()};
  BrokerService service_{pool_, tokens_, nullptr};
};

TEST_F(StatusPageTest, AHundredThousandAccountsGiveABoundedAnswer) {
  Load(100'000);
  for (int i = 0; i < 5'000; ++i) Cool(i * 20 + 1);
  StatusPage page(Sources(), StatusPageOptions{});
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::string> biggest = page.Snapshot("limit=500", absl::Now());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(biggest.ok()) << biggest.status();
  std::printf("status.json at 100k accounts, limit=500: %zu bytes in %.0f ms\n", biggest->size(), ms);
  EXPECT_LT(biggest->size(), 600'000u);
  const Json s = Json::parse(*biggest);
  EXPECT_EQ(s["totals"]["accounts"], 100'000);
  EXPECT_EQ(s["accounts"].size(), 500u);
  EXPECT_EQ(s["cooldowns"].size(), StatusPage::kMaxListed);
  EXPECT_EQ(s["cooldowns_total"], 5'000);
  EXPECT_EQ(s["totals"]["cooldowns"]["model"], 5'000);
  EXPECT_EQ(s["disabled"].size(), StatusPage::kMaxListed);
  EXPECT_EQ(s["disabled_total"], 2'000);
  EXPECT_EQ(s["totals"]["by_state"]["disabled"], 2'000);
  EXPECT_EQ(s["page"]["matching"], 100'000);
  // The soonest cooldown first.
  for (size_t i = 1; i < s["cooldowns"].size(); ++i) {
    EXPECT_LE(s["cooldowns"][i - 1]["ends_in_s"].get<double>(), s["cooldowns"][i]["ends_in_s"].get<double>());
  }
  // The page's own poll (limit 100) is smaller still; the last page holds what is left.
  EXPECT_LT(page.Snapshot("", absl::Now())->size(), 150'000u);
  EXPECT_EQ(Snapshot(page, "offset=99990&limit=500")["accounts"].size(), 10u);
  // Tier order: ULTRA first.
  EXPECT_EQ(Snapshot(page, "limit=1")["accounts"][0]["tier"], "ULTRA");
  EXPECT_EQ(Snapshot(page, "tier=free&limit=1")["accounts"][0]["tier"], "FREE");
}

TEST_F(StatusPageTest, NoSecretsAndEmailsOnlyWhenAsked) {
  Load(60);
  Cool(3);
  StatusPage hidden(Sources(), StatusPageOptions{});
  const std::string text = *hidden.Snapshot("limit=500", absl::Now());
  EXPECT_THAT(text, Not(HasSubstr("refresh-secret")));
  EXPECT_THAT(text, Not(HasSubstr("access-secret")));
  EXPECT_THAT(text, Not(HasSubstr("leaked-in-a-reason")));
  EXPECT_THAT(text, Not(HasSubstr("@example.com")));
  EXPECT_THAT(text, HasSubstr("invalid_grant: revoked (ya29.<redacted>)"));
  StatusPage shown(Sources(), StatusPageOptions{.show_emails = true});
  const Json s = Snapshot(shown, "limit=500");
  EXPECT_EQ(s["accounts"][0]["email"], s["accounts"][0]["account_id"].get<std::string>() + "@example.com");
  EXPECT_TRUE(s["emails_shown"]);
}

TEST_F(StatusPageTest, StatesAndReasons) {
  const absl::Time now = absl::Now();
  std::vector<AccountRecord> records;
  for (int i = 0; i < 4; ++i) records.push_back(Record(i + 1, now));  // acct-1 .. acct-4, none disabled
  records[1].proxy_disabled = true;                                  // acct-2
  records[3].disabled = true;                                        // acct-4
  records[3].disabled_reason = "invalid_grant";
  pool_.Load(std::move(records));
  Outcome o;
  o.account_id = "acct-3";
  o.model = "gemini-3-pro-high";
  o.http_status = 403;
  o.error_body = R"({"error":{"code":403,"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo",)"
                 R"("reason":"VALIDATION_REQUIRED","metadata":{"validation_url":"https://accounts.google.com/v/9"}}]}})";
  ASSERT_TRUE(pool_.ReportOutcome(o).ok());
  StatusPage page(Sources(), StatusPageOptions{});
  auto states = [&](absl::Time at) {
    std::map<std::string, std::pair<std::string, std::string>> out;
    const Json s = Json::parse(*page.Snapshot("limit=500", at));
    for (const Json& a : s["accounts"]) out[a["account_id"]] = {a["state"], a["reason"]};
    return out;
  };
  auto at_once = states(absl::Now());
  EXPECT_EQ(at_once["acct-1"].first, "enabled");
  EXPECT_EQ(at_once["acct-2"].first, "proxy_disabled");
  EXPECT_EQ(at_once["acct-3"].first, "blocked");
  EXPECT_THAT(at_once["acct-3"].second, HasSubstr("VALIDATION_REQUIRED"));
  EXPECT_THAT(at_once["acct-3"].second, HasSubstr("https://accounts.google.com/v/9"));
  EXPECT_EQ(at_once["acct-4"], std::make_pair(std::string("disabled"), std::string("invalid_grant")));
  const Json attention = Json::parse(*page.Snapshot("state=attention", absl::Now()));
  EXPECT_EQ(attention["page"]["matching"], 3);
  EXPECT_EQ(attention["disabled_total"], 3);
  // Once the block (--validation_block, 1h) has run out, the next request probes the account.
  EXPECT_EQ(states(absl::Now() + absl::Hours(2))["acct-3"].first, "enabled");
}

TEST_F(StatusPageTest, BadParametersAreNamed) {
  Load(3);
  StatusPage page(Sources(), StatusPageOptions{});
  for (const auto& [query, field] : std::vector<std::pair<std::string, std::string>>{
           {"limit=0", "limit"}, {"limit=501", "limit"}, {"limit=ten", "limit"}, {"offset=-2", "offset"},
           {"state=asleep", "state"}, {"tier=gold", "tier"}, {"session=abc", "session"}}) {
    absl::StatusOr<std::string> s = page.Snapshot(query, absl::Now());
    ASSERT_FALSE(s.ok()) << query;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.status().message(), HasSubstr(field)) << query;
  }
  // A huge parameter name comes back bounded.
  absl::StatusOr<std::string> s = page.Snapshot(std::string(10'000, 'x') + "=1", absl::Now());
  ASSERT_FALSE(s.ok());
  EXPECT_LT(s.status().message().size(), 200u);
}

TEST_F(StatusPageTest, RequestsNeedTheAdminTokenWhenAdminAuthIsOn) {
  Load(2);
  Authenticator auth(AuthConfig{.callers = {{"proxy", "caller-token-0123456789"}},
                                .admin_token = "admin-token-0123456789abcdef"});
  StatusSources sources = Sources();
  sources.auth = &auth;
  StatusPage page(sources, StatusPageOptions{});
  auto get = [&page](const std::string& path, const std::string& authorization) {
    return page.Handle(IncomingHttpRequest{.method = "GET", .path = path, .authorization = authorization});
  };
  EXPECT_EQ(get("/status.json", "")->status, 401);
  EXPECT_EQ(get("/status", "")->status, 401);
  EXPECT_THAT(get("/status", "")->headers, ::testing::Contains(::testing::Pair("WWW-Authenticate", HasSubstr("Basic"))));
  EXPECT_EQ(get("/status.json", "Bearer caller-token-0123456789")->status, 403);
  EXPECT_EQ(get("/status.json", "Bearer admin-token-0123456789abcdef")->status, 200);
  // "anyone:admin-token-0123456789abcdef"
  EXPECT_EQ(get("/status.json", "Basic YW55b25lOmFkbWluLXRva2VuLTAxMjM0NTY3ODlhYmNkZWY=")->status, 200);
  EXPECT_FALSE(get("/metrics", "").has_value());
  EXPECT_EQ(page.Handle(IncomingHttpRequest{.method = "POST", .path = "/status.json",
                                            .authorization = "Bearer admin-token-0123456789abcdef"})->status, 405);
}

}  // namespace
}  // namespace tokenbroker
