// The caller policy file (--caller_policy_file): read at start, reloaded when it changes; a file
// that breaks keeps the policies in force, and says so in the log.
#include "server/security/caller_policy_file.h"

#include <memory>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "spdlog/sinks/ostream_sink.h"
#include "spdlog/spdlog.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using ::tokenbroker::testing::TempDir;
using ::tokenbroker::testing::WriteText;

int MaxInflight(CallerAdmission& admission, const std::string& caller) {
  absl::StatusOr<std::optional<CallerGrant>> g = admission.Admit(caller, "m");
  if (!g.ok() || !g->has_value()) return -1;
  return (*g)->policy->max_inflight;
}

TEST(CallerPolicyFileTest, ABadFileAtStartIsOneLineNamingTheFlagAndLine) {
  TempDir dir;
  FakeClock clock;
  CallerAdmission admission(clock, absl::Minutes(10));
  WriteText(dir.Join("p"), "gold max_inflight=2\nbulk max_inflight=lots\n");
  auto file = CallerPolicyFile::Open(dir.Join("p"), admission);
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(file.status().message(), HasSubstr("--caller_policy_file"));
  EXPECT_THAT(file.status().message(), HasSubstr("line 2: max_inflight"));
  EXPECT_FALSE(admission.enabled());
  EXPECT_FALSE(CallerPolicyFile::Open(dir.Join("missing"), admission).ok());
}

TEST(CallerPolicyFileTest, ReloadTakesAGoodFileAndKeepsTheLastGoodOneOverABrokenOne) {
  TempDir dir;
  FakeClock clock;
  CallerAdmission admission(clock, absl::Minutes(10));
  WriteText(dir.Join("p"), "gold max_inflight=2\n");
  auto file = CallerPolicyFile::Open(dir.Join("p"), admission);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(MaxInflight(admission, "gold"), 2);
  EXPECT_FALSE((*file)->ReloadIfChanged());  // unchanged

  WriteText(dir.Join("p"), "gold max_inflight=5\n# a longer file\n");
  EXPECT_TRUE((*file)->ReloadIfChanged());
  EXPECT_EQ(MaxInflight(admission, "gold"), 5);

  std::ostringstream log;
  auto previous = spdlog::default_logger();
  spdlog::set_default_logger(
      std::make_shared<spdlog::logger>("test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  WriteText(dir.Join("p"), "gold max_inflight=5 priority=urgent-and-much-longer\n");
  const bool reloaded = (*file)->ReloadIfChanged();
  spdlog::set_default_logger(previous);
  EXPECT_FALSE(reloaded);
  EXPECT_EQ(MaxInflight(admission, "gold"), 5);  // the last good policies stay
  EXPECT_THAT(log.str(), HasSubstr("caller policy file changed but cannot be used"));
  EXPECT_THAT(log.str(), HasSubstr("line 1: priority"));
}

}  // namespace
}  // namespace tokenbroker
