#include "server/api/broker_service.h"

#include <algorithm>
#include <chrono>
#include <functional>

#include "absl/strings/str_cat.h"
#include "lib/common/errors.h"
#include "lib/common/safe_text.h"
#include "server/api/api_limits.h"
#include "server/api/proto_convert.h"
#include "server/api/status_convert.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

// A cooldown scope as the audit log and the logs name it; empty for none.
absl::string_view ScopeName(CooldownScope scope) {
  switch (scope) {
    case CooldownScope::kModel: return "model";
    case CooldownScope::kAccount: return "account";
    case CooldownScope::kFamily: return "family";
    case CooldownScope::kNone: break;
  }
  return "";
}

// The result label of a refused report (metrics and audit).
std::string ReportResultName(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kPermissionDenied: return "permission_denied";
    case absl::StatusCode::kNotFound: return "not_found";
    case absl::StatusCode::kInvalidArgument: return "invalid_argument";
    case absl::StatusCode::kUnauthenticated: return "unauthenticated";
    default: return "error";
  }
}

// The GetToken call whose Issue() runs on this thread right now (see BrokerService::GetToken).
thread_local const void* t_inline_call = nullptr;

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace

// One GetToken call, finished exactly once. A call its client abandons (cancelled, or past its
// deadline) while it waits for an account leaves the wait queue at once and is answered there
// (the issuer's `done` gets CANCELLED), so it never takes a lease; a step already running sees
// IsCancelled().
class BrokerService::TokenCall final : public grpc::ServerUnaryReactor {
 public:
  explicit TokenCall(TokenIssuer& issuer) : issuer_(issuer) {}
  void OnCancel() override { issuer_.Cancel(this); }
  void OnDone() override {
    issuer_.Forget(this);
    delete this;
  }

 private:
  TokenIssuer& issuer_;
};

BrokerService::BrokerService(AccountPool& pool, TokenManager& tokens, QuotaSubscriber* subscriber,
                             const Clock& clock, TokenIssuerOptions issuer_options)
    : pool_(pool),
      tokens_(tokens),
      subscriber_(subscriber),
      clock_(clock),
      issuer_(std::move(issuer_options), pool, tokens, clock) {
  SetMessageAllocatorFor_GetToken(&token_messages_);
}

BrokerService::~BrokerService() { Shutdown(); }

absl::StatusOr<std::string> BrokerService::Caller(const grpc::CallbackServerContext& context, bool admin) const {
  if (auth_ == nullptr) {
    if (callers_from_certificates_) {
      if (std::optional<std::string> name = ClientCertificateName(context)) return *std::move(name);
    }
    return std::string("-");
  }
  return auth_->Check(context, admin);
}

void BrokerService::Shutdown() { issuer_.Shutdown(); }

// validate -> convert -> Issue -> convert -> Finish.
grpc::ServerUnaryReactor* BrokerService::GetToken(grpc::CallbackServerContext* context,
                                                  const v1::GetTokenRequest* request,
                                                  v1::GetTokenResponse* response) {
  absl::StatusOr<std::string> caller = Caller(*context, /*admin=*/false);
  if (!caller.ok()) return FinishNow(context, caller.status());
  if (absl::Status valid = ValidateGetToken(*request); !valid.ok()) return FinishNow(context, valid);
  IssueRequest issue = FromProto(*request);
  issue.select.caller = *caller;
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    issue.call_deadline = absl::FromChrono(context->deadline());
  }
  auto* call = new TokenCall(issuer_);  // deletes itself when done, unless answered inline (below)
  issue.key = call;
  issue.cancelled = [context] { return context->IsCancelled(); };
  // What the answer needs after the request moved into the issuer: the response and, for logs and
  // the audit, who asked what (only when someone reads them: nothing is copied per call otherwise).
  const bool keep_request = audit_ != nullptr || spdlog::should_log(spdlog::level::debug);
  Asked asked;
  if (keep_request) {
    asked.model = issue.select.model;
    asked.session_id = issue.select.session_id;
  }
  // Most calls are answered inside Issue(), on this thread (an in-memory selection, a cached
  // token). Those finish with the context's default reactor, whose OnDone gRPC runs inline; our
  // own reactor's OnDone would cost every call a hop to gRPC's executor thread (issue 15). A
  // call answered later (a refresh, a wait, a Redis round trip) keeps `call`.
  grpc::ServerUnaryReactor* answered_inline = nullptr;  // DefaultReactor() makes a new one each time: keep it
  t_inline_call = call;
  issuer_.Issue(std::move(issue), [this, call, context, response, caller = *std::move(caller), asked = std::move(asked),
                                   inline_reactor = &answered_inline](absl::StatusOr<Issued> issued) mutable {
    grpc::ServerUnaryReactor* reactor = call;
    if (t_inline_call == call) {  // still inside Issue(), on the GetToken thread
      reactor = *inline_reactor = context->DefaultReactor();
    }
    if (issued.ok()) ToProto(*issued, response);
    FinishToken(reactor, caller, asked, issued);
  });
  t_inline_call = nullptr;
  if (answered_inline == nullptr) return call;
  issuer_.Forget(call);
  delete call;  // never handed to gRPC
  return answered_inline;
}

void BrokerService::FinishToken(grpc::ServerUnaryReactor* call, const std::string& caller, const Asked& request,
                                const absl::StatusOr<Issued>& issued) {
  if (!issued.ok()) {
    // The arguments are built only when debug logging is on: nothing is formatted per call otherwise.
    if (spdlog::should_log(spdlog::level::debug)) {
      spdlog::debug("GetToken model={} session={}: {}", request.model, SessionTag(request.session_id),
                    std::string(issued.status().message()));
    }
    call->Finish(ToGrpcStatus(issued.status()));
    return;
  }
  const Selection& selection = issued->selection;
  if (spdlog::should_log(spdlog::level::debug)) {
    spdlog::debug("GetToken model={} session={} -> account={} tier={}{}", request.model,
                  SessionTag(request.session_id), selection.account_id, std::string(TierName(selection.tier)),
                  selection.from_session ? " (session)" : "");
  }
  if (audit_ != nullptr) {
    audit_->Issued({caller, selection.account_id, request.model, SessionTag(request.session_id), selection.lease_id,
                    std::string(TierName(selection.tier))},
                   clock_.Now());
  }
  call->Finish(grpc::Status::OK);
}

void BrokerService::CountReport(const std::string& caller, absl::string_view result) {
  absl::MutexLock lock(&reports_mu_);
  ++report_counts_[{caller, std::string(result)}];
}

std::map<std::pair<std::string, std::string>, int64_t> BrokerService::ReportCounts() const {
  absl::MutexLock lock(&reports_mu_);
  return report_counts_;
}

grpc::ServerUnaryReactor* BrokerService::ReportOutcome(grpc::CallbackServerContext* context,
                                                       const v1::ReportOutcomeRequest* request,
                                                       v1::ReportOutcomeResponse* response) {
  absl::StatusOr<std::string> caller = Caller(*context, /*admin=*/false);
  if (!caller.ok()) {
    CountReport("unknown", "unauthenticated");
    return FinishNow(context, caller.status());
  }
  // Every report, accepted or not, is audited and counted (issue 11 item 4).
  ReportAudit audit;
  audit.caller = *caller;
  audit.lease_id = SafeText(request->lease_id(), 64);
  audit.account_id = SafeText(request->account_id(), 64);
  audit.model = SafeText(request->model(), 128);
  audit.http_status = request->http_status();
  auto refuse = [&](const absl::Status& status) {
    audit.result = ReportResultName(status);
    audit.detail = SafeText(status.message(), 300);
    CountReport(*caller, audit.result);
    if (audit_ != nullptr) audit_->Reported(audit, clock_.Now());
    return FinishNow(context, status);
  };
  if (absl::Status valid = ValidateReportOutcome(*request); !valid.ok()) return refuse(valid);
  Outcome outcome;
  outcome.lease_id = request->lease_id();
  outcome.account_id = request->account_id();
  outcome.model = request->model();
  outcome.http_status = request->http_status();
  outcome.retry_after = request->retry_after();
  outcome.error_body = request->error_body();
  // Who may report what (DESIGN §5): a lease only its own caller (the admin any); an account by
  // name only whoever may call admin methods. With no tokens configured everything is open.
  outcome.caller = *caller;
  outcome.may_report_any_lease = *caller == "admin" || auth_ == nullptr || !auth_->enabled();
  outcome.may_name_account = Caller(*context, /*admin=*/true).ok();
  absl::StatusOr<OutcomeResult> result = pool_.ReportOutcome(outcome);
  if (!result.ok()) return refuse(result.status());
  response->set_account_id(result->account_id);
  response->set_model(result->model);
  response->set_scope(ToProto(result->scope));
  response->set_reason(result->reason);
  response->set_account_disabled(false);  // a report never disables (DESIGN §5); kept for old clients
  response->set_family(result->family);
  if (result->scope != CooldownScope::kNone && result->until != absl::InfiniteFuture()) {
    ToProto(result->until, response->mutable_cooldown_until());
  }
  if (result->credits_exhausted_until) {
    ToProto(*result->credits_exhausted_until, response->mutable_credits_exhausted_until());
  }
  audit.account_id = result->account_id;
  audit.model = result->model;
  const absl::string_view scope = ScopeName(result->scope);
  audit.result = scope.empty() ? "no_cooldown" : absl::StrCat(scope, "_cooldown");
  audit.scope = std::string(scope);
  if (result->scope != CooldownScope::kNone) audit.until = result->until;
  audit.detail = result->reason;
  CountReport(*caller, audit.result);
  if (audit_ != nullptr) audit_->Reported(audit, clock_.Now());
  // After the audit line: the audit log never shows a caller over its budget.
  if (caller_admission_ != nullptr && !request->lease_id().empty()) caller_admission_->Released(request->lease_id());
  if (result->scope != CooldownScope::kNone) {
    spdlog::info("account {} {}: HTTP {} -> {} cooldown until {} ({})", result->account_id, result->model,
                 request->http_status(),
                 result->scope == CooldownScope::kFamily ? absl::StrCat("family ", result->family) : std::string(scope),
                 FormatTimestamp(result->until), result->reason);
  }
  // A success or an ended lease may free an account that waiting calls want.
  issuer_.Notify();
  return FinishNow(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* BrokerService::SetQuotaManager(grpc::CallbackServerContext* context,
                                                         const v1::SetQuotaManagerRequest* request,
                                                         v1::SetQuotaManagerResponse* response) {
  if (absl::Status allowed = Caller(*context, /*admin=*/true).status(); !allowed.ok()) {
    return FinishNow(context, allowed);
  }
  absl::MutexLock lock(&quota_mu_);
  QuotaSettings settings = pool_.quota_settings();
  settings.enabled = request->enabled();
  if (request->has_cache_ttl()) settings.cache_ttl = FromProto(request->cache_ttl());
  if (request->has_low_threshold()) settings.low_threshold = request->low_threshold();
  if (request->has_exhausted_threshold()) settings.exhausted_threshold = request->exhausted_threshold();
  if (absl::Status s = ValidateQuotaSettings(settings); !s.ok()) return FinishNow(context, s);
  const std::string& target = request->monitor_target();
  if (absl::Status valid = ValidateMonitorTarget(target); !valid.ok()) return FinishNow(context, valid);
  if (!target.empty() && subscriber_ == nullptr) {
    return FinishNow(context, absl::FailedPreconditionError("this broker cannot attach a quota monitor"));
  }
  pool_.SetQuotaSettings(settings);
  if (subscriber_ != nullptr) {
    if (!settings.enabled) {
      subscriber_->Disconnect();
    } else if (!target.empty() && (target != subscriber_->target() || !subscriber_->connected())) {
      subscriber_->Connect(target);
    }
  }
  spdlog::info("quota validation {} (monitor {}, cache_ttl {}, low {}, exhausted {})",
               settings.enabled ? "on" : "off", subscriber_ ? subscriber_->target() : "-",
               absl::FormatDuration(settings.cache_ttl), settings.low_threshold, settings.exhausted_threshold);
  response->set_enabled(settings.enabled);
  if (subscriber_ != nullptr && settings.enabled) response->set_monitor_target(subscriber_->target());
  ToProto(settings.cache_ttl, response->mutable_cache_ttl());
  response->set_low_threshold(settings.low_threshold);
  response->set_exhausted_threshold(settings.exhausted_threshold);
  return FinishNow(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* BrokerService::ListAccounts(grpc::CallbackServerContext* context,
                                                      const v1::ListAccountsRequest* request,
                                                      v1::ListAccountsResponse* response) {
  if (absl::Status allowed = Caller(*context, /*admin=*/true).status(); !allowed.ok()) {
    return FinishNow(context, allowed);
  }
  if (absl::Status valid = ValidateListAccounts(*request); !valid.ok()) return FinishNow(context, valid);
  // A page holds at most page_size accounts and about kListPageBytes: however many accounts, and
  // whatever state callers made them carry, the answer stays far within the 4 MiB message limit.
  const std::vector<AccountView> views = pool_.List();  // ordered by account id
  auto it = views.begin();
  if (!request->page_token().empty()) {
    it = std::upper_bound(views.begin(), views.end(), request->page_token(),
                          [](const std::string& token, const AccountView& v) { return token < v.account_id; });
  }
  const size_t limit = request->page_size() > 0 ? static_cast<size_t>(request->page_size()) : views.size();
  size_t bytes = 0;
  for (; it != views.end() && static_cast<size_t>(response->accounts_size()) < limit; ++it) {
    v1::Account* account = response->add_accounts();
    ToProto(*it, account);
    bytes += account->ByteSizeLong() + 8;
    if (bytes > kListPageBytes && response->accounts_size() > 1) {
      response->mutable_accounts()->RemoveLast();
      break;
    }
  }
  if (it != views.end()) response->set_next_page_token(response->accounts(response->accounts_size() - 1).account_id());
  return FinishNow(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* BrokerService::ExplainSelection(grpc::CallbackServerContext* context,
                                                          const v1::ExplainSelectionRequest* request,
                                                          v1::ExplainSelectionResponse* response) {
  if (absl::Status allowed = Caller(*context, /*admin=*/true).status(); !allowed.ok()) {
    return FinishNow(context, allowed);
  }
  if (absl::Status valid = ValidateExplainSelection(*request); !valid.ok()) return FinishNow(context, valid);
  SelectRequest select;
  select.model = request->model();
  select.session_id = request->session_id();
  select.force_rotate = request->force_rotate();
  select.quota_group = request->quota_group();
  ToProto(pool_.Explain(select), response);
  return FinishNow(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* BrokerService::ResetAccount(grpc::CallbackServerContext* context,
                                                      const v1::ResetAccountRequest* request,
                                                      v1::ResetAccountResponse* response) {
  absl::StatusOr<std::string> caller = Caller(*context, /*admin=*/true);
  if (!caller.ok()) return FinishNow(context, caller.status());
  if (absl::Status valid = ValidateResetAccount(*request); !valid.ok()) return FinishNow(context, valid);
  AdminAudit audit{*caller, "account_reset", SafeText(request->account_id(), 64), request->model(), ""};
  absl::StatusOr<ResetResult> result =
      pool_.Reset(ResetRequest{request->account_id(), request->model(), request->enable()});
  if (!result.ok()) {
    audit.result = ReportResultName(result.status());
    if (audit_ != nullptr) audit_->Admin(audit, clock_.Now());
    return FinishNow(context, result.status());
  }
  if (result->enabled) tokens_.Enable(request->account_id());
  audit.result = absl::StrCat(result->cooldown_lifted ? "cooldown lifted" : "no cooldown",
                              result->enabled ? ", enabled" : request->enable() ? ", was not disabled" : "");
  if (audit_ != nullptr) audit_->Admin(audit, clock_.Now());
  spdlog::info("account {} reset by {}{}: {}", request->account_id(), *caller,
               request->model().empty() ? "" : absl::StrCat(" for model ", request->model()), audit.result);
  response->set_cooldown_lifted(result->cooldown_lifted);
  response->set_enabled(result->enabled);
  for (const AccountView& view : pool_.List()) {
    if (view.account_id == request->account_id()) ToProto(view, response->mutable_account());
  }
  // The account may be usable again: waiting calls get a try.
  issuer_.Notify();
  return FinishNow(context, absl::OkStatus());
}

}  // namespace tokenbroker
