// Heap allocations per warm GetToken (issue 15). Every malloc, calloc and realloc of this process
// is counted (they are interposed below; operator new allocates through malloc). One process
// holds a gRPC server and a client: the broker's service (real pool, token manager against the
// fake upstream on loopback, the production server set-up of server/runtime/servers.cc) and then
// the echo service (tests/bench/echo_service.h) are called with the same request, one call at a
// time, after a warm-up. The client's allocations are the same for both, so the difference is
// what the broker allocates beyond the gRPC floor. Prints one line per figure.
//   alloc_bench [calls]        (default 20000)
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "lib/common/clock.h"
#include "lib/selection/account_pool.h"
#include "lib/tokens/token_manager.h"
#include "lib/upstream/http_client.h"
#include "lib/upstream/oauth_client.h"
#include "server/api/broker_service.h"
#include "server/runtime/servers.h"
#include "spdlog/spdlog.h"
#include "tests/bench/echo_service.h"
#include "tests/fakes/fake_upstream.h"

namespace {
std::atomic<uint64_t> g_allocations{0};
}  // namespace

// glibc's own entry points stay reachable under these names.
extern "C" void* __libc_malloc(size_t size);
extern "C" void* __libc_calloc(size_t n, size_t size);
extern "C" void* __libc_realloc(void* p, size_t size);
extern "C" void __libc_free(void* p);

extern "C" void* malloc(size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(size);
}
extern "C" void* calloc(size_t n, size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(n, size);
}
extern "C" void* realloc(void* p, size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, size);
}
extern "C" void free(void* p) { __libc_free(p); }

namespace {

using namespace tokenbroker;

// Allocations per call of `calls` GetTokens on `stub` after `warm` of them; exits on a failed call.
double AllocationsPerCall(v1::TokenBrokerService::Stub& stub, int warm, int calls) {
  v1::GetTokenRequest request;
  request.set_model("gemini-3-pro-high");
  auto call = [&] {
    grpc::ClientContext context;
    v1::GetTokenResponse response;
    grpc::Status s = stub.GetToken(&context, request, &response);
    if (!s.ok() || response.access_token().empty()) {
      std::cerr << "alloc_bench: GetToken failed: " << s.error_message() << "\n";
      std::exit(1);
    }
  };
  for (int i = 0; i < warm; ++i) call();
  const uint64_t before = g_allocations.load();
  for (int i = 0; i < calls; ++i) call();
  return static_cast<double>(g_allocations.load() - before) / calls;
}

std::unique_ptr<v1::TokenBrokerService::Stub> Connect(int port) {
  return v1::TokenBrokerService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
}

}  // namespace

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::atoi(argv[1]) : 20'000;
  if (calls <= 0) {
    std::cerr << "usage: alloc_bench [calls > 0]\n";
    return 2;
  }
  spdlog::set_level(spdlog::level::warn);
  absl::StatusOr<std::unique_ptr<testing::FakeUpstream>> upstream = testing::FakeUpstream::Start({});
  if (!upstream.ok()) {
    std::cerr << upstream.status() << "\n";
    return 1;
  }
  AccountPool pool(PoolOptions(), Clock::Real());
  std::vector<AccountRecord> accounts;
  for (int i = 0; i < 200; ++i) {
    AccountRecord r;
    r.id = absl::StrCat("acct-", i);
    r.email = r.id + "@example.com";
    r.refresh_token = "1//rt-" + r.id;
    r.project_id = "proj-" + r.id;
    r.tier = i % 10 == 0 ? Tier::kUltra : i % 10 < 4 ? Tier::kPro : Tier::kFree;
    accounts.push_back(std::move(r));
  }
  pool.Load(std::move(accounts));
  HttpClient http;
  OAuthOptions oauth_options;
  oauth_options.token_url = (*upstream)->token_url();
  OAuthClient oauth(oauth_options, http);
  TokenManager tokens(TokenManagerOptions(), pool, oauth, nullptr, Clock::Real());
  tokens.Start();
  BrokerService broker(pool, tokens, nullptr, Clock::Real());
  bench::EchoService echo(0);

  double per_call[2] = {0, 0};
  grpc::Service* services[2] = {&broker, &echo};
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<Servers> servers = Servers::Start({"127.0.0.1:0", ""}, {services[i]});
    if (!servers.ok()) {
      std::cerr << servers.status() << "\n";
      return 1;
    }
    per_call[i] = AllocationsPerCall(*Connect(servers->port()), 2'000, calls);
    if (i == 0) broker.Shutdown();
    servers->Drain(absl::Seconds(1));
  }
  tokens.Stop();
  std::printf("allocations per warm GetToken, whole process (gRPC client and server): broker %.1f, echo %.1f\n",
              per_call[0], per_call[1]);
  std::printf("allocations per warm GetToken, the broker's own (broker - echo): %.1f\n", per_call[0] - per_call[1]);
  return 0;
}
