#include "lib/upstream/oauth_client.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/fakes/fake_upstream.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::FakeUpstream;
using testing::ScriptedReply;

TEST(ParseTokenResponse, Success) {
  auto g = ParseTokenResponse(200, R"({"access_token":"ya29.a0Af","expires_in":3599,"token_type":"Bearer","scope":"x","id_token":"eyJ"})");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->access_token, "ya29.a0Af");
  EXPECT_EQ(g->expires_in, absl::Seconds(3599));
  EXPECT_FALSE(g->refresh_token.has_value());
}

TEST(ParseTokenResponse, RotatedRefreshToken) {
  auto g = ParseTokenResponse(200, R"({"access_token":"ya29.b","expires_in":10,"refresh_token":"1//new"})");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->refresh_token, "1//new");
}

TEST(ParseTokenResponse, ErrorsByKind) {
  auto invalid_grant =
      ParseTokenResponse(400, R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})");
  EXPECT_TRUE(IsInvalidGrant(invalid_grant.status()));
  EXPECT_THAT(invalid_grant.status().message(), HasSubstr("Token has been expired or revoked."));

  auto client = ParseTokenResponse(401, R"({"error":"invalid_client","error_description":"The OAuth client was not found."})");
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(client.status().message(), HasSubstr("--oauth_client_id"));
  EXPECT_FALSE(IsInvalidGrant(client.status()));

  EXPECT_EQ(ParseTokenResponse(503, "<html>oops</html>").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ParseTokenResponse(429, "{}").status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(ParseTokenResponse(404, "{}").status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(ParseTokenResponse(200, "not json").status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(ParseTokenResponse(200, R"({"expires_in":1})").status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(ParseTokenResponse(200, R"({"access_token":"x"})").status().code(), absl::StatusCode::kInternal);
}

// Issue 11 item 11: an expires_in the broker cannot use is a failed refresh, never a token that
// expires at once (0), in the past (negative), or at an undefined time (1e300).
TEST(ParseTokenResponse, UnusableExpiresInIsAnError) {
  for (const char* expires_in : {"0", "-1", "0.5", "1e300", "-1e300", "86401", "\"3599\"", "null"}) {
    absl::StatusOr<TokenGrant> g =
        ParseTokenResponse(200, absl::StrCat(R"({"access_token":"ya29.x","expires_in":)", expires_in, "}"));
    EXPECT_EQ(g.status().code(), absl::StatusCode::kInternal) << expires_in;
    EXPECT_FALSE(absl::StrContains(g.status().message(), "ya29")) << expires_in;
  }
  EXPECT_EQ(ParseTokenResponse(200, R"({"access_token":"ya29.x","expires_in":120})")->expires_in, absl::Seconds(120));
  EXPECT_EQ(ParseTokenResponse(200, R"({"access_token":"ya29.x","expires_in":3599.9})")->expires_in, absl::Seconds(3599));
}

TEST(ParseTokenResponse, NeverEchoesTheBody) {
  auto g = ParseTokenResponse(500, R"({"access_token":"ya29.leak","error":"server_error"})");
  EXPECT_THAT(g.status().message(), Not(HasSubstr("ya29.leak")));
}

struct Fixture {
  std::unique_ptr<FakeUpstream> upstream;
  HttpClient http;
  std::unique_ptr<OAuthClient> client;

  explicit Fixture(absl::Duration timeout = absl::Seconds(5)) {
    auto up = FakeUpstream::Start({});
    EXPECT_TRUE(up.ok()) << up.status();
    upstream = *std::move(up);
    OAuthOptions o;
    o.token_url = upstream->token_url();
    o.client_id = "client";
    o.client_secret = "secret";
    o.timeout = timeout;
    o.max_attempts = 3;
    o.initial_backoff = absl::Milliseconds(1);
    o.max_backoff = absl::Milliseconds(5);
    client = std::make_unique<OAuthClient>(o, http);
  }
};

TEST(OAuthClient, RefreshesAgainstTheTokenEndpoint) {
  Fixture f;
  auto g = f.client->Refresh("1//rt a&b");  // form-encoding matters
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_THAT(g->access_token, HasSubstr("ya29.fake-"));
  EXPECT_EQ(g->expires_in, absl::Seconds(3599));
  EXPECT_EQ(f.upstream->TokenCallsFor("1//rt a&b"), 1);
}

TEST(OAuthClient, RetriesServerErrorsThenSucceeds) {
  Fixture f;
  f.upstream->Script("/token", ScriptedReply{.status = 503, .body = "{}", .times = 2});
  auto g = f.client->Refresh("rt");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(f.upstream->TokenCallsFor("rt"), 3);
}

TEST(OAuthClient, GivesUpAfterMaxAttempts) {
  Fixture f;
  f.upstream->Script("/token", ScriptedReply{.status = 500, .body = "{}", .times = 0});
  auto g = f.client->Refresh("rt");
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(g.status().message(), HasSubstr("after 3 attempts"));
  EXPECT_EQ(f.upstream->TokenCallsFor("rt"), 3);
}

TEST(OAuthClient, RetriesTimeouts) {
  Fixture f(absl::Milliseconds(200));
  f.upstream->Script("/token", ScriptedReply{.status = 200, .body = "{}", .delay = absl::Seconds(1), .times = 1});
  auto g = f.client->Refresh("rt");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(f.upstream->TokenCallsFor("rt"), 2);
}

TEST(OAuthClient, InvalidGrantIsNotRetried) {
  Fixture f;
  f.upstream->Script("/token", ScriptedReply{
                                   .status = 400,
                                   .body = R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})",
                                   .times = 0,
                                   .match = "revoked"});
  auto g = f.client->Refresh("revoked");
  EXPECT_TRUE(IsInvalidGrant(g.status())) << g.status();
  EXPECT_EQ(f.upstream->TokenCallsFor("revoked"), 1);
  // Other accounts are unaffected by the scripted failure.
  EXPECT_TRUE(f.client->Refresh("fine").ok());
}

TEST(OAuthClient, ConnectionRefusedIsUnavailable) {
  HttpClient http;
  OAuthOptions o;
  o.token_url = "http://127.0.0.1:1/token";
  o.max_attempts = 2;
  o.initial_backoff = absl::Milliseconds(1);
  OAuthClient client(o, http);
  auto g = client.Refresh("rt");
  EXPECT_EQ(g.status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace tokenbroker

namespace tokenbroker {
namespace {

// The fake's Cloud Code endpoints answer for the account behind the bearer token, in the shapes
// of ../shared/reference/upstream-formats.md.
TEST(FakeUpstreamCloudCode, AnswersForTheAccountBehindTheToken) {
  auto up = testing::FakeUpstream::Start({});
  ASSERT_TRUE(up.ok());
  (*up)->SetProfile("rt-ultra", testing::AccountProfile{
                                    .project = "vivid-river-a1b2c",
                                    .tier_id = "g1-ultra-tier",
                                    .models_json = R"({"gemini-3-pro-high":{"quotaInfo":{"remainingFraction":0.62}}})"});
  HttpClient http;
  OAuthOptions o;
  o.token_url = (*up)->token_url();
  OAuthClient oauth(o, http);
  auto grant = oauth.Refresh("rt-ultra");
  ASSERT_TRUE(grant.ok());
  HttpRequest req;
  req.url = (*up)->base_url() + "/v1internal:loadCodeAssist";
  req.body = R"({"metadata":{"ideType":"ANTIGRAVITY"}})";
  req.headers = {{"Authorization", "Bearer " + grant->access_token}};
  auto resp = http.Post(req);
  ASSERT_TRUE(resp.ok());
  EXPECT_EQ(resp->status, 200);
  EXPECT_THAT(resp->body, HasSubstr(R"("cloudaicompanionProject":"vivid-river-a1b2c")"));
  EXPECT_THAT(resp->body, HasSubstr(R"("paidTier":{"id":"g1-ultra-tier")"));
  req.url = (*up)->base_url() + "/v1internal:fetchAvailableModels";
  resp = http.Post(req);
  ASSERT_TRUE(resp.ok());
  EXPECT_THAT(resp->body, HasSubstr(R"("remainingFraction":0.62)"));
  req.headers = {{"Authorization", "Bearer not-issued"}};
  resp = http.Post(req);
  ASSERT_TRUE(resp.ok());
  EXPECT_EQ(resp->status, 401);
  EXPECT_EQ((*up)->Calls("/v1internal:fetchAvailableModels"), 2);
}

}  // namespace
}  // namespace tokenbroker
