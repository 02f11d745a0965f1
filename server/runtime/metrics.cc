#include "server/runtime/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <atomic>
#include <chrono>
#include <iterator>
#include <exception>
#include <map>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "google/protobuf/descriptor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "lib/common/clock.h"
#include "lib/monitor/quota_hub.h"
#include "lib/monitor/quota_poller.h"
#include "lib/state/redis_state.h"
#include "server/runtime/servers.h"
#include "server/status/http_routes.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr const char* kCodeNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                                      "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

prometheus::ClientMetric Value(double v, std::vector<prometheus::ClientMetric::Label> labels, bool counter) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  if (counter) {
    m.counter.value = v;
  } else {
    m.gauge.value = v;
  }
  return m;
}

prometheus::MetricFamily Family(std::string name, std::string help, prometheus::MetricType type) {
  prometheus::MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

// Calls (refreshes, quota polls) that failed at an account's egress (README "Egress").
prometheus::MetricFamily EgressFailures(const TokenManager& tokens) {
  auto f = Family("tokenbroker_egress_failures_total",
                  "Calls that failed at the account's egress (proxy unreachable, refused or silent).",
                  prometheus::MetricType::Counter);
  f.metric.push_back(Value(static_cast<double>(tokens.EgressFailures()), {}, true));
  return f;
}

// State read at scrape time, so the request path pays nothing for it.
class StateCollector final : public prometheus::Collectable {
 private:
  // Caller policies (issue 16.1): the `caller` label is a policy entry's name (the operator's
  // file: bounded) or "unlisted"; never a name a caller sent.
  void CollectCallers(std::vector<prometheus::MetricFamily>& out) const {
    using prometheus::MetricType;
    const std::map<std::string, CallerStats> stats = service_.CallerStatistics();
    if (stats.empty()) return;
    auto leases = Family("tokenbroker_caller_leases_in_flight",
                         "Leases a caller policy entry holds (issued, not yet reported or timed out).", MetricType::Gauge);
    auto accounts = Family("tokenbroker_caller_accounts_held",
                           "Distinct accounts a caller policy entry holds leases on.", MetricType::Gauge);
    auto waiting = Family("tokenbroker_caller_waiting_calls", "GetToken calls of a caller policy entry waiting.",
                          MetricType::Gauge);
    auto issued = Family("tokenbroker_caller_issued_total", "Tokens issued by caller policy entry.",
                         MetricType::Counter);
    auto refused = Family("tokenbroker_caller_refused_total",
                          "GetToken calls refused by a caller policy, by entry and limit.", MetricType::Counter);
    for (const auto& [caller, s] : stats) {
      if (caller != CallerAdmission::kUnlisted) {
        leases.metric.push_back(Value(s.usage.in_flight, {{"caller", caller}}, false));
        accounts.metric.push_back(Value(s.usage.accounts, {{"caller", caller}}, false));
        waiting.metric.push_back(Value(s.usage.waiting, {{"caller", caller}}, false));
        issued.metric.push_back(Value(static_cast<double>(s.issued), {{"caller", caller}}, true));
      }
      for (const auto& [limit, n] : s.refused) {
        refused.metric.push_back(Value(static_cast<double>(n), {{"caller", caller}, {"limit", limit}}, true));
      }
    }
    for (auto* f : {&leases, &accounts, &waiting, &issued, &refused}) out.push_back(std::move(*f));
  }

 public:
  StateCollector(AccountPool& pool, TokenManager& tokens, QuotaSubscriber& subscriber, BrokerService& service,
                 const RedisState* redis)
      : pool_(pool), tokens_(tokens), subscriber_(subscriber), service_(service), redis_(redis) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::MetricType;
    std::vector<prometheus::MetricFamily> out;
    const std::vector<AccountView> accounts = pool_.List();
    const absl::Time now = Clock::Real().Now();

    auto states = Family("tokenbroker_accounts", "Loaded accounts by state.", MetricType::Gauge);
    auto cooldowns = Family("tokenbroker_cooldowns", "Live cooldowns by scope.", MetricType::Gauge);
    auto fractions = Family("tokenbroker_quota_remaining_fraction",
                            "Last known remaining quota fraction per account and model.", MetricType::Gauge);
    auto inflight = Family("tokenbroker_inflight_leases", "Leases handed out and not yet reported.", MetricType::Gauge);
    std::map<std::string, int> by_state = {
        {"enabled", 0}, {"disabled", 0}, {"suspended", 0}, {"proxy_disabled", 0}, {"cooling", 0}};
    int model_cooldowns = 0;
    int account_cooldowns = 0;
    int family_cooldowns = 0;
    int leases = 0;
    for (const AccountView& a : accounts) {
      bool cooling = false;
      for (const CooldownView& c : a.cooldowns) {
        if (c.until <= now) continue;
        (c.family ? family_cooldowns : c.model.empty() ? account_cooldowns : model_cooldowns)++;
        cooling |= c.model.empty();
      }
      ++by_state[a.suspended ? "suspended" : a.disabled ? "disabled" : a.proxy_disabled ? "proxy_disabled" : cooling ? "cooling" : "enabled"];
      for (const ModelQuota& q : a.quotas) {
        fractions.metric.push_back(Value(q.remaining_fraction, {{"account_id", a.account_id}, {"model", q.model}}, false));
      }
      leases += a.in_flight;
    }
    for (const auto& [state, n] : by_state) states.metric.push_back(Value(n, {{"state", state}}, false));
    cooldowns.metric.push_back(Value(model_cooldowns, {{"scope", "model"}}, false));
    cooldowns.metric.push_back(Value(account_cooldowns, {{"scope", "account"}}, false));
    cooldowns.metric.push_back(Value(family_cooldowns, {{"scope", "family"}}, false));
    inflight.metric.push_back(Value(leases, {}, false));
    auto evicted = Family("tokenbroker_leases_evicted_total",
                          "Leases ended before their timeout because the lease table was full (--max_leases).",
                          MetricType::Counter);
    evicted.metric.push_back(Value(static_cast<double>(pool_.LeasesEvicted()), {}, true));

    auto refreshes = Family("tokenbroker_token_refreshes_total", "Token refreshes by result.", MetricType::Counter);
    for (const char* result : {"ok", "invalid_grant", "error"}) {
      auto counts = tokens_.RefreshCounts();
      refreshes.metric.push_back(Value(static_cast<double>(counts[result]), {{"result", result}}, true));
    }
    auto rebinds = Family("tokenbroker_session_rebinds_total", "Session (re)bindings by reason.", MetricType::Counter);
    auto rebind_counts = pool_.RebindCounts();
    for (const char* reason : {"new", "force_rotate", "ineligible"}) {
      rebinds.metric.push_back(Value(static_cast<double>(rebind_counts[reason]), {{"reason", reason}}, true));
    }
    auto stream = Family("tokenbroker_quota_stream_connected", "1 while the WatchQuota stream from the monitor is open.",
                         MetricType::Gauge);
    stream.metric.push_back(Value(subscriber_.connected() ? 1 : 0, {}, false));
    auto validation = Family("tokenbroker_quota_validation_enabled", "1 while proactive quota validation is on.",
                             MetricType::Gauge);
    validation.metric.push_back(Value(pool_.quota_settings().enabled ? 1 : 0, {}, false));
    auto waiting = Family("tokenbroker_waiting_calls", "GetToken calls waiting (max_wait) for an account to free.",
                          MetricType::Gauge);
    waiting.metric.push_back(Value(static_cast<double>(service_.WaitingCalls()), {}, false));
    auto reports = Family("tokenbroker_reports_total",
                          "ReportOutcome calls by caller and result (the cooldown it caused, or why it was refused).",
                          MetricType::Counter);
    for (const auto& [key, n] : service_.ReportCounts()) {
      reports.metric.push_back(Value(static_cast<double>(n), {{"caller", key.first}, {"result", key.second}}, true));
    }
    for (auto* f : {&states, &cooldowns, &fractions, &inflight, &evicted, &refreshes, &rebinds, &stream, &validation, &waiting,
                    &reports}) {
      out.push_back(std::move(*f));
    }
    CollectCallers(out);
    out.push_back(EgressFailures(tokens_));
    if (redis_ != nullptr) {
      const SharedStateStats st = redis_->stats();
      auto up = Family("tokenbroker_state_backend_up", "1 while the Redis state backend is connected and in sync.",
                       MetricType::Gauge);
      up.metric.push_back(Value(st.up ? 1 : 0, {}, false));
      auto errors = Family("tokenbroker_state_backend_errors_total",
                           "Failed Redis round trips and lost connections.", MetricType::Counter);
      errors.metric.push_back(Value(static_cast<double>(st.errors), {}, true));
      auto resyncs = Family("tokenbroker_state_backend_resyncs_total",
                            "Connections to Redis, each followed by a full resync.", MetricType::Counter);
      resyncs.metric.push_back(Value(static_cast<double>(st.resyncs), {}, true));
      auto events = Family("tokenbroker_state_backend_events_received_total",
                           "Changes applied from other replicas.", MetricType::Counter);
      events.metric.push_back(Value(static_cast<double>(st.events_received), {}, true));
      auto writes = Family("tokenbroker_state_backend_writes_total",
                           "Write-through commands, written or dropped while Redis was down.", MetricType::Counter);
      writes.metric.push_back(Value(static_cast<double>(st.writes), {{"result", "written"}}, true));
      writes.metric.push_back(Value(static_cast<double>(st.writes_dropped), {{"result", "dropped"}}, true));
      // Fleet-wide admission (issue 16): reservations under --max_inflight_per_account and half-open
      // probe tokens, by answer; "local" leases were decided by this replica's own count (Redis down).
      auto admissions = Family("tokenbroker_fleet_admissions_total",
                               "Fleet-wide admissions (in-flight cap, half-open probe) by result.",
                               MetricType::Counter);
      admissions.metric.push_back(Value(static_cast<double>(st.admissions), {{"result", "admitted"}}, true));
      admissions.metric.push_back(Value(static_cast<double>(st.admissions_at_cap), {{"result", "at_cap"}}, true));
      admissions.metric.push_back(
          Value(static_cast<double>(st.admissions_probe_elsewhere), {{"result", "probe_elsewhere"}}, true));
      admissions.metric.push_back(
          Value(static_cast<double>(st.admissions_unanswered), {{"result", "unanswered"}}, true));
      admissions.metric.push_back(Value(static_cast<double>(pool_.AdmissionFallbacks()), {{"result", "local"}}, true));
      // Caller budgets (issue 16.2): decisions the fleet's ledger made in Redis, and those it made
      // on this replica's own counts because Redis did not answer.
      auto callers = Family("tokenbroker_fleet_caller_decisions_total",
                            "Caller budget reservations and commits, by where they were decided.",
                            prometheus::MetricType::Counter);
      callers.metric.push_back(Value(static_cast<double>(st.caller_round_trips), {{"result", "fleet"}}, true));
      callers.metric.push_back(Value(static_cast<double>(st.caller_unanswered), {{"result", "local"}}, true));
      for (auto* f : {&up, &errors, &resyncs, &events, &writes, &admissions, &callers}) out.push_back(std::move(*f));
    }
    return out;
  }

 private:
  AccountPool& pool_;
  TokenManager& tokens_;
  QuotaSubscriber& subscriber_;
  BrokerService& service_;
  const RedisState* redis_;
};

// The monitor's state, read at scrape time.
class MonitorCollector final : public prometheus::Collectable {
 public:
  MonitorCollector(AccountPool& pool, TokenManager& tokens, const QuotaHub& hub, const QuotaPoller& poller)
      : pool_(pool), tokens_(tokens), hub_(hub), poller_(poller) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::MetricType;
    auto states = Family("tokenbroker_accounts", "Loaded accounts by state.", MetricType::Gauge);
    std::map<std::string, int> by_state = {{"enabled", 0}, {"disabled", 0}, {"proxy_disabled", 0}};
    for (const AccountView& a : pool_.List()) {
      ++by_state[a.disabled ? "disabled" : a.proxy_disabled ? "proxy_disabled" : "enabled"];
    }
    for (const auto& [state, n] : by_state) states.metric.push_back(Value(n, {{"state", state}}, false));
    auto refreshes = Family("tokenbroker_token_refreshes_total", "Token refreshes by result.", MetricType::Counter);
    auto counts = tokens_.RefreshCounts();
    for (const char* result : {"ok", "invalid_grant", "error"}) {
      refreshes.metric.push_back(Value(static_cast<double>(counts[result]), {{"result", result}}, true));
    }
    auto polls = Family("tokenbroker_monitor_polls_total", "Quota polls of accounts.", MetricType::Counter);
    polls.metric.push_back(Value(static_cast<double>(poller_.PollCount()), {}, true));
    auto subscribers = Family("tokenbroker_monitor_subscribers", "Open WatchQuota streams.", MetricType::Gauge);
    subscribers.metric.push_back(Value(static_cast<double>(hub_.subscribers()), {}, false));
    auto known = Family("tokenbroker_monitor_quota_entries", "(account, model) quota entries known.",
                        MetricType::Gauge);
    known.metric.push_back(Value(static_cast<double>(hub_.size()), {}, false));
    auto backlog = Family("tokenbroker_monitor_max_pending",
                          "Quota entries the slowest WatchQuota stream has not read yet.", MetricType::Gauge);
    backlog.metric.push_back(Value(static_cast<double>(hub_.MaxPending()), {}, false));
    auto onboarding = Family("tokenbroker_monitor_onboarding_accounts",
                             "Accounts without a Cloud Code project being onboarded or whose onboarding failed.",
                             MetricType::Gauge);
    onboarding.metric.push_back(Value(static_cast<double>(poller_.OnboardingAccounts()), {}, false));
    auto onboard_calls = Family("tokenbroker_monitor_onboard_requests_total", "onboardUser requests made.",
                                MetricType::Counter);
    onboard_calls.metric.push_back(Value(static_cast<double>(poller_.OnboardingAttempts()), {}, true));
    std::vector<prometheus::MetricFamily> out;
    for (auto* f : {&states, &refreshes, &polls, &subscribers, &known, &backlog, &onboarding, &onboard_calls}) {
      out.push_back(std::move(*f));
    }
    out.push_back(EgressFailures(tokens_));
    return out;
  }

 private:
  AccountPool& pool_;
  TokenManager& tokens_;
  const QuotaHub& hub_;
  const QuotaPoller& poller_;
};

}  // namespace

namespace {
const absl::flat_hash_set<std::string>& ServedMethods();
}  // namespace

// Per-RPC counters and latency histograms. Every method label has its slot from the start, and a
// slot's series are made on first use and then read without a lock: a call costs one hash lookup
// (when its interceptor is made), no label building, no string copy and no lock of ours (issue 15).
class RpcMetrics {
 public:
  // The series of one method label; their pointers are set once, under mu_, and read lock-free.
  struct Slot {
    std::string method;
    std::atomic<prometheus::Histogram*> latency{nullptr};
    std::atomic<prometheus::Counter*> calls[std::size(kCodeNames) + 1] = {};  // by code; last: other codes
  };

  explicit RpcMetrics(prometheus::Registry& registry)
      : calls_(prometheus::BuildCounter()
                   .Name("tokenbroker_rpc_total")
                   .Help("RPCs handled, by method and status code.")
                   .Register(registry)),
        latency_(prometheus::BuildHistogram()
                     .Name("tokenbroker_rpc_duration_seconds")
                     .Help("RPC latency by method, from the request's arrival to its status.")
                     .Register(registry)) {
    for (const std::string& method : ServedMethods()) AddSlot(method);
    unknown_ = AddSlot("unknown");
  }

  // The slot of a method path as gRPC gives it (RpcMethodLabel's label). Thread-safe.
  Slot* SlotOf(const char* method) {
    if (method == nullptr) return unknown_;
    auto it = slots_.find(absl::string_view(method));
    return it == slots_.end() ? unknown_ : it->second.get();
  }

  void Record(Slot& slot, int code, double seconds) {
    const size_t index = code >= 0 && code < static_cast<int>(std::size(kCodeNames)) ? code : std::size(kCodeNames);
    prometheus::Counter* counter = slot.calls[index].load(std::memory_order_acquire);
    prometheus::Histogram* histogram = slot.latency.load(std::memory_order_acquire);
    if (counter == nullptr || histogram == nullptr) {
      absl::MutexLock lock(&mu_);
      counter = slot.calls[index].load(std::memory_order_relaxed);
      if (counter == nullptr) {
        counter = &calls_.Add({{"method", slot.method}, {"code", index < std::size(kCodeNames) ? kCodeNames[index] : "UNKNOWN"}});
        slot.calls[index].store(counter, std::memory_order_release);
      }
      histogram = slot.latency.load(std::memory_order_relaxed);
      if (histogram == nullptr) {
        histogram = &latency_.Add({{"method", slot.method}},
                                  prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                                          0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
        slot.latency.store(histogram, std::memory_order_release);
      }
    }
    counter->Increment();
    histogram->Observe(seconds);
  }

 private:
  Slot* AddSlot(const std::string& method) {
    auto slot = std::make_unique<Slot>();
    slot->method = method;
    Slot* out = slot.get();
    slots_.emplace(method, std::move(slot));
    return out;
  }

  prometheus::Family<prometheus::Counter>& calls_;
  prometheus::Family<prometheus::Histogram>& latency_;
  // Built in the constructor, read-only after: lookups need no lock.
  absl::flat_hash_map<std::string, std::unique_ptr<Slot>> slots_;
  Slot* unknown_ = nullptr;
  absl::Mutex mu_;  // serialises making a series (prometheus' Family::Add)
};

namespace {

// Method paths come from the wire, so anyone can send any number of distinct ones: only the
// methods of the services these binaries serve get a label of their own; every other path shares
// "unknown" (a label per path would grow /metrics without bound).
const absl::flat_hash_set<std::string>& ServedMethods() {
  static const auto* const methods = [] {
    auto* out = new absl::flat_hash_set<std::string>();
    for (const char* service : {"tokenbroker.v1.TokenBrokerService", "tokenbroker.v1.QuotaMonitorService",
                                "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                "grpc.reflection.v1.ServerReflection"}) {
      const google::protobuf::ServiceDescriptor* d =
          google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
      if (d == nullptr) continue;
      for (int i = 0; i < d->method_count(); ++i) out->insert(absl::StrCat("/", service, "/", d->method(i)->name()));
    }
    return out;
  }();
  return *methods;
}


// `metrics` belongs to the factory that made the interceptor, which the server keeps until its
// last call is done.
class RpcInterceptor final : public grpc::experimental::Interceptor {
 public:
  RpcInterceptor(grpc::experimental::ServerRpcInfo* info, RpcMetrics& metrics)
      : metrics_(metrics), slot_(*metrics.SlotOf(info->method())), start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      metrics_.Record(slot_, static_cast<int>(methods->GetSendStatus().error_code()), seconds);
    }
    methods->Proceed();
  }

 private:
  RpcMetrics& metrics_;
  RpcMetrics::Slot& slot_;
  std::chrono::steady_clock::time_point start_;
};

class RpcInterceptorFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcInterceptorFactory(std::shared_ptr<RpcMetrics> metrics) : metrics_(std::move(metrics)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new RpcInterceptor(info, *metrics_);
  }

 private:
  std::shared_ptr<RpcMetrics> metrics_;
};

}  // namespace

std::string RpcMethodLabel(const char* method) {
  if (method == nullptr || !ServedMethods().contains(absl::string_view(method))) return "unknown";
  return method;
}

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Start(const std::string& listen, AccountPool& pool,
                                                        TokenManager& tokens, QuotaSubscriber& subscriber,
                                                        BrokerService& service, const RedisState* redis) {
  std::unique_ptr<Metrics> m(new Metrics());
  m->state_ = std::make_shared<StateCollector>(pool, tokens, subscriber, service, redis);
  return Serve(listen, std::move(m));
}

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::StartForMonitor(const std::string& listen, AccountPool& pool,
                                                                  TokenManager& tokens, const QuotaHub& hub,
                                                                  const QuotaPoller& poller) {
  std::unique_ptr<Metrics> m(new Metrics());
  m->state_ = std::make_shared<MonitorCollector>(pool, tokens, hub, poller);
  return Serve(listen, std::move(m));
}

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Serve(const std::string& listen, std::unique_ptr<Metrics> m) {
  m->registry_ = std::make_shared<prometheus::Registry>();
  m->rpc_ = std::make_shared<RpcMetrics>(*m->registry_);
  try {
    // Our callbacks let other routes (the status page) answer on this port too.
    m->exposer_ = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/2, HttpRouteCallbacks());
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("--metrics_listen: cannot serve on ", listen, ": ", e.what()));
  }
  m->exposer_->RegisterCollectable(m->registry_);
  m->exposer_->RegisterCollectable(m->state_);
  std::vector<int> ports = m->exposer_->GetListeningPorts();
  m->port_ = ports.empty() ? 0 : ports.front();
  return m;
}

Metrics::~Metrics() = default;

void Metrics::Announce(const std::string& listen, const std::string& port_file) const {
  spdlog::info("metrics on http://{}/metrics", BoundAddress(listen, port_));
  if (!port_file.empty()) WritePort(port_file, port_);
}

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> Metrics::Interceptors() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> out;
  out.push_back(std::make_unique<RpcInterceptorFactory>(rpc_));
  return out;
}

}  // namespace tokenbroker
