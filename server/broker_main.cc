// tokenbroker: the broker binary. Its flags become a BrokerConfig, the BrokerApp owns and wires
// the parts (account store, pool, token manager, quota validation, gRPC servers); then it waits
// for SIGTERM/SIGINT and drains.
#include <memory>
#include <string>

#include "server/runtime/broker_app.h"
#include "server/runtime/broker_config.h"
#include "server/runtime/command_line.h"
#include "server/runtime/flags.h"
#include "server/runtime/signals.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr char kProgram[] = "tokenbroker";

int Run() {
  absl::StatusOr<BrokerConfig> config = BrokerConfigFromFlags();
  if (!config.ok()) return FailStartup(kProgram, std::string(config.status().message()));
  const absl::Duration drain_timeout = config->drain_timeout;
  absl::StatusOr<std::unique_ptr<BrokerApp>> app = BrokerApp::Open(*std::move(config));
  if (!app.ok()) return FailStartup(kProgram, std::string(app.status().message()));

  PrepareDaemonProcess();  // before any thread starts

  if (absl::Status started = (*app)->Start(); !started.ok()) {
    (*app)->Stop();
    return FailStartup(kProgram, std::string(started.message()));
  }
  std::string signal;
  while ((signal = WaitForStopSignal((*app)->tick_interval())).empty()) (*app)->Tick();
  spdlog::info("received {}; draining for up to {}", signal, absl::FormatDuration(drain_timeout));
  (*app)->Stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace
}  // namespace tokenbroker

int main(int argc, char** argv) {
  tokenbroker::ParseFlagsOrExit(
      argc, argv,
      {.program = "tokenbroker",
       .usage = "tokenbroker: hands out fresh Google OAuth access tokens of the best account, request by request.\n"
                "\n"
                "Usage: tokenbroker --accounts_dir=DIR [--listen=127.0.0.1:50051] [flags]\n"
                "\n"
                "Environment: TOKENBROKER_OAUTH_CLIENT_ID and TOKENBROKER_OAUTH_CLIENT_SECRET (the OAuth client the\n"
                "accounts were authorised with), TOKENBROKER_REDIS_PASSWORD (with a Redis --state_backend).\n"
                "Exit status: 0 after SIGTERM/SIGINT and a drain; 2 for a bad flag or configuration (one line on\n"
                "stderr names it)."});
  return tokenbroker::Run();
}
