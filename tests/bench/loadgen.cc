// A closed-loop gRPC load generator: `concurrency` callers spread over `channels` channels each keep
// one GetToken in flight for `duration`, and the exact latency of every call is kept, so the
// percentiles come from all of them. Prints one JSON line.
//   loadgen --target=127.0.0.1:50051 --concurrency=64 --channels=4 --duration=5s
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tokenbroker/v1/broker.grpc.pb.h"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "server address");
ABSL_FLAG(int, concurrency, 64, "calls in flight");
ABSL_FLAG(int, channels, 4, "channels (connections) the calls are spread over");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(5), "how long to run");
ABSL_FLAG(std::string, model, "gemini-3-pro-high", "model to ask for");
ABSL_FLAG(int, sessions, 0, "session ids the calls cycle through (0: calls carry no session)");

namespace {

using tokenbroker::v1::GetTokenRequest;
using tokenbroker::v1::GetTokenResponse;
using tokenbroker::v1::TokenBrokerService;

struct Caller {
  TokenBrokerService::Stub* stub = nullptr;
  GetTokenRequest request;
  GetTokenResponse response;
  std::unique_ptr<grpc::ClientContext> context;
  std::chrono::steady_clock::time_point started;
  std::vector<uint32_t> latencies_us;  // only this caller's callbacks touch it (one call at a time)
  int64_t errors = 0;
  int64_t next_session = 0;  // this caller's position in the session cycle
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int n_channels = std::max(1, absl::GetFlag(FLAGS_channels));
  const int concurrency = std::max(1, absl::GetFlag(FLAGS_concurrency));
  std::vector<std::unique_ptr<TokenBrokerService::Stub>> stubs;
  for (int i = 0; i < n_channels; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
    args.SetInt("tokenbroker.loadgen.channel", i);
    stubs.push_back(TokenBrokerService::NewStub(
        grpc::CreateCustomChannel(absl::GetFlag(FLAGS_target), grpc::InsecureChannelCredentials(), args)));
  }
  const auto end = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(absl::GetFlag(FLAGS_duration));
  std::vector<Caller> callers(concurrency);
  absl::Mutex mu;
  int running = concurrency;

  const int sessions = std::max(0, absl::GetFlag(FLAGS_sessions));
  std::function<void(Caller&)> issue = [&](Caller& c) {
    c.context = std::make_unique<grpc::ClientContext>();
    if (sessions > 0) {
      c.request.set_session_id(absl::StrCat("bench-session-", c.next_session % sessions));
      c.next_session += concurrency;
    }
    c.response.Clear();
    c.started = std::chrono::steady_clock::now();
    c.stub->async()->GetToken(c.context.get(), &c.request, &c.response, [&, cp = &c](grpc::Status s) {
      const auto now = std::chrono::steady_clock::now();
      if (s.ok()) {
        cp->latencies_us.push_back(static_cast<uint32_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(now - cp->started).count()));
      } else {
        ++cp->errors;
      }
      if (now < end) {
        issue(*cp);
      } else {
        absl::MutexLock lock(&mu);
        --running;
      }
    });
  };
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < concurrency; ++i) {
    callers[i].stub = stubs[i % n_channels].get();
    callers[i].request.set_model(absl::GetFlag(FLAGS_model));
    callers[i].next_session = i;
    issue(callers[i]);
  }
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(+[](int* r) { return *r == 0; }, &running));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<uint32_t> all;
  int64_t errors = 0;
  for (Caller& c : callers) {
    all.insert(all.end(), c.latencies_us.begin(), c.latencies_us.end());
    errors += c.errors;
  }
  std::sort(all.begin(), all.end());
  auto pct = [&](double p) -> double {
    if (all.empty()) return 0;
    size_t i = std::min(all.size() - 1, static_cast<size_t>(p * static_cast<double>(all.size())));
    return all[i] / 1000.0;
  };
  std::printf("{\"calls\":%zu,\"errors\":%lld,\"seconds\":%.3f,\"rps\":%.0f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,"
              "\"p99_ms\":%.3f,\"p999_ms\":%.3f}\n",
              all.size(), static_cast<long long>(errors), seconds, all.size() / seconds, pct(0.50), pct(0.90),
              pct(0.99), pct(0.999));
  return errors > 0 && all.empty() ? 1 : 0;
}
