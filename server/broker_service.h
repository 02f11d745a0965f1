#pragma once

#include "lib/account_pool.h"
#include "lib/token_manager.h"
#include "tokenbroker/v1/broker.grpc.pb.h"

namespace tokenbroker {

// The gRPC face of the broker: validates requests, asks the pool for an account and the token
// manager for its token, and translates the answers. Never blocks a callback thread: a token that
// needs a refresh is finished from the refresher's worker. Thread-safe. `pool` and `tokens` must
// outlive the service.
class BrokerService final : public v1::TokenBrokerService::CallbackService {
 public:
  BrokerService(AccountPool& pool, TokenManager& tokens);

  grpc::ServerUnaryReactor* GetToken(grpc::CallbackServerContext* context,
                                     const v1::GetTokenRequest* request,
                                     v1::GetTokenResponse* response) override;
  grpc::ServerUnaryReactor* ReportOutcome(grpc::CallbackServerContext* context,
                                          const v1::ReportOutcomeRequest* request,
                                          v1::ReportOutcomeResponse* response) override;
  grpc::ServerUnaryReactor* SetQuotaManager(grpc::CallbackServerContext* context,
                                            const v1::SetQuotaManagerRequest* request,
                                            v1::SetQuotaManagerResponse* response) override;
  grpc::ServerUnaryReactor* ListAccounts(grpc::CallbackServerContext* context,
                                         const v1::ListAccountsRequest* request,
                                         v1::ListAccountsResponse* response) override;
  grpc::ServerUnaryReactor* ExplainSelection(grpc::CallbackServerContext* context,
                                             const v1::ExplainSelectionRequest* request,
                                             v1::ExplainSelectionResponse* response) override;

 private:
  // Selects an account and finishes `reactor` with its token; when the token cannot be had, tries
  // again without that account, up to a few times.
  void Issue(grpc::ServerUnaryReactor* reactor, SelectRequest request, v1::GetTokenResponse* response,
             int attempt, absl::Status last_error);

  AccountPool& pool_;
  TokenManager& tokens_;
};

}  // namespace tokenbroker
