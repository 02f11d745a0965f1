// fake_upstream: the fake Google OAuth + Cloud Code server as a process, for the demo and the
// end-to-end tests. It prints nothing secret; tests script it over HTTP:
//   POST /__fake/script      {"path":"/token","match":"<refresh token>","status":400,
//                             "body":"{...}","delay_ms":0,"times":1}   (times 0 = forever)
//   POST /__fake/expires_in  {"seconds":3599}
//   POST /__fake/profile     {"refresh_token":"...","project":"p","tier":"g1-ultra-tier","models":{...}}
//   GET  /__fake/stats       call counts per path and per refresh token, issued access tokens
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
