#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "lib/selection/account_pool.h"
#include "lib/broker/token_issuer.h"
#include "lib/common/clock.h"
#include "lib/tokens/token_manager.h"
#include "server/security/audit_log.h"
#include "server/security/auth.h"
#include "server/api/quota_subscriber.h"
#include "server/api/token_messages.h"
#include "tokenbroker/v1/broker.grpc.pb.h"

namespace tokenbroker {

// The gRPC face of the broker: validates requests, converts them, hands GetToken to the
// TokenIssuer (lib/broker) and the other calls to the pool, and converts the answers. Never
// blocks a callback thread: a token that needs a refresh, or a selection that may wait on Redis,
// is finished from another thread. Thread-safe. `pool`, `tokens`, `clock` and `subscriber` (may
// be null: no monitor can be attached) must outlive the service.
class BrokerService final : public v1::TokenBrokerService::CallbackService {
 public:
  BrokerService(AccountPool& pool, TokenManager& tokens, QuotaSubscriber* subscriber,
                const Clock& clock = Clock::Real(), TokenIssuerOptions issuer_options = {});
  ~BrokerService() override;

  // Answers every GetToken that is waiting for an account (one last try, then the error), so a
  // draining server is not held up by them. Call before grpc::Server::Shutdown.
  void Shutdown();

  // Checks callers with `auth` and records every issuance in `audit` (either may be null: open,
  // unaudited). Call before serving; both must outlive the service.
  void SetSecurity(const Authenticator* auth, AuditLog* audit) {
    auth_ = auth;
    audit_ = audit;
  }

  // Without caller tokens (`auth` null) but with mutual TLS: callers are named by their client
  // certificate's subject common name (ClientCertificateName; "-" when it has none usable).
  void SetCallersFromCertificates(bool on) { callers_from_certificates_ = on; }

  // Applies caller policies (issue 16.1) to GetToken, and counts reported leases off them. Null
  // (the default): none. Call before serving; `admission` must outlive the service.
  void SetCallerAdmission(CallerAdmission* admission) {
    caller_admission_ = admission;
    issuer_.SetCallerAdmission(admission);
  }
  // Per-caller statistics (empty without caller policies).
  std::map<std::string, CallerStats> CallerStatistics() const {
    return caller_admission_ != nullptr ? caller_admission_->Stats() : std::map<std::string, CallerStats>();
  }

  // GetToken calls parked until an account frees.
  size_t WaitingCalls() const { return issuer_.waiting(); }
  // ReportOutcome calls so far by (caller, result): "model_cooldown", "account_cooldown",
  // "no_cooldown", or why it was refused ("permission_denied", "not_found", "invalid_argument",
  // "unauthenticated" with caller "unknown"). Callers are the configured names: bounded.
  std::map<std::pair<std::string, std::string>, int64_t> ReportCounts() const ABSL_LOCKS_EXCLUDED(reports_mu_);

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
  grpc::ServerUnaryReactor* ResetAccount(grpc::CallbackServerContext* context,
                                         const v1::ResetAccountRequest* request,
                                         v1::ResetAccountResponse* response) override;

 private:
  class TokenCall;
  // The caller's name; UNAUTHENTICATED or PERMISSION_DENIED when it may not make this call.
  absl::StatusOr<std::string> Caller(const grpc::CallbackServerContext& context, bool admin) const;
  // What a GetToken asked, kept for its log line and audit record (filled only when one is written).
  struct Asked {
    std::string model;
    std::string session_id;
  };
  // Answers a GetToken with what the issuer gave (`call`: our TokenCall or the default reactor).
  void FinishToken(grpc::ServerUnaryReactor* call, const std::string& caller, const Asked& request,
                   const absl::StatusOr<Issued>& issued);

  TokenMessageAllocator token_messages_;  // GetToken's messages, on arenas
  AccountPool& pool_;
  TokenManager& tokens_;
  QuotaSubscriber* subscriber_;
  const Clock& clock_;
  const Authenticator* auth_ = nullptr;
  AuditLog* audit_ = nullptr;
  CallerAdmission* caller_admission_ = nullptr;
  bool callers_from_certificates_ = false;
  const SessionTagger tagger_;  // without an audit log: a random key, for debug logs
  void CountReport(const std::string& caller, absl::string_view result) ABSL_LOCKS_EXCLUDED(reports_mu_);
  // Session ids are caller data: logs and the audit log carry a keyed tag, never the id itself.
  std::string SessionTag(const std::string& session_id) const {
    return audit_ != nullptr ? audit_->SessionTag(session_id) : tagger_.Tag(session_id);
  }

  absl::Mutex quota_mu_;  // serialises SetQuotaManager calls
  mutable absl::Mutex reports_mu_;
  std::map<std::pair<std::string, std::string>, int64_t> report_counts_ ABSL_GUARDED_BY(reports_mu_);
  TokenIssuer issuer_;
};

}  // namespace tokenbroker
