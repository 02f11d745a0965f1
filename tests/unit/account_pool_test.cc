#include "lib/selection/account_pool.h"

#include <map>
#include <random>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/test_util.h"
#include "lib/common/errors.h"

namespace tokenbroker {
namespace {

using ::testing::HasSubstr;

AccountRecord Account(const std::string& id, Tier tier) { return testing::MakeAccount(id, tier); }

AccountRecord WithQuota(AccountRecord r, const std::string& model, double fraction,
                        std::optional<absl::Time> reset = std::nullopt) {
  r.quotas.push_back(ModelQuota{model, fraction, reset});
  return r;
}

SelectRequest Req(const std::string& model, const std::string& session = "", bool rotate = false) {
  SelectRequest r;
  r.model = model;
  r.session_id = session;
  r.force_rotate = rotate;
  return r;
}

std::string Pick(AccountPool& pool, const SelectRequest& r) {
  absl::StatusOr<Selection> s = pool.Select(r);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? s->account_id : "";
}

PoolOptions WithPolicy(Policy p) {
  PoolOptions o;
  o.policy = p;
  return o;
}

TEST(AccountPool, EmptyPoolIsUnavailable) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(s.status().message(), HasSubstr("no accounts are loaded"));
}

TEST(AccountPool, ServesTiersInOrderUltraProFree) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord ultra = Account("u", Tier::kUltra);
  ultra.protected_models = {"only-pro-and-free", "only-free"};
  AccountRecord pro = Account("p", Tier::kPro);
  pro.protected_models = {"only-free"};
  pool.Load({Account("f", Tier::kFree), pro, ultra, Account("x", Tier::kUnknown)});
  for (int i = 0; i < 5; ++i) EXPECT_EQ(Pick(pool, Req("m")), "u");
  EXPECT_EQ(Pick(pool, Req("only-pro-and-free")), "p");
  EXPECT_EQ(Pick(pool, Req("only-free")), "f");
}

TEST(AccountPool, SkipsDisabledProxyDisabledAndProtected) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord a = Account("a", Tier::kUltra);
  a.disabled = true;
  a.disabled_reason = "invalid_grant: revoked";
  AccountRecord b = Account("b", Tier::kUltra);
  b.proxy_disabled = true;
  AccountRecord c = Account("c", Tier::kUltra);
  c.protected_models = {"m"};
  pool.Load({a, b, c, Account("d", Tier::kFree)});
  EXPECT_EQ(pool.UsableCount(), 2u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Pick(pool, Req("m")), "d");
  EXPECT_EQ(Pick(pool, Req("other")), "c");

  Explanation e = pool.Explain(Req("m"));
  EXPECT_EQ(e.chosen_account_id, "d");
  std::map<std::string, AccountVerdict> by_id;
  for (const AccountVerdict& v : e.accounts) by_id[v.account_id] = v;
  EXPECT_EQ(by_id["a"].verdict, Verdict::kDisabled);
  EXPECT_THAT(by_id["a"].detail, HasSubstr("invalid_grant"));
  EXPECT_EQ(by_id["b"].verdict, Verdict::kProxyDisabled);
  EXPECT_EQ(by_id["c"].verdict, Verdict::kProtected);
  EXPECT_THAT(by_id["c"].detail, HasSubstr("protected_models"));
  EXPECT_EQ(by_id["d"].verdict, Verdict::kChosen);
  EXPECT_EQ(by_id["d"].rank, 1);
  EXPECT_EQ(e.accounts.front().account_id, "d");
}

TEST(AccountPool, NothingEligibleIsResourceExhaustedWithCounts) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord a = Account("a", Tier::kPro);
  a.disabled = true;
  AccountRecord b = Account("b", Tier::kPro);
  b.protected_models = {"m"};
  pool.Load({a, b});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(s.status().message(), HasSubstr("1 disabled"));
  EXPECT_THAT(s.status().message(), HasSubstr("1 protected for this model"));
}

TEST(AccountPool, SessionStaysOnItsAccountAndForceRotateMovesIt) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("u1", Tier::kUltra), Account("u2", Tier::kUltra), Account("u3", Tier::kUltra)});
  std::string first = Pick(pool, Req("m", "s1"));
  for (int i = 0; i < 10; ++i) {
    // Other traffic moves "least recently used" around; the session does not follow it.
    Pick(pool, Req("m"));
    absl::StatusOr<Selection> s = pool.Select(Req("m", "s1"));
    ASSERT_TRUE(s.ok());
    EXPECT_EQ(s->account_id, first);
    EXPECT_TRUE(s->from_session);
  }
  std::string moved = Pick(pool, Req("m", "s1", /*rotate=*/true));
  EXPECT_NE(moved, first);
  // The session is now bound to the new account.
  EXPECT_EQ(Pick(pool, Req("m", "s1")), moved);
  auto counts = pool.RebindCounts();
  EXPECT_EQ(counts["new"], 1);
  EXPECT_EQ(counts["force_rotate"], 1);
}

TEST(AccountPool, ForceRotateWithNoAlternativeKeepsTheOnlyAccount) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("only", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m", "s")), "only");
  EXPECT_EQ(Pick(pool, Req("m", "s", true)), "only");
}

TEST(AccountPool, SessionMovesWhenItsAccountBecomesIneligible) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("u1", Tier::kUltra), Account("p1", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m", "s")), "u1");
  pool.Disable("u1", "invalid_grant: revoked");
  EXPECT_EQ(Pick(pool, Req("m", "s")), "p1");
  EXPECT_EQ(pool.RebindCounts()["ineligible"], 1);
}

TEST(AccountPool, SessionBindingExpiresAfterIdleTtl) {
  FakeClock clock;
  PoolOptions o;
  o.session_idle_ttl = absl::Minutes(30);
  o.policy = Policy::kRoundRobin;
  AccountPool pool(o, clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  std::string first = Pick(pool, Req("m", "s"));
  clock.Advance(absl::Minutes(29));
  EXPECT_EQ(Pick(pool, Req("m", "s")), first);
  clock.Advance(absl::Minutes(31));
  // Expired: round robin moves on to the other account.
  EXPECT_NE(Pick(pool, Req("m", "s")), first);
}

TEST(AccountPool, ForceRotateWithoutSessionMovesAwayFromLastChoiceForModel) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kFillFirst), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m")), "a");
  EXPECT_EQ(Pick(pool, Req("m", "", true)), "b");
  EXPECT_EQ(Pick(pool, Req("m")), "b");  // fill_first now sticks to b
}

TEST(AccountPool, BalancePrefersMostRemainingQuotaForTheRequestedModel) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kBalance), clock);
  // a has plenty of another model but little of m: the requested model decides.
  pool.Load({WithQuota(WithQuota(Account("a", Tier::kPro), "m", 0.2), "other", 1.0),
             WithQuota(Account("b", Tier::kPro), "m", 0.7), WithQuota(Account("c", Tier::kPro), "m", 0.5)});
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Pick(pool, Req("m")), "b");
  EXPECT_EQ(Pick(pool, Req("other")), "a");
}

TEST(AccountPool, BalanceSpreadsByLeastRecentlyUsed) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kBalance), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro), Account("c", Tier::kPro)});
  std::set<std::string> seen;
  for (int i = 0; i < 3; ++i) {
    seen.insert(Pick(pool, Req("m")));
    clock.Advance(absl::Seconds(1));
  }
  EXPECT_EQ(seen.size(), 3u);
}

TEST(AccountPool, FillFirstKeepsTheSameAccount) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kFillFirst), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(Pick(pool, Req("m")), "a");
    clock.Advance(absl::Seconds(1));
  }
  AccountRecord a = Account("a", Tier::kPro);
  a.protected_models = {"m"};
  pool.Load({a, Account("b", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m")), "b");
  // a is eligible again, but fill_first stays on b (its prompt cache is warm).
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m")), "b");
}

TEST(AccountPool, ResetSoonestUsesQuotaThatResetsFirst) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kResetSoonest), clock);
  absl::Time t = clock.Now();
  pool.Load({WithQuota(Account("late", Tier::kPro), "m", 0.9, t + absl::Hours(5)),
             WithQuota(Account("soon", Tier::kPro), "m", 0.3, t + absl::Hours(1)),
             Account("unknown", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m")), "soon");
  Explanation e = pool.Explain(Req("m"));
  ASSERT_EQ(e.accounts.size(), 3u);
  EXPECT_EQ(e.accounts[1].account_id, "late");
  EXPECT_EQ(e.accounts[2].account_id, "unknown");
}

TEST(AccountPool, RoundRobinCyclesWithinTheBestTier) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kRoundRobin), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro), Account("c", Tier::kPro),
             Account("z", Tier::kFree)});
  std::vector<std::string> got;
  for (int i = 0; i < 6; ++i) got.push_back(Pick(pool, Req("m")));
  EXPECT_EQ(got, (std::vector<std::string>{"a", "b", "c", "a", "b", "c"}));
}

TEST(AccountPool, ExcludeLeavesAccountsOut) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("u", Tier::kUltra), Account("p", Tier::kPro)});
  SelectRequest r = Req("m");
  r.exclude.insert("u");
  EXPECT_EQ(Pick(pool, r), "p");
}

TEST(AccountPool, ExplainChangesNothing) {
  FakeClock clock;
  AccountPool pool(WithPolicy(Policy::kRoundRobin), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  for (int i = 0; i < 3; ++i) EXPECT_EQ(pool.Explain(Req("m", "s")).chosen_account_id, "a");
  EXPECT_EQ(Pick(pool, Req("m", "s")), "a");
  Explanation e = pool.Explain(Req("m", "s"));
  EXPECT_TRUE(e.from_session);
  EXPECT_EQ(e.chosen_account_id, "a");
}

TEST(AccountPool, ReloadKeepsRuntimeStateAndNewerTokens) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  EXPECT_EQ(Pick(pool, Req("m", "s")), "a");
  pool.SetToken("a", "ya29.fresh", clock.Now() + absl::Hours(1), std::nullopt);
  pool.Disable("b", "invalid_grant: revoked");
  // The files still hold the old state (say the folder is read-only).
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro), Account("c", Tier::kPro)});
  EXPECT_EQ(pool.size(), 3u);
  auto creds = pool.GetCredentials("a");
  ASSERT_TRUE(creds.ok());
  EXPECT_EQ(creds->access_token, "ya29.fresh");
  EXPECT_TRUE(pool.GetCredentials("b")->disabled);
  EXPECT_EQ(Pick(pool, Req("m", "s")), "a");  // the session survived the reload
  pool.Load({Account("c", Tier::kPro)});
  EXPECT_EQ(pool.GetCredentials("a").status().code(), absl::StatusCode::kNotFound);
}

TEST(AccountPool, ListCarriesStateButNoSecrets) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord a = Account("a", Tier::kUltra);
  a.access_token = "ya29.secret";
  a.access_expiry = clock.Now() + absl::Hours(1);
  pool.Load({a});
  Pick(pool, Req("m", "s"));
  std::vector<AccountView> views = pool.List();
  ASSERT_EQ(views.size(), 1u);
  EXPECT_EQ(views[0].bound_sessions, 1);
  EXPECT_EQ(views[0].token_expiry, clock.Now() + absl::Hours(1));
  EXPECT_EQ(views[0].last_used, clock.Now());
}

TEST(AccountPool, ExpiringBeforeListsUsableAccountsOnly) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord fresh = Account("fresh", Tier::kPro);
  fresh.access_token = "t";
  fresh.access_expiry = clock.Now() + absl::Hours(1);
  AccountRecord stale = Account("stale", Tier::kPro);
  stale.access_token = "t";
  stale.access_expiry = clock.Now() + absl::Minutes(5);
  AccountRecord dead = Account("dead", Tier::kPro);
  dead.disabled = true;
  pool.Load({fresh, stale, dead, Account("none", Tier::kPro)});
  EXPECT_EQ(pool.ExpiringBefore(clock.Now() + absl::Minutes(15)),
            (std::vector<std::string>{"none", "stale"}));
}

Outcome Report(const std::string& lease, int status, const std::string& retry_after = "",
               const std::string& body = "") {
  Outcome o;
  o.lease_id = lease;
  o.http_status = status;
  o.retry_after = retry_after;
  o.error_body = body;
  return o;
}

constexpr char kQuota429[] = R"({"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You have exhausted your capacity on this model.",
  "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"QUOTA_EXHAUSTED","metadata":{"quotaResetDelay":"2h"}}]}})";

TEST(AccountPoolOutcomes, QuotaExhaustedSkipsTheAccountForThatModelOnly) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kUltra), Account("b", Tier::kPro)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(s->account_id, "a");
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(Report(s->lease_id, 429, "", kQuota429));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->account_id, "a");
  EXPECT_EQ(r->model, "m");
  EXPECT_EQ(r->scope, CooldownScope::kModel);
  EXPECT_EQ(r->until, clock.Now() + absl::Hours(2));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(Pick(pool, Req("m")), "b");
  EXPECT_EQ(Pick(pool, Req("n")), "a");
  clock.Advance(absl::Hours(2));
  EXPECT_EQ(Pick(pool, Req("m")), "a");
}

TEST(AccountPoolOutcomes, NothingEligibleGivesTheExactDelayToTheEarliestAccount) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro), Account("b", Tier::kPro)});
  absl::StatusOr<Selection> s1 = pool.Select(Req("m"));
  absl::StatusOr<Selection> s2 = pool.Select(Req("m"));
  ASSERT_TRUE(pool.ReportOutcome(Report(s1->lease_id, 429, "300")).ok());
  ASSERT_TRUE(pool.ReportOutcome(Report(s2->lease_id, 429, "90.5")).ok());
  clock.Advance(absl::Seconds(10));
  absl::StatusOr<Selection> none = pool.Select(Req("m"));
  ASSERT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(RetryDelay(none.status()), absl::Milliseconds(80500));
  EXPECT_EQ(ExhaustedModel(none.status()), "m");
  EXPECT_THAT(none.status().message(), HasSubstr("2 cooling down"));
  EXPECT_THAT(none.status().message(), HasSubstr("frees in 1m20.5s"));
}

TEST(AccountPoolOutcomes, NoRetryDelayWhenNothingWillFreeByItself) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord a = Account("a", Tier::kPro);
  a.disabled = true;
  pool.Load({a});
  absl::StatusOr<Selection> none = pool.Select(Req("m"));
  ASSERT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(RetryDelay(none.status()).has_value());
}

TEST(AccountPoolOutcomes, LeaseCapSkipsBusyAccountsUntilLeasesEnd) {
  FakeClock clock;
  PoolOptions o;
  o.max_inflight_per_account = 2;
  o.lease_timeout = absl::Minutes(1);
  AccountPool pool(o, clock);
  pool.Load({Account("a", Tier::kPro)});
  absl::StatusOr<Selection> l1 = pool.Select(Req("m"));
  absl::StatusOr<Selection> l2 = pool.Select(Req("m"));
  ASSERT_TRUE(l1.ok() && l2.ok());
  absl::StatusOr<Selection> full = pool.Select(Req("m"));
  ASSERT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(RetryDelay(full.status()), absl::Minutes(1));
  Explanation e = pool.Explain(Req("m"));
  ASSERT_EQ(e.accounts.size(), 1u);
  EXPECT_EQ(e.accounts[0].verdict, Verdict::kLeaseCap);
  EXPECT_THAT(e.accounts[0].detail, HasSubstr("2 leases in flight (cap 2)"));
  // A report ends a lease.
  ASSERT_TRUE(pool.ReportOutcome(Report(l1->lease_id, 200)).ok());
  EXPECT_TRUE(pool.Select(Req("m")).ok());
  // A lease never reported times out.
  clock.Advance(absl::Minutes(1));
  EXPECT_TRUE(pool.Select(Req("m")).ok());
  EXPECT_EQ(pool.List()[0].in_flight, 1);
}

TEST(AccountPoolOutcomes, ReleaseLeaseFreesTheSlot) {
  FakeClock clock;
  PoolOptions o;
  o.max_inflight_per_account = 1;
  AccountPool pool(o, clock);
  pool.Load({Account("a", Tier::kPro)});
  absl::StatusOr<Selection> l1 = pool.Select(Req("m"));
  ASSERT_FALSE(pool.Select(Req("m")).ok());
  pool.ReleaseLease(l1->lease_id);
  EXPECT_TRUE(pool.Select(Req("m")).ok());
}

TEST(AccountPoolOutcomes, HalfOpenLetsOneProbeThroughAfterTheCooldown) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kUltra), Account("b", Tier::kPro)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_TRUE(pool.ReportOutcome(Report(s->lease_id, 429, "30")).ok());
  clock.Advance(absl::Seconds(30));
  absl::StatusOr<Selection> probe = pool.Select(Req("m"));
  ASSERT_TRUE(probe.ok());
  EXPECT_EQ(probe->account_id, "a");
  // While the probe is out, others go to b.
  EXPECT_EQ(Pick(pool, Req("m")), "b");
  Explanation e = pool.Explain(Req("m"));
  EXPECT_EQ(e.accounts.back().account_id, "a");
  EXPECT_EQ(e.accounts.back().verdict, Verdict::kCooldown);
  EXPECT_THAT(e.accounts.back().detail, HasSubstr("probe"));
  ASSERT_TRUE(pool.ReportOutcome(Report(probe->lease_id, 200)).ok());
  EXPECT_EQ(Pick(pool, Req("m")), "a");
  EXPECT_EQ(Pick(pool, Req("m")), "a");
}

TEST(AccountPoolOutcomes, ReportByAccountAndModelAndErrors) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro)});
  Outcome o;
  o.account_id = "a";
  o.model = "m";
  o.http_status = 429;
  o.retry_after = "60";
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->until, clock.Now() + absl::Seconds(60));
  o.account_id = "nobody";
  EXPECT_EQ(pool.ReportOutcome(o).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(pool.ReportOutcome(Report("l-unknown", 200)).status().code(), absl::StatusCode::kNotFound);
  Outcome no_model;
  no_model.account_id = "a";
  no_model.http_status = 200;
  EXPECT_EQ(pool.ReportOutcome(no_model).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(AccountPoolOutcomes, UnauthorizedDropsTheTokenAndReportedInvalidGrantNeverDisables) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  AccountRecord a = Account("a", Tier::kPro);
  a.access_token = "ya29.x";
  a.access_expiry = clock.Now() + absl::Hours(1);
  pool.Load({a, Account("b", Tier::kFree)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(Report(s->lease_id, 401));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->scope, CooldownScope::kAccount);
  EXPECT_TRUE(pool.GetCredentials("a")->access_token.empty());
  s = pool.Select(Req("m"));
  ASSERT_EQ(s->account_id, "a");
  r = pool.ReportOutcome(Report(s->lease_id, 400, "", R"({"error":"invalid_grant","error_description":"Token has been expired or revoked."})"));
  ASSERT_TRUE(r.ok());
  // A caller's word: the account cools down and its token is dropped (the broker's own refresh
  // decides), but it is not disabled.
  EXPECT_EQ(r->scope, CooldownScope::kAccount);
  EXPECT_FALSE(pool.GetCredentials("a")->disabled);
  EXPECT_TRUE(pool.GetCredentials("a")->access_token.empty());
  EXPECT_EQ(Pick(pool, Req("m")), "b");
  for (const AccountView& v : pool.List()) EXPECT_FALSE(v.disabled) << v.account_id;
}

// Issue 11 item 1: a 400 whose body merely mentions invalid_grant is the request's fault.
TEST(AccountPoolOutcomes, AReportNeverDisablesAnAccount) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro)});
  for (const std::string& body :
       {std::string(R"({"error":{"code":400,"message":"Invalid JSON payload received. Unknown name \"invalid_grant\"","status":"INVALID_ARGUMENT"}})"),
        std::string(R"({"error":"invalid_grant"})"), std::string("invalid_grant")}) {
    for (int status : {400, 401, 403, 429, 500}) {
      absl::StatusOr<Selection> s = pool.Select(Req("m"));
      if (!s.ok()) {
        clock.Advance(absl::Hours(3));
        s = pool.Select(Req("m"));
      }
      ASSERT_TRUE(s.ok()) << s.status();
      ASSERT_TRUE(pool.ReportOutcome(Report(s->lease_id, status, "", body)).ok());
      EXPECT_FALSE(pool.GetCredentials("a")->disabled) << status << " " << body;
      clock.Advance(absl::Hours(3));
    }
  }
}

// Issue 11 item 5: an operator undoes what reports and a refresh's invalid_grant did.
TEST(AccountPoolOutcomes, ResetLiftsCooldownsAndDisables) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_TRUE(pool.ReportOutcome(Report(s->lease_id, 429, "3600")).ok());
  ASSERT_FALSE(pool.Select(Req("m")).ok());
  absl::StatusOr<ResetResult> r = pool.Reset({"a", "m", false});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->cooldown_lifted);
  EXPECT_FALSE(r->enabled);
  EXPECT_EQ(Pick(pool, Req("m")), "a");
  pool.Disable("a", "invalid_grant: revoked");
  ASSERT_FALSE(pool.Select(Req("m")).ok());
  r = pool.Reset({"a", "", /*enable=*/true});
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->enabled);
  EXPECT_EQ(Pick(pool, Req("m")), "a");
  EXPECT_EQ(pool.Reset({"nobody", "", false}).status().code(), absl::StatusCode::kNotFound);
}

// Issue 11 item 3: a lease is reported only by the caller it was issued to; naming an account
// needs may_name_account; a refused report changes nothing.
TEST(AccountPoolOutcomes, ReportsAreBoundToTheLeasesCaller) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro)});
  SelectRequest req = Req("m");
  req.caller = "proxy-b";
  absl::StatusOr<Selection> s = pool.Select(req);
  ASSERT_TRUE(s.ok());
  Outcome hostile = Report(s->lease_id, 429, "3600");
  hostile.caller = "proxy-a";
  hostile.may_report_any_lease = false;
  hostile.may_name_account = false;
  EXPECT_EQ(pool.ReportOutcome(hostile).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Pick(pool, Req("m")), "a");  // no cooldown came of it
  EXPECT_EQ(pool.List()[0].in_flight, 2);  // and the lease is still out (plus Pick's)
  Outcome by_name = hostile;
  by_name.lease_id.clear();
  by_name.account_id = "a";
  by_name.model = "m";
  EXPECT_EQ(pool.ReportOutcome(by_name).status().code(), absl::StatusCode::kPermissionDenied);
  // An unknown lease does not fall back to the account named beside it.
  by_name.lease_id = "l-0000000000000001" + CallerTag("proxy-a") + std::string(24, '0');
  EXPECT_EQ(pool.ReportOutcome(by_name).status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Pick(pool, Req("m")), "a");
  Outcome owner = hostile;
  owner.caller = "proxy-b";
  absl::StatusOr<OutcomeResult> r = pool.ReportOutcome(owner);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->scope, CooldownScope::kModel);
  EXPECT_FALSE(pool.Select(Req("m")).ok());
}

TEST(AccountPoolOutcomes, ListShowsCooldownsStreakAndValidationUrl) {
  FakeClock clock;
  AccountPool pool(PoolOptions(), clock);
  pool.Load({Account("a", Tier::kPro)});
  absl::StatusOr<Selection> s = pool.Select(Req("m"));
  ASSERT_TRUE(pool.ReportOutcome(Report(s->lease_id, 403, "", R"({"error":{"code":403,"details":[
      {"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"VALIDATION_REQUIRED","metadata":{"validation_url":"https://accounts.google.com/v/9"}}]}})")).ok());
  std::vector<AccountView> views = pool.List();
  ASSERT_EQ(views.size(), 1u);
  EXPECT_EQ(views[0].validation_url, "https://accounts.google.com/v/9");
  EXPECT_EQ(views[0].failure_streak, 1);
  ASSERT_EQ(views[0].cooldowns.size(), 1u);
  EXPECT_EQ(views[0].cooldowns[0].until, clock.Now() + absl::Hours(1));
  EXPECT_EQ(views[0].in_flight, 0);
}

TEST(ParsePolicy, NamesAndErrors) {
  for (Policy p : {Policy::kBalance, Policy::kFillFirst, Policy::kResetSoonest, Policy::kRoundRobin}) {
    EXPECT_EQ(*ParsePolicy(PolicyName(p)), p);
  }
  absl::StatusOr<Policy> bad = ParsePolicy("random");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("balance, fill_first, reset_soonest, round_robin"));
}

}  // namespace
}  // namespace tokenbroker

namespace tokenbroker {
namespace {

// Select takes a fast path (no verdicts); Explain evaluates everything. They must always agree.
TEST(AccountPoolConsistency, SelectChoosesWhatExplainSays) {
  for (Policy policy : {Policy::kBalance, Policy::kFillFirst, Policy::kResetSoonest, Policy::kRoundRobin}) {
    FakeClock clock;
    PoolOptions o;
    o.policy = policy;
    o.max_inflight_per_account = 3;
    AccountPool pool(o, clock);
    std::mt19937 rng(42 + static_cast<int>(policy));
    std::vector<AccountRecord> records;
    for (int i = 0; i < 40; ++i) {
      AccountRecord r = Account("a" + std::to_string(i), static_cast<Tier>(rng() % 4));
      if (rng() % 10 == 0) r.protected_models = {"m0"};
      if (rng() % 15 == 0) r.disabled = true;
      records.push_back(r);
    }
    pool.Load(records);
    QuotaSettings q;
    q.enabled = true;
    pool.SetQuotaSettings(q);
    std::vector<QuotaObservation> obs;
    for (int i = 0; i < 40; ++i) {
      for (int m = 0; m < 2; ++m) {
        QuotaObservation ob;
        ob.account_id = "a" + std::to_string(i);
        ob.model = "m" + std::to_string(m);
        ob.remaining_fraction = (rng() % 20) / 20.0;
        ob.reset_time = clock.Now() + absl::Minutes(rng() % 60);
        ob.observed = clock.Now();
        obs.push_back(ob);
      }
    }
    pool.UpdateQuota(obs);
    for (int step = 0; step < 300; ++step) {
      SelectRequest r = Req("m" + std::to_string(rng() % 2), rng() % 3 ? "s" + std::to_string(rng() % 5) : "",
                            rng() % 7 == 0);
      Explanation e = pool.Explain(r);
      absl::StatusOr<Selection> s = pool.Select(r);
      if (e.chosen_account_id.empty()) {
        EXPECT_FALSE(s.ok()) << PolicyName(policy) << " step " << step;
        continue;
      }
      ASSERT_TRUE(s.ok()) << s.status();
      EXPECT_EQ(s->account_id, e.chosen_account_id) << PolicyName(policy) << " step " << step;
      EXPECT_EQ(s->from_session, e.from_session) << PolicyName(policy) << " step " << step;
      if (rng() % 4 == 0) {
        (void)pool.ReportOutcome(Report(s->lease_id, rng() % 2 ? 200 : 429, std::to_string(rng() % 30)));
      } else if (rng() % 2) {
        pool.ReleaseLease(s->lease_id);
      }
      if (step % 25 == 0) {  // fresh quota for some accounts: their rank changes under the index
        std::vector<QuotaObservation> update;
        for (int k = 0; k < 8; ++k) {
          QuotaObservation ob;
          ob.account_id = "a" + std::to_string(rng() % 40);
          ob.model = "m" + std::to_string(rng() % 2);
          ob.remaining_fraction = (rng() % 20) / 20.0;
          ob.reset_time = clock.Now() + absl::Minutes(rng() % 60);
          ob.observed = clock.Now();
          update.push_back(ob);
        }
        pool.UpdateQuota(update);
      }
      clock.Advance(absl::Seconds(rng() % 5));
    }
  }
}

}  // namespace
}  // namespace tokenbroker

namespace tokenbroker {
namespace {

// Callers need not report their leases: past PoolOptions::max_leases the pool ends the biggest
// holder's oldest leases (as if timed out: the account's in-flight count drops, a report of one is
// NOT_FOUND) and counts them, instead of growing.
TEST(AccountPool, LeasesInFlightStayWithinMaxLeases) {
  FakeClock clock;
  PoolOptions options;
  options.max_leases = 3;
  AccountPool pool(options, clock);
  pool.Load({testing::MakeAccount("a", Tier::kPro), testing::MakeAccount("b", Tier::kPro)});
  SelectRequest r;
  r.model = "gemini-3-pro-high";
  r.caller = "flood";
  std::vector<std::string> leases;
  for (int i = 0; i < 100; ++i) {
    absl::StatusOr<Selection> s = pool.Select(r);
    ASSERT_TRUE(s.ok()) << s.status();
    leases.push_back(s->lease_id);
    clock.Advance(absl::Milliseconds(10));
    int in_flight = 0;
    for (const AccountView& v : pool.List()) in_flight += v.in_flight;
    ASSERT_LE(in_flight, 3) << i;
  }
  EXPECT_EQ(pool.LeasesEvicted(), 97);
  Outcome early;
  early.lease_id = leases[0];
  early.http_status = 200;
  EXPECT_EQ(pool.ReportOutcome(early).status().code(), absl::StatusCode::kNotFound);
  Outcome last = early;
  last.lease_id = leases.back();
  EXPECT_TRUE(pool.ReportOutcome(last).ok());
}

}  // namespace
}  // namespace tokenbroker
