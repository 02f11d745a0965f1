// The gRPC floor for the load benchmark: a TokenBrokerService whose GetToken answers at once with a
// canned response the size of a real one, so the load generator drives both servers the same way.
//   echo_server --listen=127.0.0.1:0 --port_file=F
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/synchronization/mutex.h"
#include "tests/bench/echo_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0", "host:port or unix:path");
ABSL_FLAG(std::string, port_file, "", "where to write the bound port");
ABSL_FLAG(int, answer_bytes, 0,
          "the answer's size on the wire (gRPC's 5-byte prefix included), e.g. the broker's, measured; 0: a "
          "real token's size");


int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  // The floor runs as the broker's release binary does (PrepareDaemonProcess): without Abseil's
  // per-lock deadlock detection, which Debian's Abseil leaves on and gRPC's own mutexes pay for.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  tokenbroker::bench::EchoService service(absl::GetFlag(FLAGS_answer_bytes));
  grpc::ServerBuilder builder;
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int port = 0;
  builder.AddListeningPort(absl::GetFlag(FLAGS_listen), grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    std::cerr << "echo_server: cannot listen on " << absl::GetFlag(FLAGS_listen) << "\n";
    return 2;
  }
  if (std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    std::ofstream(pf + ".tmp") << port << "\n";
    std::rename((pf + ".tmp").c_str(), pf.c_str());
  }
  int sig = 0;
  sigwait(&set, &sig);
  server->Shutdown();
  return 0;
}
