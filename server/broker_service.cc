#include "server/broker_service.h"

#include <algorithm>
#include <chrono>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/common/errors.h"
#include "lib/common/safe_text.h"
#include "server/proto_convert.h"
#include "server/status_convert.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr int kMaxAttempts = 3;
constexpr size_t kMaxErrorBody = 64 * 1024;
constexpr size_t kListPageBytes = 1 << 20;

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

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace

// One GetToken call, finished exactly once. A call its client abandons (cancelled, or past its
// deadline) while it waits for an account leaves the wait queue at once: its parked retry is
// dropped here, so it never takes a lease (a retry already running sees IsCancelled()).
class BrokerService::TokenCall final : public grpc::ServerUnaryReactor {
 public:
  explicit TokenCall(WaitQueue& waits) : waits_(waits) {}
  void OnCancel() override {
    if (waits_.Cancel(this)) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away while waiting"));
  }
  void OnDone() override {
    waits_.Forget(this);
    delete this;
  }

 private:
  WaitQueue& waits_;
};

struct BrokerService::Pending {
  TokenCall* call = nullptr;
  grpc::CallbackServerContext* context = nullptr;
  v1::GetTokenResponse* response = nullptr;
  SelectRequest request;
  int attempt = 0;
  absl::Status last_error;
  absl::Time deadline = absl::InfinitePast();       // end of max_wait; in the past: no waiting
  absl::Time call_deadline = absl::InfiniteFuture();  // the client's deadline
  std::string caller;                               // for the audit log
  // Accounts whose token is in trouble (TokenManager::Troubled) are tried only when no other
  // account is eligible: then this is set.
  bool include_troubled = false;
  // Accounts left out because their token was short-lived (they come back with include_troubled).
  std::vector<std::string> short_lived;
};

BrokerService::BrokerService(AccountPool& pool, TokenManager& tokens, QuotaSubscriber* subscriber)
    : pool_(pool), tokens_(tokens), subscriber_(subscriber) {}

BrokerService::~BrokerService() { Shutdown(); }

absl::StatusOr<std::string> BrokerService::Caller(const grpc::CallbackServerContext& context, bool admin) const {
  if (auth_ == nullptr) return std::string("-");
  return auth_->Check(context, admin);
}

void BrokerService::Shutdown() { waits_.Shutdown(); }

grpc::ServerUnaryReactor* BrokerService::GetToken(grpc::CallbackServerContext* context,
                                                  const v1::GetTokenRequest* request,
                                                  v1::GetTokenResponse* response) {
  absl::StatusOr<std::string> caller = Caller(*context, /*admin=*/false);
  if (!caller.ok()) return FinishNow(context, caller.status());
  for (const absl::Status& s : {ValidateModel("model", request->model(), /*required=*/true),
                                ValidateSessionId("session_id", request->session_id()),
                                ValidateModel("quota_group", request->quota_group(), /*required=*/false)}) {
    if (!s.ok()) return FinishNow(context, s);
  }
  absl::Duration max_wait = absl::ZeroDuration();
  if (request->has_max_wait()) {
    max_wait = FromProto(request->max_wait());
    if (max_wait < absl::ZeroDuration() || max_wait > kMaxWait || request->max_wait().nanos() < 0 ||
        request->max_wait().nanos() >= 1'000'000'000) {
      return FinishNow(context, InvalidFieldError("max_wait", absl::StrCat("must be between 0 and ",
                                                                           absl::FormatDuration(kMaxWait))));
    }
  }
  auto pending = std::make_unique<Pending>();
  pending->call = new TokenCall(waits_);  // deletes itself when done
  pending->context = context;
  pending->response = response;
  pending->request.model = request->model();
  pending->request.session_id = request->session_id();
  pending->request.force_rotate = request->force_rotate();
  pending->request.caller = *caller;
  pending->caller = *std::move(caller);
  if (max_wait > absl::ZeroDuration()) pending->deadline = absl::Now() + max_wait;
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    pending->call_deadline = absl::FromChrono(context->deadline());
  }
  grpc::ServerUnaryReactor* reactor = pending->call;
  Issue(std::move(pending), /*may_wait=*/true);
  return reactor;
}

namespace {

// How long a call waits for one account's token refresh before it tries another account (the
// refresh goes on in the background): a third of what is left of the caller's deadline, between
// 100 ms and 5 s.
absl::Time RefreshGiveUp(absl::Time call_deadline, absl::Time now) {
  absl::Duration budget = absl::Seconds(5);
  if (call_deadline != absl::InfiniteFuture()) {
    budget = std::clamp((call_deadline - now) / 3, absl::Milliseconds(100), absl::Seconds(5));
  }
  return now + budget;
}

}  // namespace

void BrokerService::Issue(std::unique_ptr<Pending> p, bool may_wait) {
  if (p->context->IsCancelled()) {
    // Nobody is there to take a token: no lease is issued (nor the half-open probe taken).
    p->call->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away"));
    return;
  }
  const absl::Time now = absl::Now();
  // Accounts whose token cannot be had now (refresh failing or slow) or only short-lived are
  // tried after every other account (issue 11: fail over instead of waiting on them).
  const absl::flat_hash_map<std::string, TokenTroubleInfo> trouble =
      p->include_troubled ? absl::flat_hash_map<std::string, TokenTroubleInfo>() : tokens_.Troubled();
  absl::StatusOr<Selection> selection;
  if (trouble.empty()) {
    selection = pool_.Select(p->request);
  } else {
    SelectRequest request = p->request;
    for (const auto& [id, info] : trouble) request.exclude.insert(id);
    selection = pool_.Select(request);
    if (!selection.ok()) {
      // Nothing else is eligible: the troubled accounts after all (a short-lived token beats none;
      // a failing one fails fast; a slow one may finish in time).
      p->include_troubled = true;
      for (const std::string& id : p->short_lived) p->request.exclude.erase(id);
      Issue(std::move(p), may_wait);
      return;
    }
  }
  if (!selection.ok()) {
    absl::Status status = selection.status();
    const std::optional<absl::Duration> frees = RetryDelay(status);
    if (absl::IsResourceExhausted(status) && !frees && !p->last_error.ok()) {
      // The accounts left out because their tokens could not be had are the real cause, and
      // nothing frees by itself.
      status = absl::UnavailableError(absl::StrCat("no account with a valid token for model ", p->request.model,
                                                   "; last error: ", p->last_error.message()));
    } else if (absl::IsResourceExhausted(status) && may_wait && now < p->deadline) {
      // Wait (without a thread) until the earliest account frees, a report frees one, or max_wait
      // ends; then every account gets a fresh chance.
      absl::Time next = p->deadline;
      if (frees) next = std::min(next, now + *frees);
      p->request.exclude.clear();
      p->short_lived.clear();
      p->include_troubled = false;
      p->attempt = 0;
      p->last_error = absl::OkStatus();
      TokenCall* call = p->call;
      WaitQueue::ParkResult parked =
          waits_.Park(call, next, [this, p = std::move(p)](bool final_attempt) mutable {
            Issue(std::move(p), /*may_wait=*/!final_attempt);
          });
      if (parked == WaitQueue::ParkResult::kCancelled) {
        call->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away while waiting"));
      }
      return;
    } else if (absl::IsResourceExhausted(status) && !p->last_error.ok()) {
      // Other accounts are cooling and will free: RESOURCE_EXHAUSTED with their RetryInfo, saying
      // why the remaining ones were skipped.
      status = NoAccountAvailableError(
          absl::StrCat(status.message(), "; accounts were skipped because their tokens could not be had (",
                       p->last_error.message(), ")"),
          p->request.model, frees);
    }
    // The arguments are built only when debug logging is on: nothing is formatted per call otherwise.
    if (spdlog::should_log(spdlog::level::debug)) {
      spdlog::debug("GetToken model={} session={}: {}", p->request.model, SessionTag(p->request.session_id),
                    std::string(status.message()));
    }
    p->call->Finish(ToGrpcStatus(status));
    return;
  }
  std::string account_id = selection->account_id;
  const absl::Time give_up = RefreshGiveUp(p->call_deadline, now);  // before `p` moves into the callback
  tokens_.Acquire(account_id, give_up,
                  [this, p = std::move(p), may_wait, selection = *std::move(selection)](
                      absl::StatusOr<AccessToken> token) mutable {
    if (token.ok() && token->below_min_ttl && !p->include_troubled) {
      // Shorter-lived than min_token_ttl: any other eligible account first.
      pool_.ReleaseLease(selection.lease_id);
      p->request.exclude.insert(selection.account_id);
      p->short_lived.push_back(selection.account_id);
      Issue(std::move(p), may_wait);
      return;
    }
    if (!token.ok()) {
      pool_.ReleaseLease(selection.lease_id);
      if (absl::IsDeadlineExceeded(token.status())) {
        // Its refresh is slow: other accounts now (Troubled() lists it until the refresh ends).
        p->include_troubled = false;
        Issue(std::move(p), may_wait);
        return;
      }
      if (p->attempt + 1 < kMaxAttempts) {
        ++p->attempt;
        p->last_error = token.status();
        p->request.exclude.insert(selection.account_id);
        Issue(std::move(p), may_wait);
        return;
      }
      p->call->Finish(ToGrpcStatus(absl::UnavailableError(absl::StrCat(
          "no valid token could be obtained for model ", p->request.model, "; last error: ",
          token.status().message()))));
      return;
    }
    if (p->context->IsCancelled()) {
      // The caller left while the token was being fetched: the lease goes back at once.
      pool_.ReleaseLease(selection.lease_id);
      p->call->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the caller went away"));
      return;
    }
    v1::GetTokenResponse* response = p->response;
    response->set_access_token(token->token);
    response->set_account_id(selection.account_id);
    response->set_email(selection.email);
    response->set_project_id(selection.project_id);
    ToProto(token->expiry, response->mutable_expire_time());
    response->set_tier(ToProto(selection.tier));
    response->set_lease_id(selection.lease_id);
    response->set_quota_decision(ToProto(selection.quota_decision));
    if (selection.remaining_fraction) response->set_remaining_fraction(*selection.remaining_fraction);
    response->set_below_min_token_ttl(token->below_min_ttl);
    if (spdlog::should_log(spdlog::level::debug)) {
      spdlog::debug("GetToken model={} session={} -> account={} tier={}{}", p->request.model,
                    SessionTag(p->request.session_id), selection.account_id, std::string(TierName(selection.tier)),
                    selection.from_session ? " (session)" : "");
    }
    if (audit_ != nullptr) {
      audit_->Issued({p->caller, selection.account_id, p->request.model, SessionTag(p->request.session_id),
                      selection.lease_id, std::string(TierName(selection.tier))},
                     absl::Now());
    }
    p->call->Finish(grpc::Status::OK);
  });
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
    if (audit_ != nullptr) audit_->Reported(audit, absl::Now());
    return FinishNow(context, status);
  };
  if (request->lease_id().empty() && request->account_id().empty()) {
    return refuse(InvalidFieldError("lease_id", "give the lease_id from GetToken, or account_id and model"));
  }
  if (request->lease_id().size() > 64) {
    return refuse(InvalidFieldError("lease_id", "is longer than 64 bytes; pass the lease_id GetToken returned"));
  }
  if (request->account_id().size() > 256) {
    return refuse(InvalidFieldError("account_id", "is longer than 256 bytes"));
  }
  if (absl::Status s = ValidateModel("model", request->model(), /*required=*/false); !s.ok()) {
    return refuse(s);
  }
  if (request->http_status() < 100 || request->http_status() > 599) {
    return refuse(InvalidFieldError("http_status", absl::StrCat("is ", request->http_status(),
                                                                "; give the upstream's HTTP status, 100 to 599")));
  }
  if (request->retry_after().size() > 256) {
    return refuse(InvalidFieldError("retry_after", "is longer than 256 bytes; pass the raw header value"));
  }
  if (request->error_body().size() > kMaxErrorBody) {
    return refuse(InvalidFieldError("error_body", absl::StrCat("is ", request->error_body().size(),
                                                               " bytes; at most 65536 are allowed")));
  }
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
  if (result->scope != CooldownScope::kNone && result->until != absl::InfiniteFuture()) {
    ToProto(result->until, response->mutable_cooldown_until());
  }
  audit.account_id = result->account_id;
  audit.model = result->model;
  audit.result = result->scope == CooldownScope::kNone ? "no_cooldown"
                 : result->scope == CooldownScope::kAccount ? "account_cooldown"
                                                            : "model_cooldown";
  audit.scope = result->scope == CooldownScope::kNone ? "" : result->scope == CooldownScope::kAccount ? "account" : "model";
  if (result->scope != CooldownScope::kNone) audit.until = result->until;
  audit.detail = result->reason;
  CountReport(*caller, audit.result);
  if (audit_ != nullptr) audit_->Reported(audit, absl::Now());
  if (result->scope != CooldownScope::kNone) {
    spdlog::info("account {} {}: HTTP {} -> {} cooldown until {} ({})", result->account_id, result->model,
                 request->http_status(), result->scope == CooldownScope::kAccount ? "account" : "model",
                 absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", result->until, absl::UTCTimeZone()), result->reason);
  }
  // A success or an ended lease may free an account that waiting calls want.
  waits_.Notify();
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
  if (target.size() > 512 || target.find_first_of(" \t\n") != std::string::npos) {
    return FinishNow(context, InvalidFieldError("monitor_target", "must be host:port or unix:path, without spaces"));
  }
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
  response->mutable_cache_ttl()->set_seconds(absl::ToInt64Seconds(settings.cache_ttl));
  response->mutable_cache_ttl()->set_nanos(
      static_cast<int32_t>(absl::ToInt64Nanoseconds(settings.cache_ttl - absl::Seconds(absl::ToInt64Seconds(settings.cache_ttl)))));
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
  if (request->page_size() < 0) return FinishNow(context, InvalidFieldError("page_size", "must not be negative"));
  if (request->page_token().size() > 512) {
    return FinishNow(context, InvalidFieldError("page_token", "is not a next_page_token this server returned"));
  }
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
  for (const absl::Status& s : {ValidateModel("model", request->model(), /*required=*/true),
                                ValidateSessionId("session_id", request->session_id())}) {
    if (!s.ok()) return FinishNow(context, s);
  }
  SelectRequest select;
  select.model = request->model();
  select.session_id = request->session_id();
  select.force_rotate = request->force_rotate();
  ToProto(pool_.Explain(select), response);
  return FinishNow(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* BrokerService::ResetAccount(grpc::CallbackServerContext* context,
                                                      const v1::ResetAccountRequest* request,
                                                      v1::ResetAccountResponse* response) {
  absl::StatusOr<std::string> caller = Caller(*context, /*admin=*/true);
  if (!caller.ok()) return FinishNow(context, caller.status());
  if (request->account_id().empty() || request->account_id().size() > 256) {
    return FinishNow(context, InvalidFieldError("account_id", "is required: the id list-accounts shows"));
  }
  if (absl::Status s = ValidateModel("model", request->model(), /*required=*/false); !s.ok()) {
    return FinishNow(context, s);
  }
  AdminAudit audit{*caller, "account_reset", SafeText(request->account_id(), 64), request->model(), ""};
  absl::StatusOr<ResetResult> result =
      pool_.Reset(ResetRequest{request->account_id(), request->model(), request->enable()});
  if (!result.ok()) {
    audit.result = ReportResultName(result.status());
    if (audit_ != nullptr) audit_->Admin(audit, absl::Now());
    return FinishNow(context, result.status());
  }
  if (result->enabled) tokens_.Enable(request->account_id());
  audit.result = absl::StrCat(result->cooldown_lifted ? "cooldown lifted" : "no cooldown",
                              result->enabled ? ", enabled" : request->enable() ? ", was not disabled" : "");
  if (audit_ != nullptr) audit_->Admin(audit, absl::Now());
  spdlog::info("account {} reset by {}{}: {}", request->account_id(), *caller,
               request->model().empty() ? "" : absl::StrCat(" for model ", request->model()), audit.result);
  response->set_cooldown_lifted(result->cooldown_lifted);
  response->set_enabled(result->enabled);
  for (const AccountView& view : pool_.List()) {
    if (view.account_id == request->account_id()) ToProto(view, response->mutable_account());
  }
  // The account may be usable again: waiting calls get a try.
  waits_.Notify();
  return FinishNow(context, absl::OkStatus());
}

}  // namespace tokenbroker
