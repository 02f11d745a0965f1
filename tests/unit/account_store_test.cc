#include "lib/tokens/account_store.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::SizeIs;
using testing::AccountJson;
using testing::ReadText;
using testing::TempDir;
using testing::WriteText;

constexpr char kFullAccount[] = R"({
  "id": "a1", "email": "a1@example.com", "name": "Alice",
  "token": {"access_token": "ya29.old", "refresh_token": "1//rt-a1", "expires_in": 3599,
            "expiry_timestamp": 1800000000, "token_type": "Bearer", "project_id": "vivid-river-a1b2c"},
  "quota": {"models": [{"name": "gemini-3-pro-high", "percentage": 62, "reset_time": "2026-11-29T04:00:00Z"},
                       {"name": "claude-sonnet-4-6-thinking", "percentage": 0}],
            "last_updated": 1799990000, "is_forbidden": false, "subscription_tier": "g1-ultra-tier"},
  "disabled": false, "disabled_reason": null, "proxy_disabled": false,
  "protected_models": ["claude-opus-4-5"], "created_at": 1700000000, "custom": {"keep": [1, 2, 3]}
})";

TEST(ParseAccountJson, ReadsAntigravityManagerFields) {
  absl::StatusOr<AccountRecord> rec = ParseAccountJson("a1", kFullAccount);
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(rec->id, "a1");
  EXPECT_EQ(rec->email, "a1@example.com");
  EXPECT_EQ(rec->refresh_token, "1//rt-a1");
  EXPECT_EQ(rec->access_token, "ya29.old");
  EXPECT_EQ(rec->access_expiry, absl::FromUnixSeconds(1800000000));
  EXPECT_EQ(rec->project_id, "vivid-river-a1b2c");
  EXPECT_EQ(rec->tier, Tier::kUltra);
  EXPECT_FALSE(rec->disabled);
  EXPECT_THAT(rec->protected_models, ElementsAre("claude-opus-4-5"));
  ASSERT_THAT(rec->quotas, SizeIs(2));
  EXPECT_DOUBLE_EQ(rec->quotas[0].remaining_fraction, 0.62);
  ASSERT_TRUE(rec->quotas[0].reset_time.has_value());
  EXPECT_EQ(*rec->quotas[0].reset_time, absl::FromUnixSeconds(1795924800));
  EXPECT_DOUBLE_EQ(rec->quotas[1].remaining_fraction, 0.0);
  EXPECT_FALSE(rec->quotas[1].reset_time.has_value());
}

TEST(ParseAccountJson, ErrorsNameTheFieldAndNeverQuoteSecrets) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"", "file is empty"},
      {"  \n", "file is empty"},
      {"{\"email\": \"x\", \"token\": ", "not valid JSON"},
      {"[1,2]", "JSON object"},
      {R"({"email":"x"})", "'token'"},
      {R"({"email":"x","token":{"refresh_token":""}})", "'token.refresh_token'"},
      {R"({"email":"x","token":{"refresh_token":"1//secret-rt","expiry_timestamp":"soon"}})",
       "'token.expiry_timestamp'"},
      {R"({"email":"x","token":{"refresh_token":"1//secret-rt"},"disabled":"yes"})", "'disabled'"},
      {R"({"email":"x","token":{"refresh_token":"1//secret-rt"},"protected_models":"m"})", "'protected_models'"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<AccountRecord> rec = ParseAccountJson("x", c.text);
    ASSERT_FALSE(rec.ok()) << c.text;
    EXPECT_THAT(rec.status().message(), HasSubstr(c.want)) << c.text;
    EXPECT_THAT(rec.status().message(), ::testing::Not(HasSubstr("secret"))) << c.text;
  }
}

// The parser moved from nlohmann to simdjson (issue 15); what an account file means did not change.
TEST(ParseAccountJson, KeepsTheMeaningOfEveryFieldForm) {
  // A member given twice counts with its last value; null is absent; a fractional expiry is
  // truncated; a byte order mark is allowed; unknown members are ignored.
  absl::StatusOr<AccountRecord> rec = ParseAccountJson("id7", "\xEF\xBB\xBF" R"({
    "email": null, "extra": {"deep": [1, {"x": null}]},
    "token": {"refresh_token": "1//first", "access_token": "ya29.a"},
    "token": {"refresh_token": "1//second", "access_token": "ya29.b", "expiry_timestamp": 1800000000.9,
              "project_id": null},
    "quota": {"subscription_tier": "Google AI Pro", "last_updated": 1799990000.5,
              "models": [{"name": "m1", "percentage": 250}, {"name": "", "percentage": 5},
                         {"name": "m2", "percentage": -3.5, "reset_time": "not a time"},
                         {"name": "m3", "percentage": "62", "reset_time": "2026-11-29T04:00:00.5+01:00"}]},
    "disabled": true, "disabled": false, "proxy_disabled": null, "protected_models": null
  })");
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(rec->email, "id7");
  EXPECT_EQ(rec->refresh_token, "1//second");
  EXPECT_EQ(rec->access_token, "ya29.b");
  EXPECT_EQ(rec->access_expiry, absl::FromUnixSeconds(1800000000));
  EXPECT_EQ(rec->project_id, "");
  EXPECT_EQ(rec->tier, Tier::kPro);
  EXPECT_FALSE(rec->disabled);
  EXPECT_FALSE(rec->proxy_disabled);
  EXPECT_TRUE(rec->protected_models.empty());
  ASSERT_THAT(rec->quotas, SizeIs(3));
  EXPECT_EQ(rec->quotas[0].model, "m1");
  EXPECT_DOUBLE_EQ(rec->quotas[0].remaining_fraction, 1.0);
  EXPECT_EQ(rec->quotas[0].observed, absl::FromUnixSeconds(1799990000));
  EXPECT_DOUBLE_EQ(rec->quotas[1].remaining_fraction, 0.0);
  EXPECT_FALSE(rec->quotas[1].reset_time.has_value());
  EXPECT_DOUBLE_EQ(rec->quotas[2].remaining_fraction, 0.0);  // not a number: unknown
  ASSERT_TRUE(rec->quotas[2].reset_time.has_value());
  EXPECT_EQ(*rec->quotas[2].reset_time, absl::FromUnixMillis(1795921200500));
  // No access token: its expiry is unknown whatever the file says.
  rec = ParseAccountJson("x", R"({"token": {"refresh_token": "1//r", "expiry_timestamp": 1800000000}})");
  ASSERT_TRUE(rec.ok()) << rec.status();
  EXPECT_EQ(rec->access_expiry, absl::InfinitePast());
  EXPECT_EQ(rec->email, "x");
}

TEST(ParseAccountJson, EveryWrongTypeNamesItsField) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {R"({"email": 5, "token": {"refresh_token": "1//secret-rt"}})", "field 'email' must be a string"},
      {R"({"token": "1//secret-rt"})", "field 'token' must be an object"},
      {R"({"token": {"refresh_token": 7}})", "field 'token.refresh_token' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt", "access_token": ["ya29.secret"]}})",
       "field 'token.access_token' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt", "project_id": 1}})", "field 'token.project_id' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "quota": []})", "field 'quota' must be an object"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "quota": {"subscription_tier": 3}})",
       "field 'quota.subscription_tier' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "quota": {"models": {}}})",
       "field 'quota.models' must be an array"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "quota": {"models": [1]}})",
       "field 'quota.models[]' must be objects"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "quota": {"models": [{"name": 1}]}})",
       "field 'quota.models[].name' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "quota": {"models": [{"name": "m", "reset_time": 1}]}})",
       "field 'quota.models[].reset_time' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "disabled_reason": false})",
       "field 'disabled_reason' must be a string"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "proxy_disabled": 0})", "field 'proxy_disabled' must be true or false"},
      {R"({"token": {"refresh_token": "1//secret-rt"}, "protected_models": ["a", 2]})",
       "field 'protected_models' must be an array of strings"},
      {R"({"token": {"refresh_token": "1//secret-rt"}} trailing)", "not valid JSON"},
      {"{\"token\": {\"refresh_token\": \"1//secret-\xff\"}}", "not valid JSON"},
      {"\xEF\xBB\xBF", "not valid JSON"},
      {"\"1//secret-rt\"", "top level must be a JSON object"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<AccountRecord> rec = ParseAccountJson("x", c.text);
    ASSERT_FALSE(rec.ok()) << c.text;
    EXPECT_EQ(rec.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_EQ(rec.status().message(), c.want) << c.text;
    EXPECT_THAT(rec.status().message(), ::testing::Not(HasSubstr("secret"))) << c.text;
  }
}

TEST(ParseTier, MapsIdsAndNames) {
  EXPECT_EQ(ParseTier("g1-ultra-tier"), Tier::kUltra);
  EXPECT_EQ(ParseTier("Google AI Pro"), Tier::kPro);
  EXPECT_EQ(ParseTier("PRO"), Tier::kPro);
  EXPECT_EQ(ParseTier("free-tier"), Tier::kFree);
  EXPECT_EQ(ParseTier("standard-tier"), Tier::kFree);
  EXPECT_EQ(ParseTier(""), Tier::kUnknown);
}

TEST(AccountStore, OpenFailsClearlyForMissingDirectory) {
  TempDir dir;
  absl::StatusOr<std::unique_ptr<AccountStore>> store = AccountStore::Open(dir.Join("nope"));
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(store.status().message(), HasSubstr("nope"));
}

TEST(AccountStore, LoadsGoodFilesAndReportsEachBadOneByPath) {
  TempDir dir;
  WriteText(dir.Join("good1.json"), AccountJson("g1@example.com", "rt-1", "PRO"));
  WriteText(dir.Join("good2.json"), AccountJson("g2@example.com", "rt-2", "FREE"));
  WriteText(dir.Join("malformed.json"), "{\"email\": ");
  WriteText(dir.Join("empty.json"), "");
  // Unreadable: a link to nowhere (chmod 000 would not stop root, which CI runs as).
  std::filesystem::create_symlink(dir.Join("missing-target"), dir.Join("unreadable.json"));
  WriteText(dir.Join("notes.txt"), "not an account");
  WriteText(dir.Join(".hidden.json"), "{}");

  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  LoadResult r = (*store)->LoadAll();
  ASSERT_THAT(r.accounts, SizeIs(2));
  EXPECT_EQ(r.accounts[0].id, "good1");
  EXPECT_EQ(r.accounts[1].id, "good2");
  ASSERT_THAT(r.problems, SizeIs(3));
  EXPECT_EQ(r.problems[0].path, dir.Join("empty.json"));
  EXPECT_THAT(r.problems[0].reason, HasSubstr("empty"));
  EXPECT_EQ(r.problems[1].path, dir.Join("malformed.json"));
  EXPECT_THAT(r.problems[1].reason, HasSubstr("not valid JSON"));
  EXPECT_EQ(r.problems[2].path, dir.Join("unreadable.json"));
  EXPECT_THAT(r.problems[2].reason, HasSubstr("cannot open"));
}

// Enough files that LoadAll parses on several threads: the same result as one by one, in id order,
// every bad file reported under its path, and the fingerprint of the files it read.
TEST(AccountStore, ParallelLoadKeepsOrderProblemsAndFingerprint) {
  TempDir dir;
  constexpr int kFiles = 600;  // LoadAll starts a thread per 256 files, up to one per core
  std::vector<std::string> want_ids;
  std::vector<std::string> want_problems;
  for (int i = kFiles - 1; i >= 0; --i) {
    // Ids where sorting by file name and by id differ ("a-1" < "a" as "a-1.json" < "a.json" does not hold).
    const std::string id = i % 100 == 0 ? absl::StrCat("acct-", i / 100) : absl::StrCat("acct-", i / 100, "-", i);
    if (i % 97 == 5) {
      WriteText(dir.Join(id + ".json"), i % 2 ? "{\"token\": " : "");
      want_problems.push_back(dir.Join(id + ".json"));
    } else {
      WriteText(dir.Join(id + ".json"), AccountJson(id + "@example.com", "rt-" + id, "PRO"));
      want_ids.push_back(id);
    }
  }
  std::sort(want_ids.begin(), want_ids.end());
  std::sort(want_problems.begin(), want_problems.end());
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  LoadResult r = (*store)->LoadAll();
  std::vector<std::string> ids;
  for (const AccountRecord& a : r.accounts) {
    ids.push_back(a.id);
    EXPECT_EQ(a.email, a.id + "@example.com");
    EXPECT_EQ(a.refresh_token, "rt-" + a.id);
  }
  EXPECT_EQ(ids, want_ids);
  std::vector<std::string> problems;
  for (const LoadProblem& p : r.problems) problems.push_back(p.path);
  EXPECT_EQ(problems, want_problems);
  EXPECT_EQ(r.fingerprint, (*store)->Fingerprint());
  EXPECT_NE(r.fingerprint, 0u);
}

TEST(AccountStore, UpdateKeepsUnknownFieldsAndWritesMode0600Atomically) {
  TempDir dir;
  WriteText(dir.Join("a1.json"), kFullAccount);
  ::chmod(dir.Join("a1.json").c_str(), 0644);
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  AccountUpdate update;
  update.access_token = "ya29.new";
  update.access_expiry = absl::FromUnixSeconds(1900000000);
  update.disabled_reason = "invalid_grant: Token has been expired or revoked.";
  ASSERT_TRUE((*store)->Update("a1", update).ok());

  nlohmann::json before = nlohmann::json::parse(kFullAccount);
  nlohmann::json after = nlohmann::json::parse(ReadText(dir.Join("a1.json")));
  EXPECT_EQ(after["token"]["access_token"], "ya29.new");
  EXPECT_EQ(after["token"]["expiry_timestamp"], 1900000000);
  EXPECT_EQ(after["disabled"], true);
  EXPECT_EQ(after["disabled_reason"], "invalid_grant: Token has been expired or revoked.");
  EXPECT_TRUE(after.contains("disabled_at"));
  // Every field it had is still there, untouched unless updated.
  for (auto& [key, value] : before.items()) {
    ASSERT_TRUE(after.contains(key)) << key;
    if (key != "token" && key != "disabled" && key != "disabled_reason") {
      EXPECT_EQ(after[key], value) << key;
    }
  }
  for (auto& [key, value] : before["token"].items()) {
    if (key != "access_token" && key != "expiry_timestamp") {
      EXPECT_EQ(after["token"][key], value) << key;
    }
  }
  struct stat st {};
  ASSERT_EQ(::stat(dir.Join("a1.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  // No temp file is left behind.
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    EXPECT_THAT(e.path().filename().string(), ::testing::Not(HasSubstr(".tmp"))) << e.path();
  }
  // And it still loads.
  LoadResult r = (*store)->LoadAll();
  ASSERT_THAT(r.accounts, SizeIs(1));
  EXPECT_TRUE(r.accounts[0].disabled);
}

// Issue 11 item 15: temp files of interrupted writes hold tokens; Open removes them (and nothing else).
TEST(AccountStore, OpenRemovesTempFilesOfInterruptedWrites) {
  TempDir dir;
  WriteText(dir.Join("a.json"), AccountJson("a@example.com", "rt-a", "PRO"));
  WriteText(dir.Join("a.json.tmp.4242"), R"({"token":{"refresh_token":"1//left-behind"}})");
  WriteText(dir.Join("b.json.tmp.17"), "{");
  WriteText(dir.Join("notes.tmp.1"), "kept");
  WriteText(dir.Join("a.json.tmp.not-a-pid"), "kept");
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->removed_temp_files(), 2);
  EXPECT_FALSE(std::filesystem::exists(dir.Join("a.json.tmp.4242")));
  EXPECT_FALSE(std::filesystem::exists(dir.Join("b.json.tmp.17")));
  EXPECT_TRUE(std::filesystem::exists(dir.Join("notes.tmp.1")));
  EXPECT_TRUE(std::filesystem::exists(dir.Join("a.json.tmp.not-a-pid")));
  EXPECT_TRUE(std::filesystem::exists(dir.Join("a.json")));
}

TEST(AccountStore, EnableClearsADisableAndKeepsTheRest) {
  TempDir dir;
  WriteText(dir.Join("a.json"), AccountJson("a@example.com", "rt-a", "PRO"));
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  AccountUpdate disable;
  disable.disabled_reason = "invalid_grant: revoked";
  ASSERT_TRUE((*store)->Update("a", disable).ok());
  EXPECT_TRUE((*store)->LoadAll().accounts[0].disabled);
  AccountUpdate enable;
  enable.enable = true;
  ASSERT_TRUE((*store)->Update("a", enable).ok());
  nlohmann::json doc = nlohmann::json::parse(ReadText(dir.Join("a.json")));
  EXPECT_EQ(doc["disabled"], false);
  EXPECT_TRUE(doc["disabled_reason"].is_null());
  EXPECT_FALSE(doc.contains("disabled_at"));
  EXPECT_EQ(doc["email"], "a@example.com");
  EXPECT_FALSE((*store)->LoadAll().accounts[0].disabled);
}

TEST(AccountStore, UpdateOfMissingFileIsNotFound) {
  TempDir dir;
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  AccountUpdate update;
  update.access_token = "x";
  EXPECT_EQ((*store)->Update("gone", update).code(), absl::StatusCode::kNotFound);
}

TEST(AccountStore, ConcurrentUpdatesNeverLoseAWrite) {
  TempDir dir;
  WriteText(dir.Join("a1.json"), kFullAccount);
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  // Two writers change different fields of one file; the lock makes each read-modify-write whole,
  // so the last value of each field survives.
  auto writer = [&](bool access) {
    for (int i = 0; i < 40; ++i) {
      AccountUpdate u;
      if (access) {
        u.access_token = "a-" + std::to_string(i);
      } else {
        u.refresh_token = "r-" + std::to_string(i);
      }
      ASSERT_TRUE((*store)->Update("a1", u).ok());
    }
  };
  std::thread t1(writer, true);
  std::thread t2(writer, false);
  t1.join();
  t2.join();
  nlohmann::json after = nlohmann::json::parse(ReadText(dir.Join("a1.json")));
  EXPECT_EQ(after["token"]["access_token"], "a-39");
  EXPECT_EQ(after["token"]["refresh_token"], "r-39");
}

TEST(AccountStore, FingerprintChangesWhenAFileChanges) {
  TempDir dir;
  WriteText(dir.Join("a.json"), AccountJson("a@example.com", "rt-a", "PRO"));
  auto store = AccountStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  uint64_t f1 = (*store)->Fingerprint();
  EXPECT_EQ(f1, (*store)->Fingerprint());
  WriteText(dir.Join("b.json"), AccountJson("b@example.com", "rt-b", "PRO"));
  uint64_t f2 = (*store)->Fingerprint();
  EXPECT_NE(f1, f2);
  WriteText(dir.Join("b.json"), AccountJson("b@example.com", "rt-b-longer", "PRO"));
  EXPECT_NE(f2, (*store)->Fingerprint());
}

}  // namespace
}  // namespace tokenbroker
