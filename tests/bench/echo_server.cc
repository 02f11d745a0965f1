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
#include "tokenbroker/v1/broker.grpc.pb.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0", "host:port or unix:path");
ABSL_FLAG(std::string, port_file, "", "where to write the bound port");
ABSL_FLAG(int, answer_bytes, 0,
          "the answer's size on the wire (gRPC's 5-byte prefix included), e.g. the broker's, measured; 0: a "
          "real token's size");

namespace {

class EchoService final : public tokenbroker::v1::TokenBrokerService::CallbackService {
 public:
  explicit EchoService(int answer_bytes) {
    canned_.set_access_token("ya29.a0AfB_byC" + std::string(180, 'x'));
    canned_.set_account_id("acct-000123");
    canned_.set_email("user000123@example.com");
    canned_.set_project_id("vivid-river-000123");
    canned_.mutable_expire_time()->set_seconds(1795920000);
    canned_.set_tier(tokenbroker::v1::TIER_PRO);
    canned_.set_lease_id("l-0123456789abcdef0123456789abcdef");
    canned_.set_quota_decision(tokenbroker::v1::QUOTA_DECISION_PROCEED);
    canned_.set_remaining_fraction(0.62);
    // The token's length makes the answer as long as asked (a length's varint may take a byte more
    // or less: a few steps settle it).
    for (int step = 0; answer_bytes > 0 && step < 4; ++step) {
      const long missing = answer_bytes - 5 - static_cast<long>(canned_.ByteSizeLong());
      const long token = static_cast<long>(canned_.access_token().size()) + missing;
      if (missing == 0 || token < 1) break;
      canned_.set_access_token("ya29." + std::string(std::max(1L, token - 5), 'x'));
    }
  }
  grpc::ServerUnaryReactor* GetToken(grpc::CallbackServerContext* context, const tokenbroker::v1::GetTokenRequest*,
                                     tokenbroker::v1::GetTokenResponse* response) override {
    *response = canned_;
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  tokenbroker::v1::GetTokenResponse canned_;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  EchoService service(absl::GetFlag(FLAGS_answer_bytes));
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
