// Caller policies (issue 16.1): the file parser (a table of good and hostile files), the pure
// admission rule, the local ledger's counts (leases end by report and by timeout, on a FakeClock),
// and the GetToken use case under policies with the real pool, token manager and fake upstream.
#include "lib/broker/caller_policy.h"

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "lib/broker/caller_admission.h"
#include "lib/broker/token_issuer.h"
#include "lib/common/errors.h"
#include "lib/upstream/http_client.h"
#include "lib/upstream/oauth_client.h"
#include "tests/fakes/fake_upstream.h"
#include "tests/unit/test_util.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using ::tokenbroker::testing::Eventually;
using ::tokenbroker::testing::FakeUpstream;

// --- the parser ---

TEST(CallerPolicyParseTest, ReadsEveryField) {
  absl::StatusOr<CallerPolicies> p = ParseCallerPolicies(
      "# callers\n"
      "\n"
      "gold   max_inflight=8 max_accounts=50% priority=high\n"
      "bulk\tmax_inflight=2 max_accounts=3 max_accounts.free=1 max_accounts.pro=25% "
      "models=gemini-2.5-flash,family:3p priority=low max_waiting=4 retry_after=250ms\n"
      "default max_inflight=1\n",
      "policies");
  ASSERT_TRUE(p.ok()) << p.status();
  const CallerPolicy* gold = p->Find("gold");
  ASSERT_NE(gold, nullptr);
  EXPECT_EQ(gold->max_inflight, 8);
  EXPECT_EQ(gold->max_accounts.Resolve(10), 5);
  EXPECT_EQ(gold->priority, CallerPriority::kHigh);
  EXPECT_TRUE(gold->models.empty());
  const CallerPolicy* bulk = p->Find("bulk");
  ASSERT_NE(bulk, nullptr);
  EXPECT_EQ(bulk->max_accounts.Resolve(1000), 3);
  EXPECT_EQ(bulk->max_tier_accounts.at(Tier::kFree).Resolve(10), 1);
  EXPECT_EQ(bulk->max_tier_accounts.at(Tier::kPro).Resolve(2), 1);  // a share never resolves to 0
  EXPECT_EQ(bulk->models, std::vector<std::string>{"gemini-2.5-flash"});
  EXPECT_EQ(bulk->families, std::vector<std::string>{"3p"});
  EXPECT_EQ(bulk->priority, CallerPriority::kLow);
  EXPECT_EQ(bulk->max_waiting, 4);
  EXPECT_EQ(bulk->retry_after, absl::Milliseconds(250));
  // A caller without an entry gets `default`.
  ASSERT_NE(p->Find("stranger"), nullptr);
  EXPECT_EQ(p->Find("stranger")->name, "default");
}

TEST(CallerPolicyParseTest, WithoutADefaultAnUnlistedCallerHasNoPolicy) {
  absl::StatusOr<CallerPolicies> p = ParseCallerPolicies("gold max_inflight=1\n", "f");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->Find("stranger"), nullptr);
}

TEST(CallerPolicyParseTest, BadFilesNameTheLineTheFieldAndWhatIsAllowed) {
  struct Case {
    std::string text;
    std::string want;  // in the message
  };
  const std::vector<Case> cases = {
      {"", "names no caller"},
      {"# only a comment\n", "names no caller"},
      {"gold max_inflight=0\n", "f line 1: max_inflight: \"0\" is not a whole number from 1 to 1000000"},
      {"gold max_inflight=-3\n", "max_inflight"},
      {"gold max_inflight=99999999999999999999\n", "max_inflight"},
      {"gold\n\nbulk max_inflight=two\n", "f line 3: max_inflight"},
      {"gold max_accounts=0%\n", "max_accounts: \"0%\" is not a share"},
      {"gold max_accounts=150%\n", "max_accounts"},
      {"gold max_accounts=nan%\n", "max_accounts"},
      {"gold max_accounts=lots\n", "neither a count from 1 to 1000000 nor a share such as 25%"},
      {"gold max_accounts.platinum=1\n", "max_accounts.platinum: the tier must be free, pro, ultra or unknown"},
      {"gold priority=urgent\n", "priority: \"urgent\" is not low, normal or high"},
      {"gold max_waiting=100000\n", "max_waiting"},
      {"gold retry_after=forever\n", "retry_after"},
      {"gold retry_after=1h\n", "retry_after"},
      {"gold models=\n", "want key=value"},
      {"gold models=a,,b\n", "models"},
      {"gold models=family:\n", "models"},
      {"gold models=family:bad/family\n", "models"},
      {"gold colour=blue\n", "colour: unknown field; allowed: max_inflight"},
      {"gold max_inflight\n", "max_inflight: want key=value"},
      {"gold max_inflight=1 max_inflight=2\n", "max_inflight: given twice"},
      {"gold max_inflight=1\ngold max_inflight=2\n", "line 2: name: caller gold appears twice"},
      {"max_inflight=2\n", "line 1: name: a line starts with the caller's name"},
      {std::string(200, 'n') + " max_inflight=1\n", "name"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<CallerPolicies> p = ParseCallerPolicies(c.text, "f");
    ASSERT_FALSE(p.ok()) << c.text;
    EXPECT_TRUE(absl::IsInvalidArgument(p.status())) << c.text;
    EXPECT_THAT(p.status().message(), HasSubstr(c.want)) << c.text;
  }
}

TEST(CallerPolicyParseTest, HostileContentIsNeitherEchoedRawNorUnbounded) {
  // Control characters and a token-shaped value in a field: the message escapes and redacts them.
  absl::StatusOr<CallerPolicies> p =
      ParseCallerPolicies("gold priority=ya29.secretsecretsecret\x1b[2J\n", "f");
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), Not(HasSubstr("secretsecret")));
  EXPECT_THAT(p.status().message(), Not(HasSubstr("\x1b")));
  // A key of a megabyte is cut short in the message.
  p = ParseCallerPolicies("gold " + std::string(100'000, 'k') + "=1\n", "f");
  ASSERT_FALSE(p.ok());
  EXPECT_LT(p.status().message().size(), 400u);
  // Larger than the limit: refused whole.
  p = ParseCallerPolicies(std::string(CallerPolicies::kMaxFileBytes + 1, '#'), "f");
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), HasSubstr("larger than"));
  // More entries than the limit.
  std::string many;
  for (size_t i = 0; i <= CallerPolicies::kMaxEntries; ++i) absl::StrAppend(&many, "c", i, " max_inflight=1\n");
  p = ParseCallerPolicies(many, "f");
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(p.status().message(), HasSubstr("more than 1000 callers"));
}

TEST(CallerPolicyModelTest, ModelsAndFamiliesAllowWhatTheyName) {
  absl::StatusOr<CallerPolicies> p =
      ParseCallerPolicies("a models=gemini-2.5-flash,family:3p\nb max_inflight=1\n", "f");
  ASSERT_TRUE(p.ok()) << p.status();
  const CallerPolicy& a = *p->Find("a");
  EXPECT_TRUE(CheckCallerModel(a, "gemini-2.5-flash", "gemini").ok());
  EXPECT_TRUE(CheckCallerModel(a, "claude-sonnet-4-5", "3p").ok());
  absl::Status refused = CheckCallerModel(a, "gemini-3-pro-high", "gemini");
  EXPECT_TRUE(absl::IsPermissionDenied(refused));
  EXPECT_THAT(refused.message(), HasSubstr("allowed: gemini-2.5-flash, family:3p"));
  EXPECT_TRUE(CheckCallerModel(*p->Find("b"), "anything", "gemini").ok());  // no list: any model
}

// --- the admission rule ---

CallerPolicy Policy(const std::string& line) {
  absl::StatusOr<CallerPolicies> p = ParseCallerPolicies(line, "f");
  EXPECT_TRUE(p.ok()) << p.status();
  return p->entries().begin()->second;
}

TEST(DecideAdmissionTest, Table) {
  PoolShape shape{10, {{Tier::kFree, 4}, {Tier::kPro, 6}}};
  struct Case {
    std::string policy;
    CallerUsage usage;
    bool refused;
    bool share_all;
    std::vector<Tier> share_tiers;
  };
  CallerUsage none;
  CallerUsage two_on_two;  // 2 leases on 2 accounts (a FREE and a PRO one)
  two_on_two.in_flight = 2;
  two_on_two.accounts = 2;
  two_on_two.tier_accounts = {{Tier::kFree, 1}, {Tier::kPro, 1}};
  two_on_two.held = {"f1", "p1"};
  CallerUsage one_pending;  // a call being served: its account is not chosen yet
  one_pending.in_flight = 1;
  one_pending.pending = 1;
  const std::vector<Case> cases = {
      {"c max_inflight=2", none, false, false, {}},
      {"c max_inflight=2", two_on_two, true, false, {}},
      {"c max_inflight=3", two_on_two, false, false, {}},
      {"c max_accounts=2", two_on_two, false, true, {}},
      {"c max_accounts=3", two_on_two, false, false, {}},
      {"c max_accounts=20%", two_on_two, false, true, {}},   // 20% of 10 = 2
      {"c max_accounts=30%", two_on_two, false, false, {}},  // 3
      {"c max_accounts.free=1", two_on_two, false, false, {Tier::kFree}},
      {"c max_accounts.free=50%", two_on_two, false, false, {}},  // 2 of 4 FREE
      {"c max_accounts.pro=1 max_accounts.free=1", two_on_two, false, false, {Tier::kFree, Tier::kPro}},
      // A pending call counts as a possible new account: two calls at once never pass a share of 1.
      {"c max_accounts=1", one_pending, false, true, {}},
      {"c max_inflight=1", one_pending, true, false, {}},
  };
  for (const Case& c : cases) {
    AdmissionDecision d = DecideAdmission(Policy(c.policy), c.usage, shape);
    EXPECT_EQ(d.refused_limit.has_value(), c.refused) << c.policy;
    if (c.refused) {
      EXPECT_EQ(*d.refused_limit, "max_inflight");
      EXPECT_THAT(d.detail, HasSubstr("its max_inflight is"));
      continue;
    }
    const bool restricted = c.share_all || !c.share_tiers.empty();
    ASSERT_EQ(d.share != nullptr, restricted) << c.policy;
    if (!restricted) continue;
    EXPECT_EQ(d.share->all, c.share_all) << c.policy;
    EXPECT_EQ(d.share->tiers, c.share_tiers) << c.policy;
    EXPECT_EQ(d.share->Blocks("f1", Tier::kFree), !c.usage.held.contains("f1")) << c.policy;  // held: allowed
    EXPECT_TRUE(d.share->Blocks("f9", Tier::kFree)) << c.policy;   // FREE is capped in every restricted case
  }
}

// --- the local ledger ---

TEST(CallerAdmissionTest, LeasesCountUntilReportedOrTimedOut) {
  FakeClock clock;
  CallerAdmission admission(clock, absl::Minutes(10));
  auto policies = std::make_shared<const CallerPolicies>(*ParseCallerPolicies("c max_inflight=2\n", "f"));
  admission.SetPolicies(policies);
  const CallerPolicy& c = *policies->Find("c");
  ASSERT_TRUE(admission.Reserve(c).ok());
  admission.Commit(c, "l-1", "a1", Tier::kPro);
  ASSERT_TRUE(admission.Reserve(c).ok());
  admission.Commit(c, "l-2", "a2", Tier::kPro);
  absl::StatusOr<std::shared_ptr<const CallerShare>> third = admission.Reserve(c);
  ASSERT_TRUE(absl::IsResourceExhausted(third.status())) << third.status();
  std::optional<CallerLimit> limit = ExhaustedCaller(third.status());
  ASSERT_TRUE(limit.has_value());
  EXPECT_EQ(limit->caller, "c");
  EXPECT_EQ(limit->limit, "max_inflight");
  EXPECT_EQ(RetryDelay(third.status()), absl::Seconds(1));
  EXPECT_EQ(admission.Stats()["c"].usage.in_flight, 2);
  EXPECT_EQ(admission.Stats()["c"].usage.accounts, 2);

  admission.Released("l-1");  // reported
  admission.Released("l-1");  // twice: counted once
  admission.Released("l-unknown");
  ASSERT_TRUE(admission.Reserve(c).ok());
  admission.Cancel(c);  // a reservation that came to nothing
  EXPECT_EQ(admission.Stats()["c"].usage.in_flight, 1);
  clock.Advance(absl::Minutes(10));  // l-2 times out
  EXPECT_EQ(admission.Stats()["c"].usage.in_flight, 0);
  EXPECT_EQ(admission.Stats()["c"].issued, 2);
  EXPECT_EQ(admission.Stats()["c"].refused["max_inflight"], 1);
}

TEST(CallerAdmissionTest, UnlistedCallersAndForbiddenModelsAreRefusedAndCountedUnderBoundedLabels) {
  FakeClock clock;
  CallerAdmission admission(clock, absl::Minutes(10));
  EXPECT_FALSE(admission.enabled());
  absl::StatusOr<std::optional<CallerGrant>> off = admission.Admit("anyone", "m");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->has_value());  // no policies: as before

  admission.SetPolicies(std::make_shared<const CallerPolicies>(*ParseCallerPolicies("c models=m1\n", "f")));
  for (int i = 0; i < 100; ++i) {
    absl::StatusOr<std::optional<CallerGrant>> g = admission.Admit(absl::StrCat("stranger-", i), "m1");
    ASSERT_TRUE(absl::IsPermissionDenied(g.status()));
    EXPECT_THAT(g.status().message(), HasSubstr("no entry in the caller policy file"));
  }
  EXPECT_TRUE(absl::IsPermissionDenied(admission.Admit("c", "m2").status()));
  ASSERT_TRUE(admission.Admit("c", "m1").ok());
  std::map<std::string, CallerStats> stats = admission.Stats();
  // Only configured names and "unlisted": a hundred strangers add no label.
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats["unlisted"].refused["no_policy"], 100);
  EXPECT_EQ(stats["c"].refused["model"], 1);
  // A reload without the entry forgets its counters.
  admission.SetPolicies(std::make_shared<const CallerPolicies>(*ParseCallerPolicies("d max_inflight=1\n", "f")));
  EXPECT_FALSE(admission.Stats().contains("c"));
}

TEST(CallerAdmissionTest, WaitingCallsAreBoundedPerCaller) {
  FakeClock clock;
  CallerAdmission admission(clock, absl::Minutes(10));
  auto policies = std::make_shared<const CallerPolicies>(*ParseCallerPolicies("c max_waiting=2\n", "f"));
  admission.SetPolicies(policies);
  const CallerPolicy& c = *policies->Find("c");
  EXPECT_TRUE(admission.StartWaiting(c));
  EXPECT_TRUE(admission.StartWaiting(c));
  EXPECT_FALSE(admission.StartWaiting(c));
  admission.StopWaiting(c);
  EXPECT_TRUE(admission.StartWaiting(c));
}

// --- GetToken under caller policies (real pool, token manager, fake upstream) ---

class Answer {
 public:
  TokenIssuer::Done Done() {
    return [this](absl::StatusOr<Issued> issued) {
      absl::MutexLock lock(&mu_);
      result_ = std::move(issued);
    };
  }
  bool done() {
    absl::MutexLock lock(&mu_);
    return result_.has_value();
  }
  absl::StatusOr<Issued> Get() {
    EXPECT_TRUE(Eventually([&] { return done(); }));
    absl::MutexLock lock(&mu_);
    return result_.value_or(absl::DeadlineExceededError("no answer"));
  }

 private:
  absl::Mutex mu_;
  std::optional<absl::StatusOr<Issued>> result_ ABSL_GUARDED_BY(mu_);
};

class CallerIssuerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto up = FakeUpstream::Start({});
    ASSERT_TRUE(up.ok());
    upstream_ = *std::move(up);
    OAuthOptions o;
    o.token_url = upstream_->token_url();
    o.max_attempts = 1;
    oauth_ = std::make_unique<OAuthClient>(o, http_);
    pool_.Load({testing::MakeAccount("a1", Tier::kPro), testing::MakeAccount("a2", Tier::kPro),
                testing::MakeAccount("a3", Tier::kFree)});
    TokenManagerOptions to;
    to.background_refresh = false;
    tokens_ = std::make_unique<TokenManager>(to, pool_, *oauth_, nullptr, clock_);
    tokens_->Start();
    admission_.SetPoolShape(PoolShape{3, {{Tier::kPro, 2}, {Tier::kFree, 1}}});
    issuer_ = std::make_unique<TokenIssuer>(TokenIssuerOptions{}, pool_, *tokens_, clock_);
    issuer_->SetCallerAdmission(&admission_);
  }
  void TearDown() override {
    issuer_->Shutdown();
    tokens_->Stop();
  }
  void SetPolicies(const std::string& text) {
    absl::StatusOr<CallerPolicies> p = ParseCallerPolicies(text, "f");
    ASSERT_TRUE(p.ok()) << p.status();
    admission_.SetPolicies(std::make_shared<const CallerPolicies>(*std::move(p)));
  }
  IssueRequest Request(const std::string& caller, absl::Duration max_wait = absl::ZeroDuration(),
                       const void* key = nullptr) {
    IssueRequest r;
    r.select.model = "gemini-2.5-flash";
    r.select.caller = caller;
    r.max_wait = max_wait;
    r.key = key;
    return r;
  }
  absl::StatusOr<Issued> IssueNow(const std::string& caller) {
    Answer a;
    issuer_->Issue(Request(caller), a.Done());
    return a.Get();
  }
  void Report(const Issued& issued, const std::string& caller) {
    Outcome o;
    o.lease_id = issued.selection.lease_id;
    o.http_status = 200;
    o.caller = caller;
    ASSERT_TRUE(pool_.ReportOutcome(o).ok());
    admission_.Released(issued.selection.lease_id);  // what BrokerService does after a report
    issuer_->Notify();
  }

  FakeClock clock_{absl::Now()};
  PoolOptions options_ = [] {
    PoolOptions o;
    o.max_inflight_per_account = 1;
    return o;
  }();
  AccountPool pool_{options_, clock_};
  HttpClient http_;
  std::unique_ptr<FakeUpstream> upstream_;
  std::unique_ptr<OAuthClient> oauth_;
  std::unique_ptr<TokenManager> tokens_;
  CallerAdmission admission_{clock_, absl::Minutes(10)};
  std::unique_ptr<TokenIssuer> issuer_;
};

TEST_F(CallerIssuerTest, ACallerOverItsBudgetIsRefusedAndLeavesTheRestToOthers) {
  SetPolicies("bulk max_inflight=1\ngold max_inflight=2\n");
  absl::StatusOr<Issued> first = IssueNow("bulk");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->caller_policy, "bulk");
  EXPECT_EQ(first->caller_leases_left, 0);
  absl::StatusOr<Issued> over = IssueNow("bulk");
  ASSERT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_EQ(ExhaustedCaller(over.status())->caller, "bulk");
  EXPECT_EQ(ExhaustedCaller(over.status())->limit, "max_inflight");
  // The refusal took nothing: the two other accounts are gold's.
  absl::StatusOr<Issued> gold = IssueNow("gold");
  ASSERT_TRUE(gold.ok()) << gold.status();
  EXPECT_EQ(gold->caller_leases_left, 1);
  EXPECT_TRUE(IssueNow("gold").ok());
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 3);
  // Reporting frees bulk's budget.
  Report(*first, "bulk");
  EXPECT_TRUE(IssueNow("bulk").ok());
}

TEST_F(CallerIssuerTest, AtItsShareACallerIsServedOnlyByAccountsItHolds) {
  SetPolicies("c max_accounts=1\n");
  absl::StatusOr<Issued> first = IssueNow("c");
  ASSERT_TRUE(first.ok()) << first.status();
  // The account it holds is at its per-account cap: nothing else may serve it.
  absl::StatusOr<Issued> second = IssueNow("c");
  ASSERT_TRUE(absl::IsResourceExhausted(second.status())) << second.status();
  EXPECT_THAT(second.status().message(), HasSubstr("outside the caller's share"));
  Report(*first, "c");
  absl::StatusOr<Issued> third = IssueNow("c");
  ASSERT_TRUE(third.ok()) << third.status();
}

// The fleet's ledger as another replica leaves it (FleetCallerLedger, tested against Redis in
// fleet_caller_ledger_test): the caller holds `held` elsewhere, at its max_accounts, so a commit on
// any other account is refused; with `refuse_all`, every commit is.
class HeldElsewhereLedger final : public CallerLedger {
 public:
  explicit HeldElsewhereLedger(std::string held, bool refuse_all = false)
      : held_(std::move(held)), refuse_all_(refuse_all) {}
  AdmissionDecision Reserve(const std::string& entry, int max_inflight, absl::Time now, bool with_accounts,
                            const std::function<AdmissionDecision(const CallerUsage&)>& decide) override {
    return local_.Reserve(entry, max_inflight, now, with_accounts, decide);
  }
  LedgerCommit Commit(const std::string& entry, const std::string& lease_id, const std::string& account, Tier tier,
                      absl::Time now, absl::Time expires, const CommitLimits& limits) override {
    if (refuse_all_ || account != held_) {
      ++refusals;
      LedgerCommit refused;
      refused.committed = false;
      refused.refused_limit = "max_accounts";
      refused.held = {held_};
      return refused;
    }
    return local_.Commit(entry, lease_id, account, tier, now, expires, limits);
  }
  void Cancel(const std::string& entry) override { local_.Cancel(entry); }
  std::optional<std::string> Release(const std::string& lease_id) override { return local_.Release(lease_id); }
  bool StartWaiting(const std::string& entry, int max) override { return local_.StartWaiting(entry, max); }
  void StopWaiting(const std::string& entry) override { local_.StopWaiting(entry); }
  int Waiting(const std::string& entry) override { return local_.Waiting(entry); }
  std::map<std::string, CallerUsage> Usage(absl::Time now) override { return local_.Usage(now); }

  std::atomic<int> refusals{0};

 private:
  LocalCallerLedger local_;
  const std::string held_;
  const bool refuse_all_;
};

TEST_F(CallerIssuerTest, ACommitRefusedForAnAccountLimitIsRetriedOnTheAccountsTheCallerHolds) {
  auto ledger = std::make_unique<HeldElsewhereLedger>("a3");
  HeldElsewhereLedger& fleet = *ledger;
  admission_.SetLedger(std::move(ledger));
  SetPolicies("c max_accounts=1\n");
  absl::StatusOr<Issued> issued = IssueNow("c");
  ASSERT_TRUE(issued.ok()) << issued.status();
  // a1 or a2 (PRO) ranks first and is refused at commit; the FREE account it holds serves it.
  EXPECT_EQ(issued->selection.account_id, "a3");
  EXPECT_EQ(fleet.refusals.load(), 1);
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 1);  // the refused account's lease was given back
  EXPECT_EQ(admission_.Stats()["c"].refused.count("max_accounts"), 0u);  // served: no refusal counted
}

TEST_F(CallerIssuerTest, CommitsRefusedAgainAndAgainEndInTheCallersQuotaFailure) {
  auto ledger = std::make_unique<HeldElsewhereLedger>("a1", /*refuse_all=*/true);
  HeldElsewhereLedger& fleet = *ledger;
  admission_.SetLedger(std::move(ledger));
  SetPolicies("c max_accounts=1 retry_after=300ms\n");
  absl::StatusOr<Issued> refused = IssueNow("c");
  ASSERT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  ASSERT_TRUE(ExhaustedCaller(refused.status()).has_value()) << refused.status();
  EXPECT_EQ(ExhaustedCaller(refused.status())->caller, "c");
  EXPECT_EQ(ExhaustedCaller(refused.status())->limit, "max_accounts");
  EXPECT_EQ(RetryDelay(refused.status()), absl::Milliseconds(300));
  EXPECT_EQ(fleet.refusals.load(), TokenIssuerOptions{}.max_attempts);
  int in_flight = 0;
  for (const AccountView& v : pool_.List()) in_flight += v.in_flight;
  EXPECT_EQ(in_flight, 0);  // nothing kept
  EXPECT_EQ(admission_.Stats()["c"].refused["max_accounts"], 1);
  EXPECT_EQ(admission_.Stats()["c"].usage.in_flight, 0);  // the reservation went too
}

TEST_F(CallerIssuerTest, ModelsOutsideThePolicyAndUnlistedCallersArePermissionDenied) {
  SetPolicies("c models=family:3p\n");
  EXPECT_TRUE(absl::IsPermissionDenied(IssueNow("c").status()));
  EXPECT_TRUE(absl::IsPermissionDenied(IssueNow("nobody").status()));
}

TEST_F(CallerIssuerTest, WaitingCallsAreServedByPriorityThenAge) {
  SetPolicies("hold max_inflight=3\nlow priority=low\nhigh priority=high\n");
  std::vector<Issued> held;
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Issued> h = IssueNow("hold");
    ASSERT_TRUE(h.ok()) << h.status();
    held.push_back(*h);
  }
  // Every account is at its cap. A low-priority call waits first, then a high-priority one.
  Answer low, high;
  issuer_->Issue(Request("low", absl::Seconds(30), &low), low.Done());
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  issuer_->Issue(Request("high", absl::Seconds(30), &high), high.Done());
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 2; }));
  // One account frees: the high-priority call gets it although it came second.
  Report(held[0], "hold");
  absl::StatusOr<Issued> got = high.Get();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  EXPECT_FALSE(low.done());
  Report(held[1], "hold");
  EXPECT_TRUE(low.Get().ok());
  issuer_->Forget(&low);
  issuer_->Forget(&high);
}

TEST_F(CallerIssuerTest, ACallerOverItsBudgetWaitsWithoutAReservationAndIsBoundedInWaiters) {
  SetPolicies("c max_inflight=1 max_waiting=1 retry_after=5s\n");
  absl::StatusOr<Issued> first = IssueNow("c");
  ASSERT_TRUE(first.ok());
  Answer waiter, refused;
  issuer_->Issue(Request("c", absl::Seconds(30), &waiter), waiter.Done());
  ASSERT_TRUE(Eventually([&] { return issuer_->waiting() == 1; }));
  EXPECT_EQ(admission_.Stats()["c"].usage.in_flight, 1);  // the waiter holds no reservation
  issuer_->Issue(Request("c", absl::Seconds(30), &refused), refused.Done());
  absl::StatusOr<Issued> r = refused.Get();
  ASSERT_TRUE(absl::IsResourceExhausted(r.status())) << r.status();
  EXPECT_EQ(ExhaustedCaller(r.status())->limit, "max_waiting");
  // Its own lease reported: the waiter is served at once.
  Report(*first, "c");
  EXPECT_TRUE(waiter.Get().ok());
  issuer_->Forget(&waiter);
  issuer_->Forget(&refused);
}

TEST_F(CallerIssuerTest, WithoutPoliciesNothingChanges) {
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<Issued> issued = IssueNow("anyone");
    ASSERT_TRUE(issued.ok()) << issued.status();
    EXPECT_EQ(issued->caller_policy, "");
    EXPECT_FALSE(issued->caller_leases_left.has_value());
  }
  EXPECT_TRUE(admission_.Stats().empty());
}

}  // namespace
}  // namespace tokenbroker
