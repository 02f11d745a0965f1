#include "lib/token_manager.h"

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace tokenbroker {

TokenManager::TokenManager(TokenManagerOptions options, AccountPool& pool, const OAuthClient& oauth,
                           const AccountStore* store, const Clock& clock)
    : options_(options), pool_(pool), oauth_(oauth), store_(store), clock_(clock) {}

TokenManager::~TokenManager() { Stop(); }

void TokenManager::Start() {
  absl::MutexLock lock(&mu_);
  if (started_) return;
  started_ = true;
  for (int i = 0; i < std::max(1, options_.workers); ++i) threads_.emplace_back([this] { WorkerLoop(); });
  if (options_.background_refresh) threads_.emplace_back([this] { BackgroundLoop(); });
}

void TokenManager::Stop() {
  absl::flat_hash_map<std::string, std::vector<Callback>> abandoned;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
    queue_.clear();
  }
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  {
    absl::MutexLock lock(&mu_);
    abandoned.swap(inflight_);
  }
  for (auto& [id, waiters] : abandoned) {
    for (Callback& cb : waiters) std::move(cb)(absl::UnavailableError("token manager is shutting down"));
  }
}

void TokenManager::Acquire(const std::string& account_id, Callback done) {
  absl::StatusOr<Credentials> creds = pool_.GetCredentials(account_id);
  if (!creds.ok()) {
    std::move(done)(creds.status());
    return;
  }
  if (creds->disabled) {
    std::move(done)(absl::FailedPreconditionError(absl::StrCat("account ", account_id, " is disabled")));
    return;
  }
  if (!creds->access_token.empty() && creds->access_expiry - clock_.Now() >= options_.min_token_ttl) {
    std::move(done)(AccessToken{creds->access_token, creds->access_expiry});
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    if (started_ && !stopping_) {
      ScheduleLocked(account_id, &done);
      return;
    }
  }
  std::move(done)(absl::UnavailableError("token manager is not running"));
}

void TokenManager::ScheduleLocked(const std::string& account_id, Callback* done) {
  auto [it, inserted] = inflight_.try_emplace(account_id);
  if (done != nullptr) it->second.push_back(std::move(*done));
  if (inserted) queue_.push_back(account_id);
}

void TokenManager::WorkerLoop() {
  while (true) {
    std::string id;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](TokenManager* self) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return self->stopping_ || !self->queue_.empty();
          },
          this));
      if (stopping_) return;
      id = std::move(queue_.front());
      queue_.pop_front();
    }
    RunRefresh(id);
  }
}

void TokenManager::BackgroundLoop() {
  while (true) {
    std::vector<std::string> due = pool_.ExpiringBefore(clock_.Now() + options_.refresh_ahead);
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    for (const std::string& id : due) ScheduleLocked(id, nullptr);
    ++scans_;
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.scan_interval);
    if (stopping_) return;
  }
}

void TokenManager::RunRefresh(const std::string& account_id) {
  absl::StatusOr<AccessToken> result = DoRefresh(account_id);
  std::vector<Callback> waiters;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = inflight_.find(account_id); it != inflight_.end()) {
      waiters.swap(it->second);
      inflight_.erase(it);
    }
  }
  for (Callback& cb : waiters) std::move(cb)(result);
}

absl::StatusOr<AccessToken> TokenManager::DoRefresh(const std::string& account_id) {
  absl::StatusOr<Credentials> creds = pool_.GetCredentials(account_id);
  if (!creds.ok()) return creds.status();
  if (creds->disabled) {
    return absl::FailedPreconditionError(absl::StrCat("account ", account_id, " is disabled"));
  }
  const absl::Time start = clock_.Now();
  // Another path may have refreshed it since this was queued: skip only a token that is good
  // for both the background window and the minimum TTL a caller is promised.
  if (!creds->access_token.empty() &&
      creds->access_expiry - start > std::max(options_.refresh_ahead, options_.min_token_ttl)) {
    return AccessToken{creds->access_token, creds->access_expiry};
  }
  if (shared_ != nullptr && shared_->Up()) {
    if (std::optional<absl::StatusOr<AccessToken>> r = RefreshShared(account_id, *creds, start)) return *std::move(r);
  }
  return RefreshWithOAuth(account_id, *creds, start, /*fence=*/0);
}

std::optional<absl::StatusOr<AccessToken>> TokenManager::RefreshShared(const std::string& account_id,
                                                                       const Credentials& creds, absl::Time start) {
  // Good for the background window too, as the local check above asks.
  const absl::Time min_expiry = start + std::max(options_.refresh_ahead, options_.min_token_ttl);
  // Another replica's refresh (OAuth timeouts and retries included) is waited for this long.
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (true) {
    absl::StatusOr<int64_t> fence = shared_->LockRefresh(account_id, min_expiry);
    if (!fence.ok()) return std::nullopt;  // the backend is down: refresh here
    if (*fence > 0) return RefreshWithOAuth(account_id, creds, start, *fence);
    // Another replica is refreshing (0) or already stored a good token (-1).
    if (*fence == 0) shared_->WaitForToken(account_id, std::min(give_up, absl::Now() + absl::Milliseconds(250)));
    absl::StatusOr<Credentials> now = pool_.GetCredentials(account_id);
    if (!now.ok()) return now.status();
    if (now->disabled) return absl::FailedPreconditionError(absl::StrCat("account ", account_id, " is disabled"));
    if (!now->access_token.empty() && now->access_expiry >= min_expiry) {
      return AccessToken{now->access_token, now->access_expiry};
    }
    if (std::optional<SharedToken> t = shared_->FetchToken(account_id, min_expiry)) {
      pool_.OnRemoteToken(account_id, *t);
      return AccessToken{t->access_token, t->expiry};
    }
    if (absl::Now() >= give_up || !shared_->Up()) return std::nullopt;
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("token manager is shutting down");
  }
}

absl::StatusOr<AccessToken> TokenManager::RefreshWithOAuth(const std::string& account_id, const Credentials& creds,
                                                           absl::Time start, int64_t fence) {
  absl::StatusOr<TokenGrant> grant = oauth_.Refresh(creds.refresh_token);
  if (grant.ok()) {
    const absl::Time expiry = start + grant->expires_in;
    pool_.SetToken(account_id, grant->access_token, expiry, grant->refresh_token);
    {
      absl::MutexLock lock(&mu_);
      ++counts_["ok"];
    }
    spdlog::debug("refreshed token of account {}; it expires in {}", account_id,
                  absl::FormatDuration(grant->expires_in));
    AccountUpdate update;
    update.access_token = grant->access_token;
    update.access_expiry = expiry;
    update.refresh_token = grant->refresh_token;
    if (fence > 0 && !shared_->StoreToken(account_id, SharedToken{grant->access_token, expiry, grant->refresh_token},
                                          fence)) {
      spdlog::debug("token of account {} not shared: another replica stored a newer one", account_id);
    }
    WriteBack(account_id, update);
    return AccessToken{grant->access_token, expiry};
  }
  if (fence > 0) shared_->UnlockRefresh(account_id, fence);
  if (IsInvalidGrant(grant.status())) {
    std::string reason(grant.status().message());
    {
      absl::MutexLock lock(&mu_);
      ++counts_["invalid_grant"];
    }
    Disable(account_id, reason);
    return absl::FailedPreconditionError(absl::StrCat("account ", account_id, " disabled: ", reason));
  }
  {
    absl::MutexLock lock(&mu_);
    ++counts_["error"];
  }
  spdlog::warn("token refresh of account {} failed: {}", account_id, std::string(grant.status().message()));
  return absl::UnavailableError(
      absl::StrCat("token refresh of account ", account_id, " failed: ", grant.status().message()));
}

void TokenManager::Disable(const std::string& account_id, const std::string& reason) {
  pool_.Disable(account_id, reason);
  if (shared_ != nullptr) shared_->AccountDisabled(account_id, reason);
  spdlog::warn("account {} disabled: {}", account_id, reason);
  AccountUpdate update;
  update.disabled_reason = reason;
  WriteBack(account_id, update);
}

void TokenManager::WriteBack(const std::string& account_id, const AccountUpdate& update) {
  if (store_ == nullptr) return;
  absl::Status s = store_->Update(account_id, update);
  absl::MutexLock lock(&mu_);
  if (s.ok()) {
    write_failed_.erase(account_id);
    return;
  }
  // A folder we may not write (a mounted Secret, a read-only volume) is one fact, said once.
  if (absl::IsPermissionDenied(s) || absl::IsFailedPrecondition(s)) {
    if (!read_only_reported_) {
      read_only_reported_ = true;
      if (shared_ != nullptr) {
        spdlog::warn(
            "accounts directory {} is read-only ({}): refreshed tokens and disabled accounts are kept in memory "
            "and in the shared state backend",
            store_->dir(), std::string(s.message()));
      } else {
        spdlog::error(
            "accounts directory {} is read-only ({}): refreshed tokens and disabled accounts are kept in this "
            "process's memory only and are lost on restart",
            store_->dir(), std::string(s.message()));
      }
    }
    return;
  }
  if (write_failed_.insert(account_id).second) {
    spdlog::error(
        "could not update the file of account {} ({}); the change is kept in memory for the life of this process",
        account_id, std::string(s.message()));
  }
}

std::map<std::string, int64_t> TokenManager::RefreshCounts() const {
  absl::MutexLock lock(&mu_);
  return counts_;
}

}  // namespace tokenbroker

namespace tokenbroker {

int64_t TokenManager::ScanCount() const {
  absl::MutexLock lock(&mu_);
  return scans_;
}

}  // namespace tokenbroker
