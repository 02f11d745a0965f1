#include "server/runtime/command_line.h"

#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

ABSL_FLAG(std::string, cl_accounts_dir, "", "Folder of account files.");
ABSL_FLAG(absl::Duration, cl_drain_timeout, absl::Seconds(10), "How long in-flight calls may take.");
ABSL_FLAG(bool, cl_json, false, "Print JSON.");
ABSL_FLAG(int, cl_workers, 4, "Workers.");

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

TEST(ClosestMatch, SuggestsTyposAndPartsButNotStrangers) {
  const std::vector<std::string> names = {"accounts_dir", "drain_timeout", "listen", "health_listen"};
  EXPECT_EQ(ClosestMatch("acounts_dir", names), "accounts_dir");
  EXPECT_EQ(ClosestMatch("accounts-dir", names), "accounts_dir");
  EXPECT_EQ(ClosestMatch("accounts", names), "accounts_dir");
  EXPECT_EQ(ClosestMatch("lisen", names), "listen");
  EXPECT_EQ(ClosestMatch("frobnicate", names), "");
  EXPECT_EQ(ClosestMatch("", names), "");
}

TEST(ParseFlags, SetsFlagsInEveryForm) {
  absl::StatusOr<ParsedCommandLine> parsed = ParseFlags(
      {"--cl_accounts_dir", "/a", "--cl_drain_timeout=2s", "--cl_json", "-cl_workers=7", "cmd", "--", "--x"},
      /*allow_positional=*/true);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_accounts_dir), "/a");
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_drain_timeout), absl::Seconds(2));
  EXPECT_TRUE(absl::GetFlag(FLAGS_cl_json));
  EXPECT_EQ(absl::GetFlag(FLAGS_cl_workers), 7);
  EXPECT_THAT(parsed->positional, ::testing::ElementsAre("cmd", "--x"));
  EXPECT_FALSE(parsed->help);
  ASSERT_TRUE(ParseFlags({"--nocl_json"}, false).ok());
  EXPECT_FALSE(absl::GetFlag(FLAGS_cl_json));
  EXPECT_TRUE(ParseFlags({"--help"}, false)->help);
}

TEST(ParseFlags, EachErrorIsOneLineNamingTheFlag) {
  auto error = [](std::vector<std::string> args) {
    absl::StatusOr<ParsedCommandLine> parsed = ParseFlags(args, /*allow_positional=*/false);
    EXPECT_FALSE(parsed.ok());
    EXPECT_EQ(parsed.status().message().find('\n'), std::string::npos);
    return std::string(parsed.status().message());
  };
  EXPECT_THAT(error({"--cl_acounts_dir=/x"}), HasSubstr("unknown flag --cl_acounts_dir (did you mean --cl_accounts_dir?)"));
  EXPECT_THAT(error({"--cl_accounts_dir"}), HasSubstr("flag --cl_accounts_dir needs a value"));
  EXPECT_THAT(error({"--cl_accounts_dir", "--cl_json"}), HasSubstr("--cl_accounts_dir needs a value"));
  EXPECT_THAT(error({"--cl_drain_timeout=soon"}), HasSubstr("--cl_drain_timeout: 'soon' is not a duration"));
  EXPECT_THAT(error({"--cl_workers=many"}), HasSubstr("--cl_workers: 'many' is not an integer"));
  EXPECT_THAT(error({"stray"}), HasSubstr("unexpected argument 'stray'"));
  EXPECT_THAT(error({"--flagfile=/nonexistent"}), HasSubstr("--flagfile: cannot read /nonexistent"));
}

TEST(HelpText, ListsEveryFlagWithTypeDefaultAndMeaning) {
  const std::string help = HelpText("prog: does things.");
  EXPECT_THAT(help, HasSubstr("prog: does things.\n"));
  EXPECT_THAT(help, HasSubstr("  --cl_drain_timeout (duration, default 10s)\n      How long in-flight calls may take.\n"));
  EXPECT_THAT(help, HasSubstr("  --cl_accounts_dir (string, default \"\")\n"));
  EXPECT_THAT(help, HasSubstr("  --cl_workers (integer, default 4)\n"));
  EXPECT_THAT(help, HasSubstr("--flagfile=FILE"));
  EXPECT_THAT(help, ::testing::Not(HasSubstr("--helpfull (")));  // Abseil's own flags stay out
}

}  // namespace
}  // namespace tokenbroker
