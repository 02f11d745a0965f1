// tbctl: command-line client of tokenbroker. One subcommand per RPC, human-readable output by
// default and --json for scripts. Access tokens are shown only with --show_token.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/util/json_util.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/runtime/command_line.h"
#include "tokenbroker/v1/broker.grpc.pb.h"
#include "tokenbroker/v1/monitor.grpc.pb.h"

ABSL_FLAG(std::string, target, "",
          "Broker address: host:port or unix:/path.sock; default $TOKENBROKER_TARGET or 127.0.0.1:50051.");
ABSL_FLAG(bool, json, false, "Print the response as JSON.");
ABSL_FLAG(bool, show_token, false, "Print access tokens in full (they are redacted otherwise).");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(10), "Deadline of the call.");
ABSL_FLAG(std::string, model, "", "Model (get-token, explain, report-outcome).");
ABSL_FLAG(std::string, session, "", "Session id (get-token, explain).");
ABSL_FLAG(bool, force_rotate, false, "Move away from the session's account (get-token, explain).");
ABSL_FLAG(std::string, quota_group, "", "Quota group (get-token).");
ABSL_FLAG(absl::Duration, max_wait, absl::ZeroDuration(), "Wait this long for an account to free (get-token).");
ABSL_FLAG(std::string, lease, "", "Lease id from get-token (report-outcome).");
ABSL_FLAG(std::string, account, "", "Account id (report-outcome).");
ABSL_FLAG(int, http_status, 0, "Upstream HTTP status (report-outcome).");
ABSL_FLAG(std::string, retry_after, "", "Upstream Retry-After header (report-outcome).");
ABSL_FLAG(std::string, error_body, "", "Upstream error body (report-outcome).");
ABSL_FLAG(bool, enabled, false, "Turn quota validation on (set-quota-manager).");
ABSL_FLAG(std::string, monitor, "", "Quota monitor target (set-quota-manager).");
ABSL_FLAG(absl::Duration, cache_ttl, absl::ZeroDuration(), "Quota cache TTL; 0 keeps the broker's (set-quota-manager).");
ABSL_FLAG(double, low_threshold, -1, "LOW threshold; negative keeps the broker's (set-quota-manager).");
ABSL_FLAG(double, exhausted_threshold, -1, "EXHAUSTED threshold; negative keeps the broker's (set-quota-manager).");
ABSL_FLAG(std::string, service, "",
          "health: the service to check (\"\" overall; tokenbroker.v1.StateBackend: the Redis state backend).");
ABSL_FLAG(std::string, token_file, "", "A file holding the bearer token to send (default: $TOKENBROKER_TOKEN).");
ABSL_FLAG(std::string, tls_ca_file, "", "Connect over TLS, trusting this PEM CA for the broker's certificate.");
ABSL_FLAG(std::string, tls_cert_file, "", "With --tls_ca_file: a PEM client certificate (mutual TLS).");
ABSL_FLAG(std::string, tls_key_file, "", "The private key of --tls_cert_file.");
ABSL_FLAG(int, count, 0, "watch-quota: stop after this many messages (0: until interrupted).");
ABSL_FLAG(bool, enable, false, "reset-account: also re-enable a disabled account.");

namespace {

using tokenbroker::v1::TokenBrokerService;
namespace v1 = tokenbroker::v1;

constexpr char kUsage[] = R"(tbctl: talk to a tokenbroker (or, with watch-quota, a tokenbroker-monitor).

Usage: tbctl [--target=ADDR] [--json] COMMAND [flags]

Commands:
  get-token --model=M [--session=S] [--force_rotate] [--show_token]
                         the best account's fresh access token
  explain --model=M [--session=S] [--force_rotate]
                         which account get-token would choose, and why each other is skipped
  list-accounts          every account and its state (no secrets)
  report-outcome (--lease=L | --account=A --model=M) --http_status=N [--retry_after=V] [--error_body=B]
                         tell the broker what the upstream answered
  reset-account --account=A [--model=M] [--enable]
                         undo what reports did (admin): lift the cooldown on M, or every cooldown
                         and the failure streak; --enable also lifts a disable
  set-quota-manager [--enabled] [--monitor=ADDR] [--cache_ttl=D] [--low_threshold=F] [--exhausted_threshold=F]
                         attach (--enabled) or detach proactive quota validation
  watch-quota [--count=N]  stream quota from a tokenbroker-monitor (--target is the monitor)
  health                 the broker's grpc.health.v1 status (--service for one detail)

Environment: TOKENBROKER_TARGET (default of --target), TOKENBROKER_TOKEN (the bearer token, unless
--token_file). Exit status: 0 on success, 1 when the call fails (the error on stderr), 2 for a bad
flag or command.
)";

const std::vector<std::string>& Commands() {
  static const std::vector<std::string> commands = {"get-token", "explain", "list-accounts", "report-outcome",
                                                    "reset-account", "set-quota-manager", "watch-quota", "health"};
  return commands;
}

std::string Redact(const std::string& token) {
  if (absl::GetFlag(FLAGS_show_token) || token.empty()) return token;
  return absl::StrCat(token.substr(0, std::min<size_t>(8, token.size())), "... (redacted; --show_token prints it)");
}

std::string FormatTime(const google::protobuf::Timestamp& ts) {
  if (ts.seconds() == 0 && ts.nanos() == 0) return "-";
  absl::Time t = absl::FromUnixSeconds(ts.seconds());
  absl::Duration in = t - absl::Now();
  std::string rel = in >= absl::ZeroDuration()
                        ? absl::StrCat("in ", absl::FormatDuration(absl::Trunc(in, absl::Seconds(1))))
                        : absl::StrCat(absl::FormatDuration(absl::Trunc(-in, absl::Seconds(1))), " ago");
  return absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone()), " (", rel, ")");
}

std::string TierText(v1::Tier tier) {
  switch (tier) {
    case v1::TIER_ULTRA: return "ULTRA";
    case v1::TIER_PRO: return "PRO";
    case v1::TIER_FREE: return "FREE";
    default: return "UNKNOWN";
  }
}

std::string EnumText(const std::string& full, const std::string& prefix) {
  return full.rfind(prefix, 0) == 0 ? full.substr(prefix.size()) : full;
}

int PrintError(const grpc::Status& status) {
  static const char* kCodes[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                 "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                                 "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int code = status.error_code();
  std::cerr << "tbctl: " << (code >= 0 && code <= 16 ? kCodes[code] : "UNKNOWN") << ": "
            << status.error_message() << "\n";
  google::rpc::Status rich;
  if (!status.error_details().empty() && rich.ParseFromString(status.error_details())) {
    for (const auto& any : rich.details()) {
      google::rpc::BadRequest bad;
      google::rpc::RetryInfo retry;
      if (any.UnpackTo(&bad)) {
        for (const auto& v : bad.field_violations()) std::cerr << "  field " << v.field() << ": " << v.description() << "\n";
      } else if (any.UnpackTo(&retry)) {
        std::cerr << "  retry in " << retry.retry_delay().seconds() << "."
                  << absl::StrFormat("%03d", retry.retry_delay().nanos() / 1000000) << "s\n";
      }
    }
  }
  return 1;
}

int PrintJson(const google::protobuf::Message& message) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  std::cout << out;
  return 0;
}

// Every call: the deadline, and the bearer token when one is given (--token_file or
// $TOKENBROKER_TOKEN; never a flag value, which would show in `ps`).
void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + absl::GetFlag(FLAGS_timeout)));
  static const std::string token = [] {
    std::string t;
    if (const std::string path = absl::GetFlag(FLAGS_token_file); !path.empty()) {
      std::ifstream in(path);
      std::getline(in, t);
    } else if (const char* env = std::getenv("TOKENBROKER_TOKEN"); env != nullptr) {
      t = env;
    }
    return std::string(absl::StripAsciiWhitespace(t));
  }();
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

std::string ReadPem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() {
  const std::string ca = absl::GetFlag(FLAGS_tls_ca_file);
  if (ca.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = ReadPem(ca);
  if (const std::string cert = absl::GetFlag(FLAGS_tls_cert_file); !cert.empty()) {
    options.pem_cert_chain = ReadPem(cert);
    options.pem_private_key = ReadPem(absl::GetFlag(FLAGS_tls_key_file));
  }
  return grpc::SslCredentials(options);
}

int GetToken(TokenBrokerService::Stub& stub) {
  v1::GetTokenRequest req;
  req.set_model(absl::GetFlag(FLAGS_model));
  req.set_session_id(absl::GetFlag(FLAGS_session));
  req.set_force_rotate(absl::GetFlag(FLAGS_force_rotate));
  req.set_quota_group(absl::GetFlag(FLAGS_quota_group));
  if (absl::Duration w = absl::GetFlag(FLAGS_max_wait); w > absl::ZeroDuration()) {
    req.mutable_max_wait()->set_seconds(absl::ToInt64Seconds(w));
  }
  v1::GetTokenResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status status = stub.GetToken(&ctx, req, &resp);
  if (!status.ok()) return PrintError(status);
  resp.set_access_token(Redact(resp.access_token()));
  if (absl::GetFlag(FLAGS_json)) return PrintJson(resp);
  std::cout << "account  " << resp.account_id() << " (" << resp.email() << ")\n"
            << "tier     " << TierText(resp.tier()) << "\n"
            << "project  " << (resp.project_id().empty() ? "-" : resp.project_id()) << "\n"
            << "expires  " << FormatTime(resp.expire_time()) << "\n"
            << "lease    " << resp.lease_id() << "\n"
            << "token    " << resp.access_token() << "\n";
  if (!resp.egress_id().empty()) std::cout << "egress   " << resp.egress_id() << "\n";
  return 0;
}

int Explain(TokenBrokerService::Stub& stub) {
  v1::ExplainSelectionRequest req;
  req.set_model(absl::GetFlag(FLAGS_model));
  req.set_session_id(absl::GetFlag(FLAGS_session));
  req.set_force_rotate(absl::GetFlag(FLAGS_force_rotate));
  v1::ExplainSelectionResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status status = stub.ExplainSelection(&ctx, req, &resp);
  if (!status.ok()) return PrintError(status);
  if (absl::GetFlag(FLAGS_json)) return PrintJson(resp);
  std::cout << "model " << req.model() << ", policy "
            << absl::AsciiStrToLower(EnumText(v1::SelectionPolicy_Name(resp.policy()), "SELECTION_POLICY_"))
            << ": " << (resp.chosen_account_id().empty() ? "no account is eligible" : "chooses " + resp.chosen_account_id())
            << (resp.from_session() ? " (bound to the session)" : "") << "\n";
  std::cout << absl::StrFormat("%-5s %-14s %-24s %-8s %s\n", "RANK", "VERDICT", "ACCOUNT", "TIER", "DETAIL");
  for (const auto& a : resp.accounts()) {
    std::cout << absl::StrFormat("%-5s %-14s %-24s %-8s %s\n", a.rank() ? absl::StrCat(a.rank()) : "-",
                                 EnumText(v1::Verdict_Name(a.verdict()), "VERDICT_"), a.account_id(),
                                 TierText(a.tier()), a.detail());
  }
  return 0;
}

struct AccountStatus {
  std::string state;
  std::string detail;
};

// What an operator needs to know of one account, worst first: disabled, out of rotation, blocked
// until someone verifies it, cooling down (COOLING: the whole account; COOLING_MODEL: some models,
// the others still served), waiting for a probe, holding no valid access token (its refresh is
// failing, or has not run yet), or serving.
// What a cooldown applies to, for people: the account, a model, or a model family.
std::string CooldownSubject(const v1::Cooldown& c) {
  if (!c.family().empty()) return absl::StrCat("family ", c.family());
  return c.model().empty() ? "account" : c.model();
}

AccountStatus StatusOf(const v1::Account& a, absl::Time now) {
  std::vector<std::string> notes;
  std::string state = "ENABLED";
  auto end = [](const v1::Cooldown& c) { return absl::FromUnixSeconds(c.end_time().seconds()); };
  std::vector<std::string> models_cooling;
  bool account_cooling = false;
  bool probing = false;
  for (const v1::Cooldown& c : a.cooldowns()) {
    if (c.half_open()) {
      probing = true;
      notes.push_back(absl::StrCat(CooldownSubject(c), " waits for a probe's report"));
    } else if (end(c) > now) {
      if (c.model().empty() && c.family().empty()) {
        account_cooling = true;
      } else {
        models_cooling.push_back(c.model().empty() ? c.family() : c.model());
      }
      notes.push_back(absl::StrCat(CooldownSubject(c), " cooling until ",
                                   FormatTime(c.end_time()), ": ", c.reason()));
    }
  }
  const bool has_token = a.has_token_expire_time() && absl::FromUnixSeconds(a.token_expire_time().seconds()) > now;
  if (a.state() == v1::ACCOUNT_STATE_SUSPENDED) {
    state = "SUSPENDED";  // disabled_reason carries Google's words
  } else if (a.state() == v1::ACCOUNT_STATE_DISABLED) {
    state = "DISABLED";
  } else if (a.state() == v1::ACCOUNT_STATE_PROXY_DISABLED) {
    state = "PROXY_DISABLED";
  } else if (!a.validation_url().empty() && account_cooling) {
    state = "VALIDATION_REQUIRED";
  } else if (account_cooling) {
    state = "COOLING";
  } else if (!models_cooling.empty()) {
    state = "COOLING_MODEL";  // the detail names the models
  } else if (probing) {
    state = "PROBING";
  } else if (!has_token) {
    state = "NO_TOKEN";
  }
  std::vector<std::string> detail;
  if (!a.disabled_reason().empty()) detail.push_back(a.disabled_reason());
  if (!a.validation_url().empty()) detail.push_back(absl::StrCat("verify the account at ", a.validation_url()));
  detail.insert(detail.end(), notes.begin(), notes.end());
  if (!has_token && a.state() == v1::ACCOUNT_STATE_ENABLED) {
    detail.push_back(a.has_token_expire_time()
                         ? absl::StrCat("access token expired ", FormatTime(a.token_expire_time()),
                                        "; refresh failing (the broker log says why) or pending")
                         : "no access token yet; refresh failing (the broker log says why) or pending");
  }
  if (a.failure_streak() > 0) detail.push_back(absl::StrCat(a.failure_streak(), " upstream failures in a row"));
  if (a.protected_models_size() > 0) {
    detail.push_back(absl::StrCat("protected: ", absl::StrJoin(a.protected_models(), ",")));
  }
  return {state, absl::StrJoin(detail, "; ")};
}

int ListAccounts(TokenBrokerService::Stub& stub) {
  // Every page, as one response.
  v1::ListAccountsResponse resp;
  v1::ListAccountsRequest req;
  do {
    v1::ListAccountsResponse page;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Status status = stub.ListAccounts(&ctx, req, &page);
    if (!status.ok()) return PrintError(status);
    for (v1::Account& a : *page.mutable_accounts()) *resp.add_accounts() = std::move(a);
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  if (absl::GetFlag(FLAGS_json)) return PrintJson(resp);
  std::cout << absl::StrFormat("%-24s %-28s %-8s %-19s %-8s %s\n", "ACCOUNT", "EMAIL", "TIER", "STATE",
                               "SESSIONS", "DETAIL");
  for (const auto& a : resp.accounts()) {
    AccountStatus st = StatusOf(a, absl::Now());
    std::cout << absl::StrFormat("%-24s %-28s %-8s %-19s %-8d %s\n", a.account_id(), a.email(), TierText(a.tier()),
                                 st.state, a.bound_sessions(), st.detail.empty() ? "-" : st.detail);
  }
  return 0;
}

int ResetAccount(TokenBrokerService::Stub& stub) {
  v1::ResetAccountRequest req;
  req.set_account_id(absl::GetFlag(FLAGS_account));
  req.set_model(absl::GetFlag(FLAGS_model));
  req.set_enable(absl::GetFlag(FLAGS_enable));
  v1::ResetAccountResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status status = stub.ResetAccount(&ctx, req, &resp);
  if (!status.ok()) return PrintError(status);
  if (absl::GetFlag(FLAGS_json)) return PrintJson(resp);
  AccountStatus st = StatusOf(resp.account(), absl::Now());
  std::cout << "account   " << resp.account().account_id() << "\n"
            << "cooldown  " << (resp.cooldown_lifted() ? "lifted" : "none to lift") << "\n"
            << "enabled   " << (resp.enabled() ? "yes (was disabled)" : "unchanged") << "\n"
            << "state     " << st.state << (st.detail.empty() ? "" : " (" + st.detail + ")") << "\n";
  return 0;
}

int ReportOutcome(TokenBrokerService::Stub& stub) {
  v1::ReportOutcomeRequest req;
  req.set_lease_id(absl::GetFlag(FLAGS_lease));
  req.set_account_id(absl::GetFlag(FLAGS_account));
  req.set_model(absl::GetFlag(FLAGS_model));
  req.set_http_status(absl::GetFlag(FLAGS_http_status));
  req.set_retry_after(absl::GetFlag(FLAGS_retry_after));
  req.set_error_body(absl::GetFlag(FLAGS_error_body));
  v1::ReportOutcomeResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status status = stub.ReportOutcome(&ctx, req, &resp);
  if (!status.ok()) return PrintError(status);
  if (absl::GetFlag(FLAGS_json)) return PrintJson(resp);
  std::cout << "scope     " << EnumText(v1::CooldownScope_Name(resp.scope()), "COOLDOWN_SCOPE_") << "\n"
            << "until     " << FormatTime(resp.cooldown_until()) << "\n"
            << "reason    " << resp.reason() << "\n";
  return 0;
}

int SetQuotaManager(TokenBrokerService::Stub& stub) {
  v1::SetQuotaManagerRequest req;
  req.set_enabled(absl::GetFlag(FLAGS_enabled));
  req.set_monitor_target(absl::GetFlag(FLAGS_monitor));
  if (absl::Duration ttl = absl::GetFlag(FLAGS_cache_ttl); ttl > absl::ZeroDuration()) {
    req.mutable_cache_ttl()->set_seconds(absl::ToInt64Seconds(ttl));
    req.mutable_cache_ttl()->set_nanos(
        static_cast<int32_t>(absl::ToInt64Nanoseconds(ttl - absl::Seconds(absl::ToInt64Seconds(ttl)))));
  }
  if (double low = absl::GetFlag(FLAGS_low_threshold); low >= 0) req.set_low_threshold(low);
  if (double ex = absl::GetFlag(FLAGS_exhausted_threshold); ex >= 0) req.set_exhausted_threshold(ex);
  v1::SetQuotaManagerResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status status = stub.SetQuotaManager(&ctx, req, &resp);
  if (!status.ok()) return PrintError(status);
  if (absl::GetFlag(FLAGS_json)) return PrintJson(resp);
  std::cout << "quota validation  " << (resp.enabled() ? "on" : "off") << "\n"
            << "monitor           " << (resp.monitor_target().empty() ? "-" : resp.monitor_target()) << "\n"
            << "cache_ttl         " << resp.cache_ttl().seconds() << "s\n"
            << "low_threshold     " << resp.low_threshold() << "\n"
            << "exhausted         " << resp.exhausted_threshold() << "\n";
  return 0;
}

int WatchQuota(const std::shared_ptr<grpc::Channel>& channel, const std::string& target) {
  auto stub = v1::QuotaMonitorService::NewStub(channel);
  grpc::ClientContext ctx;
  auto reader = stub->WatchQuota(&ctx, v1::WatchQuotaRequest());
  v1::WatchQuotaResponse msg;
  int seen = 0;
  const int count = absl::GetFlag(FLAGS_count);
  while (reader->Read(&msg)) {
    if (absl::GetFlag(FLAGS_json)) {
      PrintJson(msg);
      std::cout << "\n";
    } else {
      std::cout << (msg.snapshot() ? "snapshot" : "changes") << ": " << msg.observations_size() << " observations\n";
      for (const auto& o : msg.observations()) {
        if (!o.bucket_id().empty()) {
          std::cout << absl::StrFormat("  %-24s %-32s %5.1f%%  resets %s\n", o.account_id(),
                                       absl::StrCat("bucket ", o.bucket_id()), o.remaining_fraction() * 100,
                                       FormatTime(o.reset_time()));
        } else if (o.model().empty()) {
          std::cout << absl::StrFormat("  %-24s %-8s project=%s%s\n", o.account_id(), TierText(o.tier()),
                                       o.project_id().empty() ? "-" : o.project_id(), o.forbidden() ? " FORBIDDEN" : "");
        } else {
          std::cout << absl::StrFormat("  %-24s %-32s %5.1f%%  resets %s\n", o.account_id(), o.model(),
                                       o.remaining_fraction() * 100, FormatTime(o.reset_time()));
        }
      }
    }
    std::cout.flush();
    if (count > 0 && ++seen >= count) {
      ctx.TryCancel();
      break;
    }
  }
  grpc::Status status = reader->Finish();
  if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    std::cerr << "tbctl: " << target << " is not a tokenbroker-monitor (it does not serve WatchQuota); point "
              << "--target at the monitor, e.g. tbctl --target=127.0.0.1:50052 watch-quota\n";
    return 1;
  }
  if (!status.ok() && status.error_code() != grpc::StatusCode::CANCELLED) return PrintError(status);
  return 0;
}

int Health(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(absl::GetFlag(FLAGS_service));
  grpc::health::v1::HealthCheckResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status status = stub->Check(&ctx, req, &resp);
  if (!status.ok()) return PrintError(status);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args =
      tokenbroker::ParseFlagsOrExit(argc, argv, {.program = "tbctl", .usage = kUsage, .positional = true});
  if (args.empty()) {
    std::cerr << "tbctl: no command given; one of " << absl::StrJoin(Commands(), ", ") << " (tbctl --help)\n";
    return 2;
  }
  if (args.size() > 1) {
    std::cerr << "tbctl: one command at a time; unexpected '" << args[1] << "' after " << args[0] << "\n";
    return 2;
  }
  const std::string command = args[0];
  if (std::find(Commands().begin(), Commands().end(), command) == Commands().end()) {
    std::string close = tokenbroker::ClosestMatch(command, Commands());
    std::cerr << "tbctl: unknown command '" << command << "'"
              << (close.empty() ? "" : absl::StrCat(" (did you mean ", close, "?)")) << "; one of "
              << absl::StrJoin(Commands(), ", ") << "\n";
    return 2;
  }
  std::string target = absl::GetFlag(FLAGS_target);
  if (target.empty()) {
    const char* env = std::getenv("TOKENBROKER_TARGET");
    target = env != nullptr ? env : "127.0.0.1:50051";
  }
  if (absl::GetFlag(FLAGS_tls_ca_file).empty() && !absl::GetFlag(FLAGS_tls_cert_file).empty()) {
    std::cerr << "tbctl: --tls_cert_file needs --tls_ca_file (the CA of the broker's certificate)\n";
    return 2;
  }
  auto channel = grpc::CreateChannel(target, ChannelCredentials());
  auto stub = TokenBrokerService::NewStub(channel);
  if (command == "get-token") return GetToken(*stub);
  if (command == "explain") return Explain(*stub);
  if (command == "list-accounts") return ListAccounts(*stub);
  if (command == "report-outcome") return ReportOutcome(*stub);
  if (command == "reset-account") return ResetAccount(*stub);
  if (command == "set-quota-manager") return SetQuotaManager(*stub);
  if (command == "health") return Health(channel);
  if (command == "watch-quota") return WatchQuota(channel, target);
  return 2;  // not reached: every command is handled above
}
