#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lib/common/clock.h"
#include "tests/fakes/fake_quota.h"

namespace tokenbroker::testing {

// A scripted answer that replaces the normal one.
struct ScriptedReply {
  int status = 500;
  std::string body;
  absl::Duration delay = absl::ZeroDuration();  // wait before answering (a slow upstream)
  int times = 1;                                // how many requests it answers; 0 = forever
  std::string match;  // for /token: only this refresh token; empty matches any request
};

// What Cloud Code says about the account behind a refresh token.
struct AccountProfile {
  std::string project;  // empty: loadCodeAssist answers without cloudaicompanionProject
  std::string tier_id = "free-tier";
  std::string models_json = "{}";  // the "models" object of fetchAvailableModels
  FamilyBudgets budgets;  // with quota accounting on: overrides the tier's budgets per family
  // With quota accounting off: retrieveUserQuotaSummary's answer as it is (empty: no groups).
  std::string summary_json;
  // Google suspended the account: every Cloud Code call answers 403 "violation of Terms of Service".
  bool suspended = false;
  // Onboarding (for an account without `project`): onboardUser starts an operation that is done
  // after `onboard_polls` polls of it (GET /v1internal/operations/...; 0: done at once) and yields
  // `onboard_project` (default "onboarded-<n>"), which loadCodeAssist names from then on; with
  // `onboard_error` set the operation ends in that error instead.
  std::string onboard_project;
  int onboard_polls = 0;
  std::string onboard_error;
  // false: retrieveUserQuotaSummary answers 404 (not offered).
  bool quota_summary = true;
  // The "buckets" array retrieveUserQuota answers; empty: 404 (not offered).
  std::string user_quota_json;
  // generateContent asking for credits (enabledCreditTypes) answers 429
  // INSUFFICIENT_G1_CREDITS_BALANCE, naming a reset credits_reset_s seconds away.
  bool credits_exhausted = false;
  int credits_reset_s = 3600;
  // Set: loadCodeAssist allows no tier and names this reason in ineligibleTiers[] (tier-ineligible).
  std::string ineligible_reason;
};

// A real HTTP/1.1 server on loopback that answers like Google's OAuth token endpoint
// (POST /token) and Cloud Code (POST /v1internal:loadCodeAssist, /v1internal:fetchAvailableModels,
// /v1internal:retrieveUserQuotaSummary, /v1internal:retrieveUserQuota, /v1internal:onboardUser with
// GET /v1internal/operations/<id>, and /v1internal:generateContent for example proxies).
// Every refresh token is accepted unless a reply is scripted. Tests script failures and read call
// counts through the methods here, or over HTTP through /__fake/* (see fake_upstream_main.cc).
// Quota accounting (FakeQuota) is off until ConfigureQuota: every generateContent answers 200 and
// fetchAvailableModels answers the profile's models as they are.
// Thread-safe.
class FakeUpstream {
 public:
  struct Options {
    std::string host = "127.0.0.1";
    int port = 0;  // 0: any free port
    int expires_in = 3599;
    const Clock* clock = &Clock::Real();  // quota time; must outlive the server
  };
  static absl::StatusOr<std::unique_ptr<FakeUpstream>> Start(Options options);
  ~FakeUpstream();

  int port() const { return port_; }
  std::string base_url() const;
  std::string token_url() const { return base_url() + "/token"; }

  void Script(const std::string& path, ScriptedReply reply);
  void SetExpiresIn(int seconds);
  void SetProfile(const std::string& refresh_token, AccountProfile profile);
  // Turns quota accounting on (or off with enabled = false) and starts it afresh: no spends, no counts.
  void ConfigureQuota(FakeQuotaConfig config);
  // Quota ground truth as JSON (what GET /__fake/quota_stats returns; see FakeQuota::StatsJson).
  std::string QuotaStatsJson() const;

  int64_t Calls(const std::string& path) const;
  int64_t TokenCallsFor(const std::string& refresh_token) const;
  // Calls to `path` made for the account behind `refresh_token` (by form or bearer token).
  int64_t CallsFor(const std::string& path, const std::string& refresh_token) const;
  // The addresses calls to `path` for that account came from, with their counts.
  std::map<std::string, int64_t> PeersFor(const std::string& path, const std::string& refresh_token) const;
  std::vector<std::string> IssuedAccessTokens() const;
  // Requests being answered right now, and the most ever at once, per path.
  int64_t MaxInFlight(const std::string& path) const;
  // The most requests to `path` ever answered at once for the account behind `refresh_token`
  // (fleet-wide admission: concurrent generateContent calls per account).
  int64_t MaxInFlightFor(const std::string& path, const std::string& refresh_token) const;
  // Everything above as JSON (what GET /__fake/stats returns).
  std::string StatsJson() const;

 private:
  struct Response {
    int status = 200;
    std::string body;
  };
  FakeUpstream(Options options, int listen_fd, int port);
  void AcceptLoop();
  void Serve(int fd);
  // `peer`: the address the request came from (which egress it left through).
  Response Handle(const std::string& method, const std::string& path,
                  const std::map<std::string, std::string>& headers, const std::string& body,
                  const std::string& peer = "");
  Response HandleToken(const std::string& body);
  Response HandleCloudCode(const std::string& path, const std::map<std::string, std::string>& headers,
                           const std::string& body);
  Response HandleAdmin(const std::string& path, const std::string& body);
  Response HandleOnboard(const std::string& account, const AccountProfile& profile, const std::string& body);
  Response HandleOperation(const std::string& account, const std::string& path);
  Response FinishOperationLocked(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct Operation {
    std::string account;  // the refresh token that started it
    int polls_left = 0;
    std::string project;
    std::string error;
  };

  const Options options_;
  const int listen_fd_;
  const int port_;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;
  FakeQuota quota_;

  mutable absl::Mutex mu_;
  // One thread per connection; finished ones are joined as new connections come.
  std::map<int64_t, std::thread> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> finished_workers_ ABSL_GUARDED_BY(mu_);
  int64_t next_worker_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, std::vector<ScriptedReply>> scripts_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> calls_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> in_flight_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> max_in_flight_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> token_calls_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::map<std::string, int64_t>> account_calls_ ABSL_GUARDED_BY(mu_);
  // Per path, per account (refresh token): requests being answered now, and the most at once.
  std::map<std::string, std::map<std::string, int64_t>> account_in_flight_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::map<std::string, int64_t>> account_max_in_flight_ ABSL_GUARDED_BY(mu_);
  // path -> account -> peer address -> calls (bounded by the accounts and addresses tests use).
  std::map<std::string, std::map<std::string, std::map<std::string, int64_t>>> account_peers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, AccountProfile> profiles_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> access_to_refresh_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> issued_ ABSL_GUARDED_BY(mu_);
  int expires_in_ ABSL_GUARDED_BY(mu_);
  int64_t next_token_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<std::string, Operation> operations_ ABSL_GUARDED_BY(mu_);  // onboardUser's, at most 1000
  int64_t next_operation_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace tokenbroker::testing
