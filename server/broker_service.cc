#include "server/broker_service.h"

#include <functional>

#include "absl/strings/str_cat.h"
#include "lib/errors.h"
#include "server/proto_convert.h"
#include "server/status_convert.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {
namespace {

constexpr int kMaxAttempts = 3;

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

BrokerService::BrokerService(AccountPool& pool, TokenManager& tokens) : pool_(pool), tokens_(tokens) {}

grpc::ServerUnaryReactor* BrokerService::GetToken(grpc::CallbackServerContext* context,
                                                  const v1::GetTokenRequest* request,
                                                  v1::GetTokenResponse* response) {
  for (const absl::Status& s : {ValidateModel("model", request->model(), /*required=*/true),
                                ValidateSessionId("session_id", request->session_id()),
                                ValidateModel("quota_group", request->quota_group(), /*required=*/false)}) {
    if (!s.ok()) return FinishNow(context, s);
  }
  if (request->has_max_wait() &&
      (request->max_wait().seconds() < 0 || request->max_wait().nanos() < 0)) {
    return FinishNow(context, InvalidFieldError("max_wait", "must not be negative"));
  }
  SelectRequest select;
  select.model = request->model();
  select.session_id = request->session_id();
  select.force_rotate = request->force_rotate();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Issue(reactor, std::move(select), response, 0, absl::OkStatus());
  return reactor;
}

void BrokerService::Issue(grpc::ServerUnaryReactor* reactor, SelectRequest request,
                          v1::GetTokenResponse* response, int attempt, absl::Status last_error) {
  absl::StatusOr<Selection> selection = pool_.Select(request);
  if (!selection.ok()) {
    absl::Status status = selection.status();
    if (!last_error.ok()) {
      // Accounts were left out because their tokens could not be had: that is the real cause.
      status = absl::UnavailableError(absl::StrCat(
          "no account with a valid token for model ", request.model, "; last error: ",
          last_error.message()));
    }
    spdlog::debug("GetToken model={} session={}: {}", request.model, SessionTag(request.session_id),
                  std::string(status.message()));
    reactor->Finish(ToGrpcStatus(status));
    return;
  }
  std::string account_id = selection->account_id;
  tokens_.Acquire(account_id, [this, reactor, response, attempt, request = std::move(request),
                               selection = *std::move(selection)](
                                  absl::StatusOr<AccessToken> token) mutable {
    if (!token.ok()) {
      if (attempt + 1 < kMaxAttempts) {
        request.exclude.insert(selection.account_id);
        Issue(reactor, std::move(request), response, attempt + 1, token.status());
        return;
      }
      reactor->Finish(ToGrpcStatus(absl::UnavailableError(absl::StrCat(
          "no valid token could be obtained for model ", request.model, "; last error: ",
          token.status().message()))));
      return;
    }
    response->set_access_token(token->token);
    response->set_account_id(selection.account_id);
    response->set_email(selection.email);
    response->set_project_id(selection.project_id);
    ToProto(token->expiry, response->mutable_expire_time());
    response->set_tier(ToProto(selection.tier));
    response->set_quota_decision(v1::QUOTA_DECISION_UNSPECIFIED);
    if (selection.remaining_fraction) response->set_remaining_fraction(*selection.remaining_fraction);
    spdlog::debug("GetToken model={} session={} -> account={} tier={}{}", request.model,
                  SessionTag(request.session_id), selection.account_id, std::string(TierName(selection.tier)),
                  selection.from_session ? " (session)" : "");
    reactor->Finish(grpc::Status::OK);
  });
}

grpc::ServerUnaryReactor* BrokerService::ReportOutcome(grpc::CallbackServerContext* context,
                                                       const v1::ReportOutcomeRequest*,
                                                       v1::ReportOutcomeResponse*) {
  return FinishNow(context, absl::UnimplementedError(
                                "ReportOutcome is not implemented in this version of tokenbroker"));
}

grpc::ServerUnaryReactor* BrokerService::SetQuotaManager(grpc::CallbackServerContext* context,
                                                         const v1::SetQuotaManagerRequest*,
                                                         v1::SetQuotaManagerResponse*) {
  return FinishNow(context, absl::UnimplementedError(
                                "SetQuotaManager is not implemented in this version of tokenbroker"));
}

grpc::ServerUnaryReactor* BrokerService::ListAccounts(grpc::CallbackServerContext* context,
                                                      const v1::ListAccountsRequest*,
                                                      v1::ListAccountsResponse* response) {
  for (const AccountView& view : pool_.List()) ToProto(view, response->add_accounts());
  return FinishNow(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* BrokerService::ExplainSelection(grpc::CallbackServerContext* context,
                                                          const v1::ExplainSelectionRequest* request,
                                                          v1::ExplainSelectionResponse* response) {
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
