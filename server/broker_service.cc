#include "server/broker_service.h"

#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "lib/errors.h"
#include "server/proto_convert.h"
#include "server/status_convert.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr int kMaxAttempts = 3;
constexpr size_t kMaxErrorBody = 64 * 1024;

// Session ids are caller data: logs carry a short hash, never the id itself.
std::string SessionTag(const std::string& session_id) {
  if (session_id.empty()) return "-";
  return absl::StrCat(absl::Hex(std::hash<std::string>{}(session_id) & 0xffffffffu, absl::kZeroPad8));
}

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace

struct BrokerService::Pending {
  grpc::ServerUnaryReactor* reactor = nullptr;
  v1::GetTokenResponse* response = nullptr;
  SelectRequest request;
  int attempt = 0;
  absl::Status last_error;
  absl::Time deadline = absl::InfinitePast();  // end of max_wait; in the past: no waiting
  std::string caller;                          // for the audit log
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
  pending->reactor = context->DefaultReactor();
  pending->response = response;
  pending->request.model = request->model();
  pending->request.session_id = request->session_id();
  pending->request.force_rotate = request->force_rotate();
  pending->caller = *std::move(caller);
  if (max_wait > absl::ZeroDuration()) pending->deadline = absl::Now() + max_wait;
  grpc::ServerUnaryReactor* reactor = pending->reactor;
  Issue(std::move(pending), /*may_wait=*/true);
  return reactor;
}

void BrokerService::Issue(std::unique_ptr<Pending> p, bool may_wait) {
  absl::StatusOr<Selection> selection = pool_.Select(p->request);
  if (!selection.ok()) {
    absl::Status status = selection.status();
    if (!p->last_error.ok()) {
      // Accounts were left out because their tokens could not be had: that is the real cause.
      status = absl::UnavailableError(absl::StrCat("no account with a valid token for model ", p->request.model,
                                                   "; last error: ", p->last_error.message()));
    } else if (absl::IsResourceExhausted(status) && may_wait && absl::Now() < p->deadline) {
      // Wait (without a thread) until the earliest account frees, a report frees one, or max_wait ends.
      absl::Time next = p->deadline;
      if (std::optional<absl::Duration> delay = RetryDelay(status)) next = std::min(next, absl::Now() + *delay);
      waits_.Park(next, [this, p = std::move(p)](bool final_attempt) mutable {
        Issue(std::move(p), /*may_wait=*/!final_attempt);
      });
      return;
    }
    // The arguments are built only when debug logging is on: nothing is formatted per call otherwise.
    if (spdlog::should_log(spdlog::level::debug)) {
      spdlog::debug("GetToken model={} session={}: {}", p->request.model, SessionTag(p->request.session_id),
                    std::string(status.message()));
    }
    p->reactor->Finish(ToGrpcStatus(status));
    return;
  }
  std::string account_id = selection->account_id;
  tokens_.Acquire(account_id, [this, p = std::move(p), may_wait, selection = *std::move(selection)](
                                  absl::StatusOr<AccessToken> token) mutable {
    if (!token.ok()) {
      pool_.ReleaseLease(selection.lease_id);
      if (p->attempt + 1 < kMaxAttempts) {
        ++p->attempt;
        p->last_error = token.status();
        p->request.exclude.insert(selection.account_id);
        Issue(std::move(p), may_wait);
        return;
      }
      p->reactor->Finish(ToGrpcStatus(absl::UnavailableError(absl::StrCat(
          "no valid token could be obtained for model ", p->request.model, "; last error: ",
          token.status().message()))));
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
    p->reactor->Finish(grpc::Status::OK);
  });
}

grpc::ServerUnaryReactor* BrokerService::ReportOutcome(grpc::CallbackServerContext* context,
                                                       const v1::ReportOutcomeRequest* request,
                                                       v1::ReportOutcomeResponse* response) {
  if (absl::Status allowed = Caller(*context, /*admin=*/false).status(); !allowed.ok()) {
    return FinishNow(context, allowed);
  }
  if (request->lease_id().empty() && request->account_id().empty()) {
    return FinishNow(context, InvalidFieldError("lease_id", "give the lease_id from GetToken, or account_id and model"));
  }
  if (request->lease_id().size() > 64) {
    return FinishNow(context, InvalidFieldError("lease_id", "is longer than 64 bytes; pass the lease_id GetToken returned"));
  }
  if (request->account_id().size() > 256) {
    return FinishNow(context, InvalidFieldError("account_id", "is longer than 256 bytes"));
  }
  if (absl::Status s = ValidateModel("model", request->model(), /*required=*/false); !s.ok()) {
    return FinishNow(context, s);
  }
  if (request->http_status() < 100 || request->http_status() > 599) {
    return FinishNow(context, InvalidFieldError("http_status", absl::StrCat("is ", request->http_status(),
                                                                            "; give the upstream's HTTP status, 100 to 599")));
  }
  if (request->retry_after().size() > 256) {
    return FinishNow(context, InvalidFieldError("retry_after", "is longer than 256 bytes; pass the raw header value"));
  }
  if (request->error_body().size() > kMaxErrorBody) {
    return FinishNow(context, InvalidFieldError("error_body", absl::StrCat("is ", request->error_body().size(),
                                                                           " bytes; at most 65536 are allowed")));
  }
  Outcome outcome;
  outcome.lease_id = request->lease_id();
  outcome.account_id = request->account_id();
  outcome.model = request->model();
  outcome.http_status = request->http_status();
  outcome.retry_after = request->retry_after();
  outcome.error_body = request->error_body();
  absl::StatusOr<OutcomeResult> result = pool_.ReportOutcome(outcome);
  if (!result.ok()) return FinishNow(context, result.status());
  if (result->disabled) tokens_.Disable(result->account_id, "invalid_grant: reported by the proxy");
  response->set_account_id(result->account_id);
  response->set_model(result->model);
  response->set_scope(ToProto(result->scope));
  response->set_reason(result->reason);
  response->set_account_disabled(result->disabled);
  if (result->scope != CooldownScope::kNone && result->until != absl::InfiniteFuture()) {
    ToProto(result->until, response->mutable_cooldown_until());
  }
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
                                                      const v1::ListAccountsRequest*,
                                                      v1::ListAccountsResponse* response) {
  if (absl::Status allowed = Caller(*context, /*admin=*/true).status(); !allowed.ok()) {
    return FinishNow(context, allowed);
  }
  for (const AccountView& view : pool_.List()) ToProto(view, response->add_accounts());
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

}  // namespace tokenbroker
