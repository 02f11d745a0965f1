#include "lib/common/errors.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

TEST(ValidateModel, AcceptsRealModelNames) {
  for (const char* m : {"gemini-3-pro-high", "claude-sonnet-4-6-thinking", "models/gemini-2.5-flash:latest",
                        "a_b.c"}) {
    EXPECT_TRUE(ValidateModel("model", m, true).ok()) << m;
  }
}

TEST(ValidateModel, RejectsEmptyWhenRequired) {
  absl::Status s = ValidateModel("model", "", true);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model"));
  EXPECT_EQ(InvalidField(s), "model");
  EXPECT_TRUE(ValidateModel("quota_group", "", false).ok());
}

TEST(ValidateModel, RejectsSpacesAndOtherCharacters) {
  for (const char* m : {"gemini pro", "gemini\n", "gé", "a;b", "a\"b"}) {
    absl::Status s = ValidateModel("model", m, true);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << m;
    EXPECT_THAT(s.message(), HasSubstr("only letters, digits")) << m;
  }
}

TEST(ValidateModel, RejectsTooLongWithoutTruncating) {
  EXPECT_TRUE(ValidateModel("model", std::string(128, 'a'), true).ok());
  absl::Status s = ValidateModel("model", std::string(129, 'a'), true);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("129 characters long; at most 128"));
}

TEST(ValidateSessionId, LengthAndPrintable) {
  EXPECT_TRUE(ValidateSessionId("session_id", "").ok());
  EXPECT_TRUE(ValidateSessionId("session_id", std::string(256, 'x')).ok());
  absl::Status s = ValidateSessionId("session_id", std::string(10 * 1024, 'x'));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("session_id: is 10240 bytes long"));
  EXPECT_EQ(InvalidField(s), "session_id");
  EXPECT_EQ(ValidateSessionId("session_id", std::string("a\0b", 3)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateSessionId("session_id", "tab\there").code(), absl::StatusCode::kInvalidArgument);
}

TEST(InvalidField, AbsentOnOtherErrors) {
  EXPECT_FALSE(InvalidField(absl::InvalidArgumentError("x")).has_value());
  EXPECT_FALSE(InvalidField(absl::OkStatus()).has_value());
}

}  // namespace
TEST(CallerLimitError, CarriesTheCallerTheLimitAndTheDelay) {
  absl::Status s = CallerLimitError("caller bulk has 2 leases in flight", "bulk", "max_inflight", absl::Seconds(3));
  EXPECT_TRUE(absl::IsResourceExhausted(s));
  ASSERT_TRUE(ExhaustedCaller(s).has_value());
  EXPECT_EQ(ExhaustedCaller(s)->caller, "bulk");
  EXPECT_EQ(ExhaustedCaller(s)->limit, "max_inflight");
  EXPECT_EQ(RetryDelay(s), absl::Seconds(3));
  EXPECT_FALSE(ExhaustedModel(s).has_value());  // not a model's exhaustion
  EXPECT_FALSE(ExhaustedCaller(NoAccountAvailableError("none", "m", std::nullopt)).has_value());
}

}  // namespace tokenbroker
