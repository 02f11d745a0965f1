// fake_upstream: the fake Google OAuth + Cloud Code server as a process, for the demo and the
// end-to-end tests. It prints nothing secret; tests script it over HTTP:
//   POST /__fake/script      {"path":"/token","match":"<refresh token>","status":400,
//                             "body":"{...}","delay_ms":0,"times":1}   (times 0 = forever)
//   POST /__fake/expires_in  {"seconds":3599}
//   POST /__fake/profile     {"refresh_token":"...","project":"p","tier":"g1-ultra-tier","models":{...},
//                             "budgets":{"gemini":{"short":20,"long":50}},   (budgets: optional, per family)
//                             "summary":{"groups":[...]},  (retrieveUserQuotaSummary's answer, accounting off)
//                             "suspended":true,            (every Cloud Code call: 403 Terms of Service)
//                             "onboard_project":"p","onboard_polls":2,"onboard_error":"...",
//                             "quota_summary":false,"user_quota":[{"modelId":...}],
//                             "credits_exhausted":true,"credits_reset_s":3600}   (all optional; AccountProfile)
//   GET  /__fake/stats       call counts per path and per refresh token, requests in flight and the most
//                            at once (per path, and per path and refresh token), issued access tokens
//   POST /__fake/quota       quota accounting on (or {"enabled":false}: off, the default), afresh:
//                            {"short_window_s":3, "long_window_s":9, "lag_ms":0,
//                             "models":["gemini-3-pro-high","claude-sonnet-4-6-thinking",...],
//                             "family_rules":[{"contains":"claude","family":"3p"},{"contains":"gpt","family":"3p"}],
//                             "default_family":"gemini",
//                             "budgets":{"ULTRA":{"gemini":{"short":20,"long":50},"3p":{"short":10,"long":25}},
//                                        "PRO":{...},"FREE":{...}},
//                             "min_over_windows":true, "lie_3p":false}
//                            Every field is optional (defaults: FakeQuotaConfig); "enabled" defaults to
//                            true. Per account, family and window a budget of calls: a window starts at
//                            its first spend and is full again at start + length. generateContent
//                            ({"model":...}) answers Google's 429 QUOTA_EXHAUSTED while a window of the
//                            model's family is spent; fetchAvailableModels (least over the family's
//                            windows, or the short one's with min_over_windows false; 1.0 for 3p with
//                            lie_3p) and retrieveUserQuotaSummary answer the state as of now − lag.
//   GET  /__fake/quota_stats per account, family and window: budget, spent, completed windows and how
//                            full each was at its reset, spent intervals; 200s ("served") and 429s
//                            ("refused") per account and family
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "tests/fakes/fake_upstream.h"

ABSL_FLAG(std::string, host, "127.0.0.1", "Loopback address to listen on.");
ABSL_FLAG(int, port, 0, "Port to listen on; 0 picks a free one.");
ABSL_FLAG(std::string, port_file, "", "If set, the chosen port is written to this file.");
ABSL_FLAG(int, expires_in, 3599, "expires_in of issued access tokens, in seconds.");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Fake Google OAuth token endpoint and Cloud Code API on loopback.");
  absl::ParseCommandLine(argc, argv);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  tokenbroker::testing::FakeUpstream::Options options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.expires_in = absl::GetFlag(FLAGS_expires_in);
  auto upstream = tokenbroker::testing::FakeUpstream::Start(options);
  if (!upstream.ok()) {
    std::cerr << "fake_upstream: " << upstream.status().message() << "\n";
    return 1;
  }
  if (std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    std::string tmp = pf + ".tmp";
    std::ofstream(tmp) << (*upstream)->port() << "\n";
    std::rename(tmp.c_str(), pf.c_str());
  }
  std::cerr << "fake_upstream listening on " << (*upstream)->base_url() << "\n";
  int sig = 0;
  sigwait(&set, &sig);
  return 0;
}
