#include "lib/common/upstream_error.h"

#include "absl/strings/str_cat.h"
#include "lib/common/safe_text.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

const absl::Time kNow = absl::FromUnixSeconds(1795914000);  // 2026-11-29T01:00:00Z

constexpr char kQuotaExhausted[] = R"({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
  "message": "You have exhausted your capacity on this model. Your quota will reset after 2h1m1s.",
  "details": [
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "QUOTA_EXHAUSTED",
     "domain": "cloudcode-pa.googleapis.com",
     "metadata": {"model": "claude-sonnet-4-6-thinking", "quotaResetDelay": "2h1m1.5s",
                  "quotaResetTimeStamp": "2026-11-29T01:12:30Z"}},
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7261.5s"}]}})";

constexpr char kPerMinute[] = R"({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Resource has been exhausted (e.g. check quota).",
  "details": [
    {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
     "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                     "quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}]}})";

TEST(ParseUpstreamDuration, Forms) {
  struct Case {
    const char* text;
    absl::Duration want;
  } cases[] = {
      {"3.5s", absl::Milliseconds(3500)},
      {"510.79ms", absl::Microseconds(510790)},
      {"1h16m0.667s", absl::Hours(1) + absl::Minutes(16) + absl::Milliseconds(667)},
      {"2h1m1s", absl::Hours(2) + absl::Minutes(1) + absl::Seconds(1)},
      {"7261.5s", absl::Milliseconds(7261500)},
      {"34", absl::Seconds(34)},
      {"\"34s\"", absl::Seconds(34)},
      {"30 seconds", absl::Seconds(30)},
      {"1 minute", absl::Minutes(1)},
      {"1m30s", absl::Seconds(90)},
      {"2 hours 5 minutes", absl::Hours(2) + absl::Minutes(5)},
  };
  for (const Case& c : cases) {
    std::optional<absl::Duration> d = ParseUpstreamDuration(c.text);
    ASSERT_TRUE(d.has_value()) << c.text;
    EXPECT_EQ(*d, c.want) << c.text;
  }
  for (const char* bad : {"", "s", "-3s", "+3s", "abc", "3x", "1e9", "inf", "nan", "3.5.5s", ".", "3..s"}) {
    EXPECT_FALSE(ParseUpstreamDuration(bad).has_value()) << bad;
  }
}

TEST(ParseUpstreamError, QuotaExhaustedWithResetDelay) {
  UpstreamError e = ParseUpstreamError(429, "", kQuotaExhausted, kNow);
  EXPECT_EQ(e.kind, FailureKind::kQuotaExhausted);
  EXPECT_EQ(e.reason, "QUOTA_EXHAUSTED");
  EXPECT_EQ(e.model, "claude-sonnet-4-6-thinking");
  ASSERT_TRUE(e.delay.has_value());
  // quotaResetDelay and RetryInfo agree on 2h1m1.5s; the longest form wins.
  EXPECT_EQ(*e.delay, absl::Hours(2) + absl::Minutes(1) + absl::Milliseconds(1500));
  EXPECT_FALSE(e.delay_clamped);
  EXPECT_THAT(e.Summary(), HasSubstr("QUOTA_EXHAUSTED"));
  EXPECT_THAT(e.Summary(), HasSubstr("2h1m1.5s"));
}

TEST(ParseUpstreamError, PerMinuteRateLimit) {
  UpstreamError e = ParseUpstreamError(429, "", kPerMinute, kNow);
  EXPECT_EQ(e.kind, FailureKind::kRateLimited);
  EXPECT_EQ(e.quota_id, "GenerateRequestsPerMinutePerProjectPerModel");
  EXPECT_EQ(e.delay, absl::Seconds(34));
  EXPECT_EQ(e.delay_source, "RetryInfo");
}

TEST(ParseUpstreamError, PerDayQuotaIsQuotaExhausted) {
  UpstreamError e = ParseUpstreamError(429, "", R"({"error":{"code":429,"message":"Quota exceeded.","details":[
    {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}})",
                                       kNow);
  EXPECT_EQ(e.kind, FailureKind::kQuotaExhausted);
  EXPECT_FALSE(e.delay.has_value());
}

TEST(ParseUpstreamError, RetryDelayAsSecondsNanosObject) {
  UpstreamError e = ParseUpstreamError(429, "", R"({"error":{"code":429,"details":[
    {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":{"seconds":34,"nanos":500000000}}]}})",
                                       kNow);
  EXPECT_EQ(e.delay, absl::Milliseconds(34500));
}

TEST(ParseUpstreamError, MillisecondResetDelay) {
  UpstreamError e = ParseUpstreamError(429, "", R"({"error":{"code":429,"details":[
    {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","metadata":{"quotaResetDelay":"510.79ms"}}]}})",
                                       kNow);
  EXPECT_EQ(e.kind, FailureKind::kRateLimited);
  EXPECT_EQ(e.delay, absl::Microseconds(510790));
}

TEST(ParseUpstreamError, RetryAfterHeaderSecondsAndDate) {
  EXPECT_EQ(ParseUpstreamError(429, "120", "", kNow).delay, absl::Seconds(120));
  UpstreamError e = ParseUpstreamError(503, "Sun, 29 Nov 2026 01:05:00 GMT", "", kNow);
  EXPECT_EQ(e.kind, FailureKind::kServerError);
  EXPECT_EQ(e.delay, absl::Minutes(5));
  EXPECT_EQ(e.delay_source, "Retry-After");
}

// Issue 11 item 14: a date that has gone by names no delay (so the streak's backoff applies), and
// the reason says why.
TEST(ParseUpstreamError, PastRetryAfterDateNamesNoDelayAndSaysSo) {
  UpstreamError e = ParseUpstreamError(429, "Sun, 29 Nov 2026 00:00:00 GMT", "", kNow);
  EXPECT_FALSE(e.delay.has_value());
  EXPECT_THAT(e.Summary(), HasSubstr("Retry-After date is in the past"));
  UpstreamError stamp = ParseUpstreamError(429, "", R"({"error":{"code":429,"details":[
      {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED",
       "metadata":{"quotaResetTimeStamp":"2020-01-01T00:00:00Z"}}]}})", kNow);
  EXPECT_FALSE(stamp.delay.has_value());
}

// Issue 11 item 1: only an OAuth-shaped {"error":"invalid_grant"} answered 400/401 reads as
// invalid_grant; the word anywhere else in a body means nothing.
TEST(ParseUpstreamError, InvalidGrantOnlyFromAnOAuthShapedAnswer) {
  EXPECT_EQ(ParseUpstreamError(400, "", R"({"error":{"code":400,"message":"Invalid JSON payload received. Unknown name \"invalid_grant\" at 'request': Cannot find field.","status":"INVALID_ARGUMENT"}})", kNow).kind,
            FailureKind::kClientError);
  EXPECT_EQ(ParseUpstreamError(400, "", "invalid_grant", kNow).kind, FailureKind::kClientError);
  EXPECT_EQ(ParseUpstreamError(429, "", R"({"error":"invalid_grant"})", kNow).kind, FailureKind::kRateLimited);
  EXPECT_EQ(ParseUpstreamError(500, "", R"({"error":"invalid_grant"})", kNow).kind, FailureKind::kServerError);
  EXPECT_EQ(ParseUpstreamError(400, "", R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})", kNow).kind,
            FailureKind::kInvalidGrant);
}

// Issue 11 item 8: text from the body is escaped, redacted and bounded before anyone sees it.
TEST(ParseUpstreamError, UpstreamTextIsEscapedRedactedAndBounded) {
  UpstreamError e = ParseUpstreamError(403, "", R"({"error":{"code":403,"message":"x","details":[
      {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"VALIDATION_REQUIRED\n2026-11-29T00:00:00.000 info forged ya29.a0AfSECRET",
       "metadata":{"validation_url":"https://accounts.google.com/v?x=1\r\nya29.a0AfLEAK"}}]}})", kNow);
  for (const std::string& s : {e.reason, e.validation_url, e.Summary()}) {
    EXPECT_EQ(s.find('\n'), std::string::npos) << s;
    EXPECT_EQ(s.find('\r'), std::string::npos) << s;
    EXPECT_THAT(s, Not(HasSubstr("SECRET")));
    EXPECT_THAT(s, Not(HasSubstr("LEAK")));
  }
  EXPECT_THAT(e.reason, HasSubstr("\\n2026-11-29"));
  EXPECT_THAT(e.reason, HasSubstr("ya29.<redacted>"));
  UpstreamError long_reason = ParseUpstreamError(429, "", absl::StrCat(R"({"error":{"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":")",
                                                                       std::string(100000, 'R'), R"("}]}})"), kNow);
  EXPECT_LE(long_reason.reason.size(), kMaxUpstreamField + 3);
}

TEST(SafeText, EscapesControlCharactersAndRedactsTokens) {
  EXPECT_EQ(SafeText("plain text, 100% ok"), "plain text, 100% ok");
  EXPECT_EQ(SafeText("a\nb\rc\td\x01" "e\x7f"), "a\\nb\\rc\\td\\x01e\\x7f");
  EXPECT_EQ(SafeText("token ya29.a0Af-x_y.z/+= end"), "token ya29.<redacted> end");
  EXPECT_EQ(SafeText("refresh 1//0gABCDEFGHIJKL rest"), "refresh 1//<redacted> rest");
  EXPECT_EQ(SafeText("ratio 1//2"), "ratio 1//2");  // too short to be a token
  EXPECT_EQ(SafeText("YA29.abc"), "YA29.<redacted>");
  EXPECT_EQ(SafeText(std::string(20, 'x'), 8), "xxxxxxxx...");
  EXPECT_EQ(RedactTokens("a\nya29.zzz"), "a\nya29.<redacted>");
  EXPECT_TRUE(NeedsSafeText("x\ny"));
  EXPECT_TRUE(NeedsSafeText("x ya29.abc"));
  EXPECT_FALSE(NeedsSafeText("quota exhausted (QUOTA_EXHAUSTED)"));
}

TEST(ParseUpstreamError, TextForms) {
  struct Case {
    const char* body;
    absl::Duration want;
  } cases[] = {
      {"Your quota will reset after 2h1m1s.", absl::Hours(2) + absl::Minutes(1) + absl::Seconds(1)},
      {"Rate limited, retry after 30 seconds", absl::Seconds(30)},
      {"Too many requests; try again in 1m30s.", absl::Seconds(90)},
      {"Please wait 12s before retrying", absl::Seconds(12)},
      {R"({"error":{"code":429,"message":"Please wait 12s"}})", absl::Seconds(12)},
  };
  for (const Case& c : cases) {
    UpstreamError e = ParseUpstreamError(429, "", c.body, kNow);
    EXPECT_EQ(e.delay, c.want) << c.body;
    EXPECT_EQ(e.delay_source, "message") << c.body;
  }
}

TEST(ParseUpstreamError, ModelCapacityIsNotTheAccountsFault) {
  UpstreamError e = ParseUpstreamError(503, "", R"({"error":{"code":503,"status":"UNAVAILABLE","message":"No capacity available for model gemini-3-pro-high on the server",
    "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"MODEL_CAPACITY_EXHAUSTED","metadata":{"model":"gemini-3-pro-high"}}]}})",
                                       kNow);
  EXPECT_EQ(e.kind, FailureKind::kCapacityExhausted);
  EXPECT_FALSE(e.delay.has_value());
}

TEST(ParseUpstreamError, ValidationRequiredCarriesItsUrl) {
  UpstreamError e = ParseUpstreamError(403, "", R"({"error":{"code":403,"status":"PERMISSION_DENIED",
    "message":"To continue, verify your account at https://accounts.google.com/signin/continue?x=1.",
    "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"VALIDATION_REQUIRED",
                "metadata":{"validation_url":"https://accounts.google.com/signin/continue?x=1"}}]}})",
                                       kNow);
  EXPECT_EQ(e.kind, FailureKind::kValidationRequired);
  EXPECT_EQ(e.validation_url, "https://accounts.google.com/signin/continue?x=1");
  UpstreamError text_only = ParseUpstreamError(403, "", "Please verify your account: https://accounts.google.com/v?id=2", kNow);
  EXPECT_EQ(text_only.kind, FailureKind::kValidationRequired);
  EXPECT_EQ(text_only.validation_url, "https://accounts.google.com/v?id=2");
}

TEST(ParseUpstreamError, StatusClasses) {
  EXPECT_EQ(ParseUpstreamError(200, "", "", kNow).kind, FailureKind::kSuccess);
  EXPECT_EQ(ParseUpstreamError(401, "", R"({"error":{"code":401,"status":"UNAUTHENTICATED"}})", kNow).kind,
            FailureKind::kUnauthorized);
  EXPECT_EQ(ParseUpstreamError(403, "", R"({"error":{"code":403,"message":"The caller does not have permission"}})", kNow).kind,
            FailureKind::kForbidden);
  EXPECT_EQ(ParseUpstreamError(429, "", "", kNow).kind, FailureKind::kRateLimited);
  EXPECT_EQ(ParseUpstreamError(500, "", "oops", kNow).kind, FailureKind::kServerError);
  EXPECT_EQ(ParseUpstreamError(400, "", R"({"error":{"code":400,"message":"Invalid JSON payload"}})", kNow).kind,
            FailureKind::kClientError);
  EXPECT_EQ(ParseUpstreamError(400, "", R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})", kNow).kind,
            FailureKind::kInvalidGrant);
}

TEST(ParseUpstreamError, ArrayWrappedError) {
  UpstreamError e = ParseUpstreamError(429, "", std::string("[") + kPerMinute + "]", kNow);
  EXPECT_EQ(e.delay, absl::Seconds(34));
}

TEST(ParseUpstreamError, AbsurdAndNegativeDelaysAreClampedAndSaid) {
  UpstreamError huge = ParseUpstreamError(429, "", R"({"error":{"details":[
    {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"99999999999s"}]}})", kNow);
  EXPECT_EQ(huge.delay, kMaxUpstreamDelay);
  EXPECT_TRUE(huge.delay_clamped);
  EXPECT_THAT(huge.Summary(), HasSubstr("clamped"));
  UpstreamError negative = ParseUpstreamError(429, "", R"({"error":{"details":[
    {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":{"seconds":-30}}]}})", kNow);
  EXPECT_EQ(negative.delay, absl::ZeroDuration());
  EXPECT_TRUE(negative.delay_clamped);
  EXPECT_EQ(ParseUpstreamError(429, "-5", "", kNow).delay, absl::ZeroDuration());
  EXPECT_TRUE(ParseUpstreamError(429, "-5", "", kNow).delay_clamped);
}

TEST(ParseUpstreamError, GarbageNeverCrashes) {
  for (const char* body : {"", "{", "[]", "[1]", "null", "{\"error\":null}", "{\"error\":{\"details\":5}}",
                           "{\"error\":{\"details\":[null,1,\"x\",{\"@type\":5}]}}",
                           "{\"error\":{\"details\":[{\"@type\":\"google.rpc.RetryInfo\",\"retryDelay\":[1]}]}}",
                           "retry after", "try again in soon", "\xff\xfe"}) {
    UpstreamError e = ParseUpstreamError(429, "garbage", body, kNow);
    EXPECT_EQ(e.kind, FailureKind::kRateLimited) << body;
    if (e.delay) {
      EXPECT_GE(*e.delay, absl::ZeroDuration()) << body;
    }
  }
}

TEST(ParseUpstreamError, InsufficientCreditsIsCreditsExhaustedNotACooldown) {
  const absl::Time now = absl::FromUnixSeconds(1'800'000'000);
  const std::string body = R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"Insufficient credits.",
    "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"INSUFFICIENT_G1_CREDITS_BALANCE",
                "domain":"cloudcode-pa.googleapis.com","metadata":{"quotaResetDelay":"3h"}}]}})";
  for (int status : {429, 403}) {
    UpstreamError e = ParseUpstreamError(status, "", body, now);
    EXPECT_TRUE(e.credits_exhausted) << status;
    EXPECT_EQ(e.kind, FailureKind::kClientError) << status;  // the account is fine for normal use
    ASSERT_TRUE(e.delay.has_value());
    EXPECT_EQ(*e.delay, absl::Hours(3));
    EXPECT_THAT(e.Summary(), ::testing::HasSubstr("AI credits exhausted"));
  }
  // The reason in a later ErrorInfo, and in the message only, count too.
  UpstreamError second = ParseUpstreamError(
      403, "",
      R"({"error":{"code":403,"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"OTHER"},
          {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"INSUFFICIENT_G1_CREDITS_BALANCE"}]}})",
      now);
  EXPECT_TRUE(second.credits_exhausted);
  EXPECT_FALSE(second.delay.has_value());
  EXPECT_TRUE(ParseUpstreamError(429, "", "INSUFFICIENT_G1_CREDITS_BALANCE", now).credits_exhausted);
  // Other statuses, and ordinary quota answers, are not about credits.
  EXPECT_FALSE(ParseUpstreamError(400, "", body, now).credits_exhausted);
  EXPECT_FALSE(ParseUpstreamError(200, "", body, now).credits_exhausted);
  UpstreamError quota = ParseUpstreamError(
      429, "",
      R"({"error":{"code":429,"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED"}]}})",
      now);
  EXPECT_FALSE(quota.credits_exhausted);
  EXPECT_EQ(quota.kind, FailureKind::kQuotaExhausted);
}

}  // namespace
}  // namespace tokenbroker

namespace tokenbroker {
namespace {

// Issue 13: the 2026 bodies (shapes in ../shared/reference/upstream-formats.md).
TEST(ParseUpstreamError, TermsOfServiceSuspension) {
  UpstreamError e = ParseUpstreamError(403, "", R"({"error":{"code":403,"status":"PERMISSION_DENIED",
    "message":"This service has been disabled in this account for violation of Terms of Service. Contact support."}})",
                                       kNow);
  EXPECT_EQ(e.kind, FailureKind::kSuspended);
  EXPECT_EQ(e.message, "This service has been disabled in this account for violation of Terms of Service. Contact support.");
  EXPECT_EQ(e.Summary(), "suspended (Terms of Service)");
  // Plain text, and a token in the text is never kept.
  UpstreamError text = ParseUpstreamError(403, "", "violation of Terms of Service ya29.a0AfB_secretsecretsecret", kNow);
  EXPECT_EQ(text.kind, FailureKind::kSuspended);
  EXPECT_EQ(text.message.find("ya29.a0AfB_secret"), std::string::npos);
  // Another 403 stays a plain forbidden; a 429 that mentions the terms is not a suspension.
  EXPECT_EQ(ParseUpstreamError(403, "", R"({"error":{"code":403,"message":"Permission denied on project"}})", kNow).kind,
            FailureKind::kForbidden);
  EXPECT_EQ(ParseUpstreamError(429, "", "terms of service", kNow).kind, FailureKind::kRateLimited);
}

TEST(ParseUpstreamError, FamilyWideWeeklyLimit) {
  UpstreamError e = ParseUpstreamError(429, "", R"({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
  "message": "Individual quota reached for claude models. Resets in 108h48m29s.",
  "details": [
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "QUOTA_EXHAUSTED",
     "domain": "cloudcode-pa.googleapis.com",
     "metadata": {"model": "claude-sonnet-4-6", "quotaResetDelay": "108h48m29s",
                  "quotaResetTimeStamp": "2026-12-06T06:00:00Z", "uiMessage": "true"}},
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "391709s"}]}})",
                                       kNow);
  EXPECT_EQ(e.kind, FailureKind::kQuotaExhausted);
  EXPECT_TRUE(e.family_wide);
  EXPECT_EQ(e.model, "claude-sonnet-4-6");
  ASSERT_TRUE(e.delay.has_value());
  EXPECT_GE(*e.delay, absl::Hours(108));
  // The message alone names both the family limit and the delay.
  UpstreamError text = ParseUpstreamError(429, "", "Individual quota reached for claude models. Resets in 2h1m.", kNow);
  EXPECT_EQ(text.kind, FailureKind::kQuotaExhausted);
  EXPECT_TRUE(text.family_wide);
  ASSERT_TRUE(text.delay.has_value());
  EXPECT_EQ(*text.delay, absl::Hours(2) + absl::Minutes(1));
  // A weekly quota id.
  EXPECT_TRUE(ParseUpstreamError(429, "", R"({"error":{"code":429,"details":[
    {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerWeekPerUser-Weekly"}]},
    {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED"}]}})", kNow).family_wide);
  // A model's own quota is not family-wide.
  UpstreamError model = ParseUpstreamError(429, "", R"({"error":{"code":429,"message":"You have exhausted your capacity on this model.",
    "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED","metadata":{"model":"gemini-3-pro-high"}}]}})",
                                           kNow);
  EXPECT_EQ(model.kind, FailureKind::kQuotaExhausted);
  EXPECT_FALSE(model.family_wide);
}

}  // namespace
}  // namespace tokenbroker
